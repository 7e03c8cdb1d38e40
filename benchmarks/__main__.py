"""``python -m benchmarks``: run the benchmark suite (see ``benchmarks/suite.py``)."""

from .suite import main

raise SystemExit(main())
