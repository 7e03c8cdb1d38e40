import pytest

pytest.importorskip("sklearn", reason="the demo's real data set comes from scikit-learn")

from factorized_layers.demo import main  # noqa: E402


def test_demo_quick_runs_and_reports(capsys, tmp_path):
    plot = tmp_path / "accuracy.png"
    # Every layer converts (the speed guard, timing-dependent, is tested in test_convert).
    assert main(["--quick", "--allow-slower", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "dense test accuracy" in out
    assert "Conv2d -> CPConv2d" in out and "Linear -> SVDLinear" in out
    table = [line for line in out.splitlines() if line.startswith("| 0.")]
    assert len(table) == 2
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2].rstrip("x")) > 1.5
        assert 0.0 <= float(cells[5]) <= 1.0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not plot.exists()
    else:
        assert plot.stat().st_size > 0
