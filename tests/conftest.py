import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present; this must be
# set before triton.jit decorates anything, i.e. before pvkernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pvkernels  # noqa: E402


def available_backends():
    names = ["reference"]
    if pvkernels.cpp_available():
        names.append("cpp")
    if pvkernels.triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")
    return names


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
