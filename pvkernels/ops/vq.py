"""Vector-quantisation lookup: nearest codebook entry of every vector, and the gather.

Fuses the distances, the argmin over the codebook and the gather ``zq = codebook[idx]`` into
one pass over tiles of (rows x codes), replacing ``torch.cdist(z, e).argmin(1)`` (or the
matmul-expansion form) that materialises the N x K distance matrix. Distances are accumulated
in fp32 as ``||e||^2 - 2 <z, e>`` (``||z||^2`` is constant per row). Limits: no gradient
through the argmin (``zq`` carries the codebook's gradient, as ``codebook[idx]`` would).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .._backend import check_float, cpp_available, cpp_slower, resolve_backend, triton

METRICS = ("l2", "cosine")


# 1. reference -------------------------------------------------------------------------------

def _codebook_scores(codebook: torch.Tensor, cosine: bool, compute: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The codebook as used in the dot products, and the per-code bias of the score."""
    e = codebook.to(compute)
    if cosine:
        e = F.normalize(e, dim=1, eps=1e-12)
        return e, torch.zeros(e.shape[0], dtype=compute, device=e.device)
    return e, e.pow(2).sum(1)


def vq_lookup_reference(z: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch oracle on (N, D) rows: argmin_k ``bias_k - 2 <z, e_k>`` (first index on ties).

    ``bias_k = ||e_k||^2`` for l2 and 0 for cosine (with unit-normalised codes; ``|z|`` does not
    change the argmax). Math in fp32 (fp64 for fp64 inputs).
    Memory traffic: reads N*D + K*D, writes and reads the N x K score matrix, writes N*(D+1).
    """
    compute = torch.float64 if z.dtype == torch.float64 else torch.float32
    e, bias = _codebook_scores(codebook, cosine, compute)
    scores = bias - 2.0 * (z.to(compute) @ e.T)
    idx = scores.argmin(1) if z.shape[0] else torch.empty(0, dtype=torch.int64, device=z.device)
    return idx, codebook[idx]


# 2. triton kernels --------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _vq_lookup_fwd_kernel(
        z_ptr, e_ptr, codebook_ptr, bias_ptr, idx_ptr, zq_ptr,
        z_stride_n, z_stride_d, e_stride_k, codebook_stride_k,
        n_rows, n_codes, dim,
        DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of rows: running (min, argmin) over codebook blocks, then the gather."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * z_stride_n  # int64: N * D can pass 2**31
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(0, n_codes, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < n_codes
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_mask = ds < dim
                zt = tl.load(z_rows + ds[None, :] * z_stride_d, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                et = tl.load(e_ptr + cols.to(tl.int64)[None, :] * e_stride_k + ds[:, None],
                             mask=col_mask[None, :] & d_mask[:, None], other=0.0)
                if DOT_FP32:  # fp32 inputs (no TF32: it would change the argmin), cosine, interpreter
                    acc += tl.dot(zt.to(tl.float32), et.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(zt, et)
            # padded codes score +inf and never win
            bias = tl.load(bias_ptr + cols, mask=col_mask, other=float("inf"))
            score = bias[None, :] - 2.0 * acc
            block_min = tl.min(score, axis=1)
            # smallest index reaching the block minimum; strict < across blocks keeps the first
            block_idx = tl.min(tl.where(score == block_min[:, None], cols[None, :], n_codes), axis=1)
            better = block_min < best
            best = tl.where(better, block_min, best)
            best_idx = tl.where(better, block_idx, best_idx)
        tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_mask)
        src = codebook_ptr + best_idx.to(tl.int64)[:, None] * codebook_stride_k
        dst = zq_ptr + rows.to(tl.int64)[:, None] * dim
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (ds < dim)[None, :]
            tl.store(dst + ds[None, :], tl.load(src + ds[None, :], mask=mask), mask=mask)


# 3. launchers -------------------------------------------------------------------------------

def _vq_lookup_triton_impl(z: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    N, D = z.shape
    K = codebook.shape[0]
    idx = torch.empty(N, dtype=torch.int64, device=z.device)
    zq = torch.empty((N, D), dtype=codebook.dtype, device=z.device)
    if N == 0:
        return idx, zq
    codebook = codebook.contiguous()
    e, bias = _codebook_scores(codebook, cosine, torch.float32)
    interpret = z.device.type != "cuda"
    # fp16/bf16 l2 on a GPU: tensor-core dots on the codebook as stored; otherwise fp32 dots
    # (the interpreter's bf16 dot is wrong, TF32 would change the argmin, cosine codes are fp32)
    dot_fp32 = interpret or cosine or z.dtype == torch.float32
    e = e.contiguous() if dot_fp32 else codebook
    BLOCK_D = min(64, max(16, triton.next_power_of_2(D)))
    # the interpreter pays per program and per loop step, not per element: fewer, larger blocks
    BLOCK_N, BLOCK_K = (64, 256) if interpret else (64, 64 if D > 64 else 128)
    grid = (triton.cdiv(N, BLOCK_N),)
    _vq_lookup_fwd_kernel[grid](z, e, codebook, bias, idx, zq, z.stride(0), z.stride(1), e.stride(0),
                                codebook.stride(0), N, K, D, DOT_FP32=dot_fp32, BLOCK_N=BLOCK_N,
                                BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=4)
    return idx, zq


def _vq_lookup_fake(z: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    N, D = z.shape
    return z.new_empty((N,), dtype=torch.int64), codebook.new_empty((N, D))


if triton is not None:
    _SCHEMA = "(Tensor z, Tensor codebook, bool cosine) -> (Tensor, Tensor)"  # as in csrc/registration.cpp
    _vq_lookup_triton = torch.library.custom_op("pvkernels::vq_lookup_triton", _vq_lookup_triton_impl,
                                                mutates_args=(), schema=_SCHEMA)
    _vq_lookup_triton.register_fake(_vq_lookup_fake)


# 4. C++ ------------------------------------------------------------------------------------
# torch.ops.pvkernels_cpp.vq_lookup (csrc/vq.cpp), same schema and fake kernel.

if cpp_available():
    torch.library.register_fake("pvkernels_cpp::vq_lookup")(_vq_lookup_fake)


# 6. public function ------------------------------------------------------------------------

def _check_args(z, codebook, metric):
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vq_lookup: {name} must be a torch.Tensor, got {type(t).__name__}")
        check_float("vq_lookup", name, t)
    if codebook.dim() != 2:
        raise ValueError(f"vq_lookup: codebook must be 2-D (K, D), got {codebook.dim()}-D with shape "
                         f"{tuple(codebook.shape)}")
    K, D = codebook.shape
    if K == 0:
        raise ValueError("vq_lookup: the codebook is empty (K = 0 codes)")
    if D == 0:
        raise ValueError("vq_lookup: the codebook has D = 0 features")
    if z.dim() == 0 or z.shape[-1] != D:
        raise ValueError(f"vq_lookup: z must be (..., D) with D = {D} like the codebook (K, D) = {(K, D)}, "
                         f"got shape {tuple(z.shape)}")
    if z.dtype != codebook.dtype:
        raise TypeError(f"vq_lookup: z is {z.dtype} but the codebook is {codebook.dtype}; use the same dtype")
    if z.device != codebook.device:
        raise ValueError(f"vq_lookup: z is on {z.device} but the codebook is on {codebook.device}")
    if metric not in METRICS:
        raise ValueError(f"vq_lookup: metric must be one of {METRICS}, got {metric!r}")


def vq_lookup(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
              backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Finds the nearest codebook entry of every vector of ``z`` and gathers it.

    ``metric="l2"``: ``idx = argmin_k ||z - e_k||^2``; ``metric="cosine"``:
    ``idx = argmax_k <z / |z|, e_k / |e_k|>``. Exact ties go to the smallest ``k``. Scores are
    accumulated in fp32 (fp64 for fp64 inputs, reference backend only). The cpp and triton
    backends never build the N x K distance matrix (extra memory O(tile)).

    Args:
        z: vectors, floating point (fp32/fp16/bf16; fp64 with the reference backend).
        codebook: the K codes, same dtype and device as ``z``.
        metric: "l2" or "cosine".
        backend: "auto", "triton", "cpp" or "reference" (env ``PVKERNELS_BACKEND`` overrides auto).

    Returns:
        ``(idx, zq)``: int64 code indices and ``zq = codebook[idx]`` (contiguous, the codebook's
        dtype). ``zq`` is differentiable with respect to the codebook, not to ``z``.

    Shape:
        z: (..., D), codebook: (K, D) -> idx: (...), zq: (..., D).

    Example:
        >>> codebook = torch.randn(512, 64)
        >>> z = torch.randn(8, 16, 16, 64)
        >>> idx, zq = pvkernels.vq_lookup(z, codebook)
        >>> idx.shape, zq.shape
        (torch.Size([8, 16, 16]), torch.Size([8, 16, 16, 64]))
    """
    _check_args(z, codebook, metric)
    slower = cpp_slower("vq_lookup", dtype=z.dtype, k=codebook.shape[0], d=z.shape[-1])
    chosen = resolve_backend("vq_lookup", backend, z.device, z.dtype, slower=slower)
    lead, D = z.shape[:-1], z.shape[-1]
    rows = z.detach().reshape(-1, D)
    cosine = metric == "cosine"
    book = codebook.detach()
    if chosen == "cpp":
        idx, zq = torch.ops.pvkernels_cpp.vq_lookup(rows, book, cosine)
    elif chosen == "triton":
        idx, zq = _vq_lookup_triton(rows, book, cosine)
    else:
        idx, zq = vq_lookup_reference(rows, book, cosine)
    if codebook.requires_grad and torch.is_grad_enabled():
        zq = F.embedding(idx, codebook)  # the same rows, with the codebook's gradient
    return idx.view(lead), zq.view(*lead, D)
