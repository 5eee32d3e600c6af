import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present; this must be
# set before triton.jit decorates anything, i.e. before pvkernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pvkernels  # noqa: E402,F401  (builds/loads the C++ extension once, before any test)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
