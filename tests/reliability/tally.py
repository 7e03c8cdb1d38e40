"""Counts of what the reliability tests tried and what survived, for the benchmark table.

``assert record("faults injected", ok)`` counts one check as tried, and as survived
when ``ok``. When the environment variable ``FACTORIZED_LAYERS_TALLY`` names a file,
``conftest.py`` writes the counts there as JSON at the end of the session
(``python -m benchmarks --only reliability`` runs this package that way).
"""

import collections
from typing import Dict

TRIED: Dict[str, int] = collections.Counter()
SURVIVED: Dict[str, int] = collections.Counter()


def record(category: str, ok: bool = True) -> bool:
    TRIED[category] += 1
    SURVIVED[category] += bool(ok)
    return ok
