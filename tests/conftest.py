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
