"""Optional packages the benchmarks compare against or need (tltorch, tensorly, ...)."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Sequence, Tuple


def optional_module(name: str) -> Tuple[ModuleType | None, str]:
    """``(module, "")`` when ``name`` imports, else ``(None, reason)``.

    Any import failure counts as missing (tltorch raises more than ``ImportError``
    against some tensorly releases); its import-time warnings are silenced.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name), ""
    except Exception as error:  # noqa: BLE001 - every failure is reported, none is fatal
        return None, f"{name} unavailable ({type(error).__name__}: {error})"


def missing_reason(names: Sequence[str]) -> str:
    """Why the first of ``names`` that does not import is unavailable (``""``: all import)."""
    for name in names:
        module, why = optional_module(name)
        if module is None:
            return why
    return ""


def version(module: ModuleType) -> str:
    """``name version`` of an imported package."""
    return f"{module.__name__} {getattr(module, '__version__', '(unknown version)')}"
