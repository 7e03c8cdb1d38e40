"""The README's usage example must run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    assert 0 < float(namespace["err"].detach()) < 1
    assert namespace["small"].rank == 76


def test_readme_test_command_is_the_one_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = 'python -m pip install -e ".[test]" && python -m pytest -q'
    assert command in README.read_text()
    assert command in ci
