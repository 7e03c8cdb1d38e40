import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from factorized_layers.testing import available_devices

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=40,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))


@pytest.fixture(params=available_devices())
def device(request):
    return request.param


@pytest.fixture
def tiny_llama():
    """A 3-block LlamaForCausalLM from a config (vocabulary 64, width 32), in eval mode."""
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()
