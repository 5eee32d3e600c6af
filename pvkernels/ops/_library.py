"""Each op's two fused implementations under one schema: the C++ op the extension registers
(``pvkernels_cpp::NAME``, csrc/registration.cpp) and the Triton custom op (``pvkernels::NAME_triton``),
both with the op's fake kernel so that torch.compile traces them. tests/test_schemas.py checks that
the schema given here is the one the extension registers."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._backend import cpp_available, triton


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # no __torch_dispatch__ of their own


def _plain_eager() -> bool:
    """No torch.compile / export tracing, torch.jit.trace, dispatch mode (FakeTensorMode,
    FlopCounterMode), profiler or torch.func transform active."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
                or torch.autograd._profiler_enabled() or torch._C._functorch.peek_interpreter_stack() is not None)


def _eager_or_op(op: Callable, impl: Callable) -> Callable:
    """The Triton op as the dispatch calls it: ``impl`` itself in plain eager calls, where the
    custom op's own dispatch costs ~10 us of Python a call (launch overhead on a GPU), and the
    custom op wherever something must see it (_plain_eager() False): tracing records the op
    (torch.jit.trace would not see the kernels' writes), dispatch modes and the profiler name it,
    torch.func's batched tensors have no storage for the kernels; and for a tensor subclass, or in
    grad mode an input that requires grad (a double backward: the op has no autograd formula and
    says so when differentiated, where the kernels' outputs would silently be constants)."""
    def call(*args):
        if not _plain_eager():
            return call.op(*args)
        grad = torch.is_grad_enabled()
        for a in args:
            if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
                return call.op(*args)
        return impl(*args)
    call.op = op
    return call


def define_op(name: str, schema: str, triton_impl: Callable, fake: Callable) -> dict:
    """{"cpp": op, "triton": op} for the backends this install has (the extension built, triton
    installed); the fake kernel registered on both. The Triton entry skips its custom op in plain
    eager calls (_eager_or_op); ``.op`` is the custom op."""
    ops = {}
    if triton is not None:
        op = torch.library.custom_op(f"pvkernels::{name}_triton", triton_impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
        ops["triton"] = _eager_or_op(op, triton_impl)
    if cpp_available():
        torch.library.register_fake(f"pvkernels_cpp::{name}")(fake)
        ops["cpp"] = getattr(torch.ops.pvkernels_cpp, name)
    return ops
