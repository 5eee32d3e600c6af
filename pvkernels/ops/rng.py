"""The counter-based normal stream shared by every backend (see csrc/philox.h).

Element ``n`` of a tensor takes lane ``n % 4`` of Philox4x32-10 at counter ``n // 4``
(low word ``c0``, high word ``c1``), keyed by the 64-bit seed (``k0`` low, ``k1`` high);
lanes (0, 1) and (2, 3) go through Box-Muller with ``u1 = (2 * (c >> 9) + 1) * 2**-24`` and
``u2 = (c >> 8) * 2**-24``. This module holds the torch version (the oracle) and the Triton
device function.
"""
from __future__ import annotations

import math

import torch

from .._backend import triton

if triton is not None:
    import triton.language as tl

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64-bit product in int64 without overflow: split m into 16-bit halves.
    hi_part = a * (m >> 16)
    lo_part = a * (m & 0xFFFF)
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return hi & _MASK32, lo


def philox_normal_reference(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normals (float64) of the elements ``index`` (int64) of the stream ``seed``."""
    counter = index >> 2
    lane = index & 3
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _ROUND_A)
        hi2, lo2 = _mulhilo(c2, _ROUND_B)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    first_pair = lane < 2
    a = torch.where(first_pair, c0, c2)
    b = torch.where(first_pair, c1, c3)
    u1 = ((a >> 9) * 2 + 1).to(torch.float64) * 2.0**-24
    u2 = (b >> 8).to(torch.float64) * 2.0**-24
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    return radius * torch.where((lane & 1) == 0, torch.cos(angle), torch.sin(angle))


if triton is not None:

    @triton.jit
    def philox_normal(seed, index):
        """Triton twin of ``philox_normal_reference`` (float32); ``index`` is an int64 block."""
        counter = index >> 2
        lane = index & 3
        zero = tl.zeros(index.shape, tl.uint32)
        c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
        first_pair = lane < 2
        a = tl.where(first_pair, r0, r2)
        b = tl.where(first_pair, r1, r3)
        u1 = (((a >> 9) << 1) | 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08
        u2 = (b >> 8).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08
        radius = tl.sqrt(-2.0 * tl.log(u1))
        angle = 6.283185307179586 * u2
        return radius * tl.where((lane & 1) == 0, tl.cos(angle), tl.sin(angle))
