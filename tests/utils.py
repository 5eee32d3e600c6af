"""What every test shares: one tolerance table, one verbose assert_close, the device a
backend runs on, and the explicit attention oracle."""
from __future__ import annotations

import math

import torch

# (rtol, atol) of a backend's result against the fp64 (or fp32) oracle, by the dtype under test.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    # fp32 through layers around the op (Linear, LayerNorm: the modules) against the same layers
    # around the oracle, or eager against compiled: the layers' sums run in another order
    "fp32 layers": (1e-4, 1e-5),
}


def tolerance(dtype: torch.dtype | str) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | str | None = None,
                 rtol: float | None = None, atol: float | None = None, name: str = "") -> None:
    """Elementwise |a - e| <= atol + rtol * |e|, with NaN/inf positions required to match.

    On failure says how many elements differ, the worst index and values, and NaN/inf mismatches.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    d_rtol, d_atol = tolerance(dtype or actual.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_mismatch = int((a.isnan() != e.isnan()).sum())
    inf_mismatch = int(((a.isinf() | e.isinf()) & (a != e)).sum())
    finite = a.isfinite() & e.isfinite()
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = finite & (err > atol + rtol * e.abs())
    n_bad = int(bad.sum())
    if n_bad or nan_mismatch or inf_mismatch:
        worst = int(torch.argmax(torch.where(finite, err / (atol + rtol * e.abs()).clamp_min(1e-300), 0.0)))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {n_bad} of {a.numel()} elements differ beyond rtol={rtol}, atol={atol}; "
            f"NaN mismatches {nan_mismatch}, inf mismatches {inf_mismatch}; worst at {idx}: "
            f"actual {a.flatten()[worst].item()!r} expected {e.flatten()[worst].item()!r} "
            f"(abs err {err.flatten()[worst].item():.3g})")


def dev(backend: str) -> str:
    """The device a backend's inputs live on: CUDA for triton when a GPU is present, else the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def attention_math(q, k, v, bias, temporal, causal):
    """Explicit softmax(q k^T / sqrt(Dh) + bias) v on (B, T, S, H, Dh), in the dtype of q (the fp64 oracle)."""
    eq = "btihd,btjhd->bthij" if not temporal else "bishd,bjshd->bshij"
    scores = torch.einsum(eq, q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if causal:
        N = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = "bthij,btjhd->btihd" if not temporal else "bshij,bjshd->bishd"
    return torch.einsum(out, p, v)
