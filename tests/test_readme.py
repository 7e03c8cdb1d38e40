"""The README's usage example must run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


REQUIRES = re.compile(r"^# requires: (.*)$", flags=re.M)
"""A block whose first line is ``# requires: a, b`` needs those optional packages."""


def _blocks():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks


def _requirements(block: str):
    match = REQUIRES.match(block)
    return [] if match is None else [name.strip() for name in match.group(1).split(",")]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples save checkpoints into the working folder
    namespaces = []
    for block in _blocks():
        if _requirements(block):
            continue  # run by test_readme_examples_with_optional_packages_run
        namespaces.append({})
        exec(compile(block, str(README), "exec"), namespaces[-1])
    first = namespaces[0]  # the 30-second example
    assert 0 < float(first["err"].detach()) < 1
    assert first["small"].rank == 76


def test_readme_examples_with_optional_packages_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    optional = [block for block in _blocks() if _requirements(block)]
    assert optional, "README has no example that needs an optional extra (the Deploy one)"
    for block in optional:
        for name in _requirements(block):
            pytest.importorskip(name, reason=f"the README example needs {name}")
        exec(compile(block, str(README), "exec"), {})


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
