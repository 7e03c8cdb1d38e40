"""Benchmarks: ratios against dense layers and peers, measured side by side in one run."""
