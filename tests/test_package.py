import subprocess
import sys

import factorized_layers


def test_import_does_not_initialise_cuda_or_change_globals():
    code = (
        "import torch\n"
        "before = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled())\n"
        "import factorized_layers\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised by the import'\n"
        "after = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled())\n"
        "assert before == after, (before, after)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_is_explicit():
    for name in factorized_layers.__all__:
        assert hasattr(factorized_layers, name), name


def test_testing_module_imports_without_test_only_packages():
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None  # importing it now raises ImportError\n"
        "import factorized_layers.testing as testing\n"
        "assert testing.tolerance(__import__('torch').float32)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_extra_installs_what_the_demo_imports():
    import configparser
    import pathlib

    setup = configparser.ConfigParser()
    setup.read(pathlib.Path(__file__).parents[1] / "setup.cfg")
    demo = set(setup["options.extras_require"]["demo"].split())
    source = (pathlib.Path(factorized_layers.__file__).parent / "demo.py").read_text()
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        assert f"import {module}" in source or f"from {module}" in source
        assert package in demo, package
