"""Each op's two fused implementations under one schema: the C++ op the extension registers
(``pvkernels_cpp::NAME``, csrc/registration.cpp) and the Triton custom op (``pvkernels::NAME_triton``),
both with the op's fake kernel so that torch.compile traces them. tests/test_schemas.py checks that
the schema given here is the one the extension registers."""
from __future__ import annotations

from typing import Callable

import torch

from .._backend import cpp_available, triton


def define_op(name: str, schema: str, triton_impl: Callable, fake: Callable) -> dict:
    """{"cpp": op, "triton": op} for the backends this install has (the extension built, triton
    installed); the fake kernel registered on both."""
    ops = {}
    if triton is not None:
        ops["triton"] = torch.library.custom_op(f"pvkernels::{name}_triton", triton_impl, mutates_args=(),
                                                schema=schema)
        ops["triton"].register_fake(fake)
    if cpp_available():
        torch.library.register_fake(f"pvkernels_cpp::{name}")(fake)
        ops["cpp"] = getattr(torch.ops.pvkernels_cpp, name)
    return ops
