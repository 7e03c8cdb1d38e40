import pytest

pytest.importorskip("sklearn", reason="the demo's real data set comes from scikit-learn")

from factorized_layers.demo import main  # noqa: E402


def test_demo_quick_runs_and_reports(capsys):
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "dense test accuracy" in out
    table = [line for line in out.splitlines() if line.startswith("| 0.")]
    assert len(table) == 3
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert 0.0 <= float(cells[4]) <= 1.0
        assert float(cells[2].rstrip("x")) > 1.0
