"""Vector-quantisation lookup: nearest codebook entry (or the k nearest) of every vector, and the gather.

Fuses the distances, the argmin (a running top-k for k > 1) over the codebook and the gather
``zq = codebook[idx]`` into one pass over tiles of (rows x codes), replacing
``torch.cdist(z, e).argmin(1)`` / ``.topk(k, largest=False)`` (or the matmul-expansion form) that
materialises the N x K distance matrix. Distances are accumulated in fp32 as ``||e||^2 - 2 <z, e>``
(``||z||^2`` is constant per row). Limits: k <= 64; no gradient through the selection (``zq``
carries the codebook's gradient, as ``codebook[idx]`` would).
"""
from __future__ import annotations

import operator
from typing import Tuple

import torch
import torch.nn.functional as F

from .._backend import check_float, fused_slower, is_int, resolve_backend, triton, triton_interpret
from ._library import define_op
from ._triton import Launch, cdiv, run

METRICS = ("l2", "cosine")
MAX_TOPK = 64  # the most nearest codes per row the fused kernels keep (csrc/vq.cpp's kMaxTopK)


# 1. reference -------------------------------------------------------------------------------

def _codebook_scores(codebook: torch.Tensor, cosine: bool, compute: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The codebook as used in the dot products, and the per-code bias of the score."""
    e = codebook.to(compute)
    if cosine:
        e = F.normalize(e, dim=1, eps=1e-12)
        return e, torch.zeros(e.shape[0], dtype=compute, device=e.device)
    return e, e.pow(2).sum(1)


def vq_lookup_reference(z: torch.Tensor, codebook: torch.Tensor, cosine: bool,
                        k: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch oracle on (N, D) rows: argmin_k ``bias_k - 2 <z, e_k>`` (first index on ties);
    for ``k > 1`` the k smallest, (N, k), ascending by (score, index) (a NaN score counts as +inf).

    ``bias_k = ||e_k||^2`` for l2 and 0 for cosine (with unit-normalised codes; ``|z|`` does not
    change the argmax). Math in fp32 (fp64 for fp64 inputs).
    Memory traffic: reads N*D + K*D, writes and reads the N x K score matrix, writes N*k*(D+1).
    """
    compute = torch.float64 if z.dtype == torch.float64 else torch.float32
    e, bias = _codebook_scores(codebook, cosine, compute)
    scores = bias - 2.0 * (z.to(compute) @ e.T)
    if k == 1:
        idx = scores.argmin(1) if z.shape[0] else torch.empty(0, dtype=torch.int64, device=z.device)
    else:
        idx = _smallest_k(scores, k)
    return idx, codebook[idx]


def _smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest of each row, ordered by (score, index): ``topk`` fixes the k-th value but not
    which of the codes tied with it it keeps, nor their order; the first ones by index are taken,
    then a stable sort by score of the k chosen (ascending index) orders them."""
    scores = torch.where(scores.isnan(), float("inf"), scores)
    kth = scores.topk(k, dim=1, largest=False).values[:, -1:]
    below = scores < kth
    ties = scores == kth
    chosen = below | (ties & (ties.cumsum(1) <= k - below.sum(1, keepdim=True)))
    idx = chosen.nonzero()[:, 1].view(-1, k)  # row-major: ascending index within each row
    order = scores.gather(1, idx).sort(dim=1, stable=True).indices
    return idx.gather(1, order)


# 2. triton kernels --------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _vq_row_tile(z_rows, z_stride_d, row_mask, dim, DOT_FP32: tl.constexpr, ONE_CHUNK: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """The block's rows as one (BLOCK_N, BLOCK_D) tile when ONE_CHUNK (BLOCK_D >= dim): loaded
        once, outside the codebook loop. Otherwise _vq_block_scores loads them per chunk (the row
        pointers stand in, unused)."""
        z_tile = z_rows
        if ONE_CHUNK:
            ds = tl.arange(0, BLOCK_D)
            z_tile = tl.load(z_rows + ds[None, :] * z_stride_d, mask=row_mask[:, None] & (ds < dim)[None, :], other=0.0)
            if DOT_FP32:
                z_tile = z_tile.to(tl.float32)
        return z_tile

    @triton.jit
    def _vq_block_scores(z_rows, z_tile, z_stride_d, row_mask, e_ptr, e_stride_k, half_ptr, k0, n_codes, dim,
                         DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """<z, e_k> - ||e_k||^2 / 2 of the block's rows and codes k0 .. k0 + BLOCK_K, (BLOCK_N, BLOCK_K)
        fp32 (padded codes at -inf: they never win)."""
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < n_codes
        ds = tl.arange(0, BLOCK_D)
        acc = tl.broadcast_to(-tl.load(half_ptr + cols, mask=col_mask, other=float("inf"))[None, :],
                              [BLOCK_N, BLOCK_K])
        for d0 in range(0, dim, BLOCK_D):
            d_mask = (d0 + ds) < dim
            if ONE_CHUNK:
                zt = z_tile
            else:
                zt = tl.load(z_rows + (d0 + ds)[None, :] * z_stride_d, mask=row_mask[:, None] & d_mask[None, :],
                             other=0.0)
            et = tl.load(e_ptr + cols.to(tl.int64)[None, :] * e_stride_k + (d0 + ds)[:, None],
                         mask=col_mask[None, :] & d_mask[:, None], other=0.0)
            if DOT_FP32:  # fp32 products: bf16x6 on a GPU (fp32 accuracy; plain TF32 would move the argmin)
                acc = tl.dot(zt.to(tl.float32), et.to(tl.float32), acc, input_precision=PRECISION)
            else:  # fp16/bf16 l2: exact products of the stored values, fp32 sums (tensor cores)
                acc = tl.dot(zt, et, acc)
        return acc

    @triton.jit
    def _vq_gather(codebook_ptr, codebook_stride_k, code, dst, row_mask, dim, BLOCK_D: tl.constexpr):
        """dst rows (row pointers, contiguous dim) = codebook[code]."""
        ds = tl.arange(0, BLOCK_D)
        src = codebook_ptr + code[:, None] * codebook_stride_k
        for d0 in range(0, dim, BLOCK_D):
            mask = row_mask[:, None] & ((d0 + ds) < dim)[None, :]
            tl.store(dst + (d0 + ds)[None, :], tl.load(src + (d0 + ds)[None, :], mask=mask), mask=mask)

    @triton.jit(do_not_specialize=["n_rows", "n_codes"])
    def _vq_lookup_fwd_kernel(
        z_ptr, e_ptr, codebook_ptr, half_ptr, idx_ptr, zq_ptr,
        z_stride_n, z_stride_d, e_stride_k, codebook_stride_k,
        n_rows, n_codes, dim,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of rows: a running (max, argmax) of <z, e_k> - ||e_k||^2 / 2 over codebook
        blocks (the same order as argmin ||z - e_k||^2), then the gather of the winners."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * z_stride_n  # int64: N * D can pass 2**31
        z_tile = _vq_row_tile(z_rows, z_stride_d, row_mask, dim, DOT_FP32, ONE_CHUNK, BLOCK_D)
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(0, n_codes, BLOCK_K):
            acc = _vq_block_scores(z_rows, z_tile, z_stride_d, row_mask, e_ptr, e_stride_k, half_ptr, k0, n_codes, dim,
                                   DOT_FP32, PRECISION, ONE_CHUNK, BLOCK_N, BLOCK_K, BLOCK_D)
            # the first index reaching the block maximum; strict > across blocks keeps the first
            block_max, block_idx = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = block_max > best
            best = tl.where(better, block_max, best)
            best_idx = tl.where(better, k0 + block_idx, best_idx)
        tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_mask)
        _vq_gather(codebook_ptr, codebook_stride_k, best_idx.to(tl.int64), zq_ptr + rows.to(tl.int64)[:, None] * dim,
                   row_mask, dim, BLOCK_D)

    # The top-k kernel keeps each row's best (score, code) pairs as int64 keys: the score's bits
    # mapped to a signed int of the same order in the high word, 2**31 - 1 - code in the low word,
    # so a larger key is a higher score or, on an exact tie, the smaller code; keys are unique,
    # one max or min yields both halves, and KEY_NONE (the score -inf over a low word of 0) is
    # below every code's key.
    @triton.jit
    def _vq_topk_key(score, code):
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as the float compare has it
        bits = score.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return (ordered.to(tl.int64) << 32) | (2147483647 - code).to(tl.int64)

    @triton.jit
    def _vq_topk_score(key):
        high = (key >> 32).to(tl.int32)
        return (high ^ ((high >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=["n_rows", "n_codes", "k"])
    def _vq_topk_fwd_kernel(
        z_ptr, e_ptr, codebook_ptr, half_ptr, idx_ptr, zq_ptr,
        z_stride_n, z_stride_d, e_stride_k, codebook_stride_k,
        n_rows, n_codes, dim, k,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, K_TOP: tl.constexpr,
    ):
        """One block of rows: the scores of _vq_lookup_fwd_kernel, block by block, into a running
        top-k per row (the keys of k of K_TOP slots, unsorted); then the k best in order, and their
        codes.

        A block's codes can enter only where they reach the row's k-th best score: they are
        counted, and the block is walked best first (one max with the first index per step, so in
        (score, code) order) for as many steps as the fullest row needs, at most k; each step puts
        a row's best remaining code in place of its worst kept key, if better. Past the first
        blocks, few codes of a block reach a row's k-th best."""
        KEY_NONE: tl.constexpr = -9187343244130779136  # _vq_topk_key(-inf, 2**31 - 1)
        KEY_KEPT: tl.constexpr = 9223372036854775807  # slots >= k: above every key, never replaced
        LOWEST: tl.constexpr = -3.4028234663852886e38  # every real score is >= this; -inf marks "no code"
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * z_stride_n  # int64: N * D can pass 2**31
        slots = tl.arange(0, K_TOP)
        top = tl.where(slots[None, :] < k, tl.full([BLOCK_N, K_TOP], KEY_NONE, tl.int64),
                       tl.full([BLOCK_N, K_TOP], KEY_KEPT, tl.int64))
        z_tile = _vq_row_tile(z_rows, z_stride_d, row_mask, dim, DOT_FP32, ONE_CHUNK, BLOCK_D)
        for k0 in range(0, n_codes, BLOCK_K):
            acc = _vq_block_scores(z_rows, z_tile, z_stride_d, row_mask, e_ptr, e_stride_k, half_ptr, k0, n_codes, dim,
                                   DOT_FP32, PRECISION, ONE_CHUNK, BLOCK_N, BLOCK_K, BLOCK_D)
            col_mask = k0 + tl.arange(0, BLOCK_K) < n_codes
            # NaN and -inf scores rank last, as the lowest float (ties by code), so -inf is free to
            # mark what is not (or no longer) a candidate
            acc = tl.where(acc >= LOWEST, acc, LOWEST)
            # the candidates: codes at or above the row's k-th best score (every code while slots are empty)
            worst = _vq_topk_score(tl.min(top, axis=1))
            live = col_mask[None, :] & (acc >= worst[:, None])
            steps = tl.minimum(tl.max(tl.sum(live.to(tl.int32), axis=1), axis=0), k)
            if steps > 0:
                cand = tl.where(live, acc, float("-inf"))
                at_block = tl.arange(0, BLOCK_K)
                for _ in range(steps):
                    best, at = tl.max(cand, axis=1, return_indices=True, return_indices_tie_break_left=True)
                    key = _vq_topk_key(best, k0 + at)
                    kept, slot = tl.min(top, axis=1, return_indices=True)
                    take = (best > float("-inf")) & (key > kept)
                    top = tl.where((slots[None, :] == slot[:, None]) & take[:, None], key[:, None], top)
                    cand = tl.where(at_block[None, :] == at[:, None], float("-inf"), cand)
        top = tl.where(slots[None, :] < k, top, KEY_NONE)
        out_rows = rows.to(tl.int64) * k
        for j in range(0, k):
            best = tl.max(top, axis=1)
            top = tl.where(top == best[:, None], KEY_NONE, top)
            code = 2147483647 - (best - ((best >> 32) << 32))
            tl.store(idx_ptr + out_rows + j, code, mask=row_mask)
            _vq_gather(codebook_ptr, codebook_stride_k, code, zq_ptr + (out_rows + j)[:, None] * dim, row_mask, dim,
                       BLOCK_D)


# 3. launchers -------------------------------------------------------------------------------

def _tile(block_n: int, block_k: int, warps: int, stages: int):
    return triton.Config(dict(BLOCK_N=block_n, BLOCK_K=block_k), num_warps=warps, num_stages=stages)


if triton is not None:
    # (rows, codes) tiles, autotuned on a GPU per (codebook size, dim): a GEMM-shaped product whose
    # best tile depends on the part; every one of them compiles without spilling for sm_80 / sm_90
    # (tests/test_triton_compile.py). fp32 operands are split in three for the tensor cores, so
    # their tiles are half as tall.
    _TUNED = {
        dot_fp32: triton.autotune(configs, key=["n_codes", "dim"])(_vq_lookup_fwd_kernel)
        for dot_fp32, configs in ((False, [_tile(128, 64, 8, 3), _tile(64, 128, 8, 3), _tile(64, 64, 8, 3)]),
                                  (True, [_tile(64, 64, 8, 3), _tile(64, 32, 4, 3), _tile(32, 64, 4, 3)]))
    }
    # top-k: the slots of the running top-k (int64 keys) stay in registers beside the block of
    # scores, so the tiles are smaller than the argmin's and double buffered (fp32 operands at
    # 64 x 64 spilled for sm_80 with 64 slots, at 4 warps they took 240-255 registers)
    _TUNED_TOPK = {
        dot_fp32: triton.autotune(configs, key=["n_codes", "dim", "K_TOP"])(_vq_topk_fwd_kernel)
        for dot_fp32, configs in ((False, [_tile(64, 64, 8, 2), _tile(32, 64, 8, 2)]),
                                  (True, [_tile(32, 64, 8, 2)]))
    }


def _config(D: int, dot_fp32: bool) -> dict:
    """The feature chunk (a whole row up to 64 features, then 64 wide; 32 for fp32 operands) and
    the dot settings. The interpreter takes one fixed tile, few and large blocks (it pays per
    program and per loop step, not per element)."""
    BLOCK_D = min(32 if dot_fp32 and not triton_interpret() else 64, max(16, triton.next_power_of_2(D)))
    cfg = dict(BLOCK_D=BLOCK_D, ONE_CHUNK=BLOCK_D >= D, DOT_FP32=dot_fp32)
    if triton_interpret():
        return dict(cfg, BLOCK_N=64, BLOCK_K=256, PRECISION="ieee")
    return dict(cfg, PRECISION="bf16x6")


def _top_slots(k: int) -> int:
    """The running top-k's slots: few classes of k (each is one compiled kernel per tile)."""
    return next(slots for slots in (8, 32, MAX_TOPK) if k <= slots)


def _vq_lookup_launches(z, codebook, e, half, idx, zq, dot_fp32, k: int = 1) -> list:
    N, D = z.shape
    args = (z, e, codebook, half, idx, zq, z.stride(0), z.stride(1), e.stride(0), codebook.stride(0),
            N, codebook.shape[0], D)
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    if k == 1:
        kernel = _vq_lookup_fwd_kernel if triton_interpret() else _TUNED[dot_fp32]
        return [Launch(kernel, grid, args, _config(D, dot_fp32))]
    if triton_interpret():
        return [Launch(_vq_topk_fwd_kernel, grid, args + (k,), dict(_config(D, dot_fp32), K_TOP=_top_slots(k)))]
    # maxnreg: left to itself, ptxas held some tiles to 128 registers (two blocks per SM) by spilling
    return [Launch(_TUNED_TOPK[dot_fp32], grid, args + (k,),
                   dict(_config(D, dot_fp32), K_TOP=_top_slots(k), maxnreg=255))]


def _vq_lookup_triton_impl(z: torch.Tensor, codebook: torch.Tensor, cosine: bool,
                           k: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    N, D = z.shape
    idx = torch.empty((N,) if k == 1 else (N, k), dtype=torch.int64, device=z.device)
    zq = torch.empty((N, D) if k == 1 else (N, k, D), dtype=codebook.dtype, device=z.device)
    if N == 0:
        return idx, zq
    codebook = codebook.contiguous()
    e, bias = _codebook_scores(codebook, cosine, torch.float32)
    # fp16/bf16 l2 on a GPU: tensor-core dots on the codebook as stored; otherwise fp32 products
    # (the interpreter's bf16 dot is wrong, cosine codes are normalised in fp32)
    dot_fp32 = triton_interpret() or cosine or z.dtype == torch.float32
    e = e.contiguous() if dot_fp32 else codebook
    run(_vq_lookup_launches(z, codebook, e, bias * 0.5, idx, zq, dot_fp32, k))
    return idx, zq


def _vq_lookup_fake(z: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    N, D = z.shape
    return z.new_empty((N,), dtype=torch.int64), codebook.new_empty((N, D))


def _vq_lookup_topk_fake(z: torch.Tensor, codebook: torch.Tensor, cosine: bool,
                         k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    N, D = z.shape
    return z.new_empty((N, k), dtype=torch.int64), codebook.new_empty((N, k, D))


def _vq_lookup_topk_triton_impl(z: torch.Tensor, codebook: torch.Tensor, cosine: bool,
                                k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _vq_lookup_triton_impl(z, codebook, cosine, k)


# 4. the C++ and Triton ops ---------------------------------------------------------------
# torch.ops.pvkernels_cpp.vq_lookup and vq_lookup_topk (csrc/vq.cpp) and their Triton stand-ins,
# one schema each, as csrc/registration.cpp declares them (tests/test_schemas.py).

_SCHEMA = "(Tensor z, Tensor codebook, bool cosine) -> (Tensor, Tensor)"
_SCHEMA_TOPK = "(Tensor z, Tensor codebook, bool cosine, int k) -> (Tensor, Tensor)"
_LOOKUP = define_op("vq_lookup", _SCHEMA, _vq_lookup_triton_impl, _vq_lookup_fake)
_LOOKUP_TOPK = define_op("vq_lookup_topk", _SCHEMA_TOPK, _vq_lookup_topk_triton_impl, _vq_lookup_topk_fake)


# 5. public function ------------------------------------------------------------------------

def _check_args(z, codebook, metric, k=1):
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
    if not is_int(k):
        raise TypeError(f"vq_lookup: k must be an int, got {type(k).__name__} {k!r}")
    k = operator.index(k)
    if not 1 <= k <= K:
        raise ValueError(f"vq_lookup: k must be between 1 and K = {K} (the codebook size), got k = {k}")
    if k > MAX_TOPK:
        raise ValueError(f"vq_lookup: k = {k} is more than the {MAX_TOPK} nearest codes per row the kernels keep")
    return k


def vq_lookup(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", backend: str = "auto", *,
              k: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Finds the nearest codebook entry (or the ``k`` nearest) of every vector of ``z`` and gathers it.

    ``metric="l2"``: ``idx = argmin_k ||z - e_k||^2``; ``metric="cosine"``:
    ``idx = argmax_k <z / |z|, e_k / |e_k|>``. Exact ties go to the smallest ``k``. With ``k > 1``,
    the k nearest codes, nearest first (exact ties by index; ``idx[..., 0]`` is the ``k=1`` answer).
    Scores are accumulated in fp32 (fp64 for fp64 inputs, reference backend only). The cpp and
    triton backends never build the N x K distance matrix (extra memory O(tile)).

    Args:
        z: vectors, floating point (fp32/fp16/bf16; fp64 with the reference backend).
        codebook: the K codes, same dtype and device as ``z``.
        metric: "l2" or "cosine".
        backend: "auto", "triton", "cpp" or "reference" (env ``PVKERNELS_BACKEND`` overrides auto).
        k: how many nearest codes per vector, 1 to min(K, 64) (keyword only).

    Returns:
        ``(idx, zq)``: int64 code indices and ``zq = codebook[idx]`` (contiguous, the codebook's
        dtype). ``zq`` is differentiable with respect to the codebook, not to ``z``.

    Shape:
        z: (..., D), codebook: (K, D) -> idx: (...), zq: (..., D) for k = 1;
        idx: (..., k), zq: (..., k, D) for k > 1.

    Example:
        >>> codebook = torch.randn(512, 64)
        >>> z = torch.randn(8, 16, 16, 64)
        >>> idx, zq = pvkernels.vq_lookup(z, codebook)
        >>> idx.shape, zq.shape
        (torch.Size([8, 16, 16]), torch.Size([8, 16, 16, 64]))
        >>> idx, zq = pvkernels.vq_lookup(z, codebook, k=4)
        >>> idx.shape, zq.shape
        (torch.Size([8, 16, 16, 4]), torch.Size([8, 16, 16, 4, 64]))
    """
    k = _check_args(z, codebook, metric, k)
    # the measured crossover is the argmin's; the top-k reference also holds and ranks the N x K scores
    slower = fused_slower("vq_lookup", dtype=z.dtype, k=codebook.shape[0], d=z.shape[-1]) if k == 1 else None
    chosen = resolve_backend("vq_lookup", backend, z.device, z.dtype, slower=slower)
    lead, D = z.shape[:-1], z.shape[-1]
    rows = z.detach().reshape(-1, D)
    cosine = metric == "cosine"
    book = codebook.detach()
    if chosen != "reference":
        idx, zq = _LOOKUP[chosen](rows, book, cosine) if k == 1 else _LOOKUP_TOPK[chosen](rows, book, cosine, k)
    else:
        idx, zq = vq_lookup_reference(rows, book, cosine, k)
    if codebook.requires_grad and torch.is_grad_enabled():
        zq = F.embedding(idx, codebook)  # the same rows, with the codebook's gradient
    if k == 1:
        return idx.view(lead), zq.view(*lead, D)
    return idx.view(*lead, k), zq.view(*lead, k, D)
