"""The README's usage example must run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples save checkpoints into the working folder
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespaces = []
    for block in blocks:
        namespaces.append({})
        exec(compile(block, str(README), "exec"), namespaces[-1])
    first = namespaces[0]  # the 30-second example
    assert 0 < float(first["err"].detach()) < 1
    assert first["small"].rank == 76


def test_readme_test_command_is_the_one_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = 'python -m pip install -e ".[test]" && python -m pytest -q'
    assert command in README.read_text()
    assert command in ci


def test_readme_headline_ratios_are_the_ones_in_results():
    """The README quotes benchmarks/RESULTS.md's headline verbatim, so they cannot drift."""
    text = README.read_text()
    match = re.search(r"<!-- headline:start -->\n(.*?)<!-- headline:end -->", text, flags=re.S)
    assert match, "README has no headline block"
    quoted = [line for line in match.group(1).splitlines() if line.startswith("- ")]
    assert quoted, "the README headline block quotes nothing"
    results = (README.parent / "benchmarks" / "RESULTS.md").read_text().splitlines()
    missing = [line for line in quoted if line not in results]
    assert not missing, f"README headline lines not in benchmarks/RESULTS.md: {missing}"
