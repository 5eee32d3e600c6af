"""Triton launches as data: each launcher plans its launches (kernel, grid, arguments, meta),
then runs them. tests/test_triton_compile.py calls the same planning functions on meta tensors
and compiles every planned launch for sm_80 and sm_90, so what is compiled there is what the
dispatch launches on a GPU.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple


class Launch(NamedTuple):
    kernel: object  # a @triton.jit function
    grid: tuple
    args: tuple  # runtime arguments by position
    meta: dict  # constexpr arguments, num_warps, num_stages
    kwargs: Mapping = MappingProxyType({})  # runtime arguments by name (pointers, strides, sizes)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs, **self.meta)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python (triton.cdiv is a ConstexprFunction: ~1.5 us a call in launch planning)."""
    return -(-a // b)


def run(launches) -> None:
    for launch in launches:
        launch()
