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
