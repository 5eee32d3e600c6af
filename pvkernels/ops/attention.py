"""Factorised spatio-temporal attention on (B, T, S, H, Dh) tokens, read and written in place.

Replaces "permute to a batch of sequences, SDPA, permute back" for spatial attention (over the
S tokens of a frame, per (b, t, h)) and temporal attention (over the T frames of a position,
per (b, s, h), causal by default). One kernel family serves both: the tensor is seen as
(b, a, n, h, d) with n the attended axis, so any strides work (q, k, v may be views of one
packed (B, T, S, 3, H, Dh) projection). Additive bias (H, N, N) with its gradient; fp32
softmax; forward saves only the log-sum-exp, backward recomputes P. Limits: Dh <= 256 on the
cpp kernels, <= 128 on the triton ones (backend="auto" falls back to the reference beyond); the cpp backward keeps
a per-thread (H, N, N) fp32 accumulator when the bias needs a gradient.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .._backend import check_float, fused_slower, resolve_backend, triton, triton_interpret
from ._library import define_op
from ._triton import Launch, cdiv, run

# The largest head dim each fused backend takes (csrc/attention.h's kMaxHeadDim; the Triton
# kernels keep a Dh row of every tile in registers); "auto" takes the reference beyond.
MAX_HEAD_DIM = {"cpp": 256, "triton": 128}


def fused_head_dim_limit(device: torch.device) -> int:
    """The head-dim limit of the fused backend "auto" takes on ``device``."""
    return MAX_HEAD_DIM["triton" if device.type == "cuda" else "cpp"]


# 1. reference -------------------------------------------------------------------------------

def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                        temporal: bool, causal: bool) -> torch.Tensor:
    """Plain PyTorch oracle: permute into a batch of sequences, SDPA, permute back.

    Memory traffic: reads q, k, v and writes o, plus a permuted copy of each of the four (the
    copies are what the fused kernels avoid). Differentiable through autograd (bias included).
    """
    B, T, S, H, D = q.shape
    perm = (0, 2, 3, 1, 4) if temporal else (0, 1, 3, 2, 4)  # -> (B, A, H, N, D)
    N = T if temporal else S
    qq, kk, vv = (x.permute(perm).reshape(-1, H, N, D) for x in (q, k, v))
    mask = None
    if bias is not None:
        mask = bias.to(q.dtype)
        if causal:
            future = torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1)
            mask = mask.masked_fill(future, float("-inf"))
    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=causal and bias is None)
    o = o.reshape(B, q.shape[2] if temporal else T, H, N, D)
    inverse = (0, 3, 1, 2, 4) if temporal else (0, 1, 3, 2, 4)
    return o.permute(inverse).contiguous()


# 2. triton kernels --------------------------------------------------------------------------
# Forward: one program per (sequence, BLOCK_M queries), online softmax over BLOCK_N key blocks.
# Backward in the shape of Triton's tutorial 06: a delta kernel, a dK/dV kernel (one key block,
# loop over queries) and a dQ kernel (one query block, loop over keys). A fp16/bf16 sequence that
# fits one block (temporal attention, T <= 32) takes one launch of a kernel of its own instead: its
# program sees every query and key, so it forms delta = rowsum(P * dP), dQ, dK, dV and dbias at once.
# A tensor is seen as (b, a, n, h, d) and passed with its strides by name: q_stride_b, ..., q_stride_d.

if triton is not None:
    import triton.language as tl

    # plain runtime arguments, never specialised (a size of 1 would otherwise be a new binary).
    # The causal mask and the dbias atomics are runtime flags; the bias is a constexpr: a
    # conditional tile load inside the pipelined key loop costs ~100 registers (spills).
    _RUNTIME = ["bias_stride_h", "bias_stride_m", "n_other", "n_seq", "n_heads", "head_dim", "causal"]

    @triton.jit
    def _sequence(row, n_other, n_heads):
        # int64 offsets: B * T * S * H * Dh passes 2**31 in real runs
        h = (row % n_heads).to(tl.int64)
        ba = row // n_heads
        return (ba // n_other).to(tl.int64), (ba % n_other).to(tl.int64), h

    @triton.jit
    def _sequence_offset(b, a, h, stride_b, stride_a, stride_h):
        """Where sequence (b, a, h) starts in a tensor seen as (b, a, n, h[, d]), in elements (int64, as
        b, a, h are). Tensors of one layout share it: lse and delta; dq, dk and dv."""
        return b * stride_b + a * stride_a + h * stride_h

    @triton.jit
    def _sequence_base(ptr, b, a, h, stride_b, stride_a, stride_h):
        """The base pointer of sequence (b, a, h) of one tensor."""
        return ptr + _sequence_offset(b, a, h, stride_b, stride_a, stride_h)

    @triton.jit
    def _mm(a, b, PRECISION: tl.constexpr):
        """a @ b with fp32 sums. fp16/bf16 operands: the tensor cores. fp32 ones: PRECISION, "tf32x3"
        on a GPU (each operand split into a TF32 high and low part, three tensor-core products:
        fp32 accuracy; CUDA-core "ieee" dots hold whole K rows per thread and spill, "bf16x6"
        holds three parts and spills at head dim 128), "ieee" in the interpreter."""
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision=PRECISION)
        else:
            return tl.dot(a, b)

    @triton.jit
    def _load_rows(base, offs_n, stride_n, offs_d, stride_d, mask, UPCAST: tl.constexpr):
        """The (len(offs_n), BLOCK_D) tile of one sequence's rows, zero where masked; fp32 when UPCAST."""
        x = tl.load(base + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _store_rows(base, offs_n, stride_n, offs_d, stride_d, x, mask):
        """Stores the (len(offs_n), BLOCK_D) tile x in the tensor's dtype."""
        tl.store(base + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d,
                 x.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _scores(q, k, scale, bias_ptr, h, bias_stride_h, bias_stride_m, bias_stride_n, offs_m, offs_n, mask_m,
                mask_n, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        """q k^T * scale (+ bias[h]) in fp32, (BLOCK_M, BLOCK_N)."""
        s = _mm(q, tl.trans(k), PRECISION) * scale
        if HAS_BIAS:
            s += tl.load(bias_ptr + h * bias_stride_h + offs_m[:, None] * bias_stride_m
                         + offs_n[None, :] * bias_stride_n, mask=mask_m[:, None] & mask_n[None, :],
                         other=0.0).to(tl.float32)
        return s

    @triton.jit
    def _probs(q, k, lse, scale, bias_ptr, h, bias_stride_h, bias_stride_m, bias_stride_n, offs_m, offs_n, mask_m,
               mask_n, causal, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        """P = exp(scores - lse) in fp32, (BLOCK_M, BLOCK_N), zero outside the sequence / the causal mask."""
        s = _scores(q, k, scale, bias_ptr, h, bias_stride_h, bias_stride_m, bias_stride_n, offs_m, offs_n, mask_m,
                    mask_n, HAS_BIAS, PRECISION)
        valid = mask_m[:, None] & mask_n[None, :] & ((causal == 0) | (offs_n[None, :] <= offs_m[:, None]))
        return tl.where(valid, tl.exp(s - lse[:, None]), 0.0)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, lse_ptr,
        q_stride_b, q_stride_a, q_stride_n, q_stride_h, q_stride_d,
        k_stride_b, k_stride_a, k_stride_n, k_stride_h, k_stride_d,
        v_stride_b, v_stride_a, v_stride_n, v_stride_h, v_stride_d,
        o_stride_b, o_stride_a, o_stride_n, o_stride_h, o_stride_d,
        lse_stride_b, lse_stride_a, lse_stride_n, lse_stride_h,
        bias_stride_h, bias_stride_m, bias_stride_n,
        n_other, n_seq, n_heads, head_dim, scale,
        causal, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """One (b, a, h) sequence x BLOCK_M queries; online softmax over BLOCK_N key blocks."""
        if HEAD_DIM > 0:  # see _head_dim_meta
            head_dim = HEAD_DIM
            q_stride_h, k_stride_h, v_stride_h, o_stride_h = HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM
        b, a, h = _sequence(tl.program_id(0), n_other, n_heads)
        start_m = tl.program_id(1) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < n_seq
        mask_d = offs_d < head_dim
        qd_mask = mask_m[:, None] & mask_d[None, :]
        q = _load_rows(_sequence_base(q_ptr, b, a, h, q_stride_b, q_stride_a, q_stride_h), offs_m, q_stride_n,
                       offs_d, q_stride_d, qd_mask, UPCAST)
        k_base = _sequence_base(k_ptr, b, a, h, k_stride_b, k_stride_a, k_stride_h)
        v_base = _sequence_base(v_ptr, b, a, h, v_stride_b, v_stride_a, v_stride_h)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end_n = n_seq
        if causal:
            end_n = tl.minimum(n_seq, start_m + BLOCK_M)
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_seq
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = _load_rows(k_base, offs_n, k_stride_n, offs_d, k_stride_d, kv_mask, UPCAST)
            v = _load_rows(v_base, offs_n, v_stride_n, offs_d, v_stride_d, kv_mask, UPCAST)
            s = _scores(q, k, scale, bias_ptr, h, bias_stride_h, bias_stride_m, bias_stride_n, offs_m, offs_n, mask_m,
                        mask_n, HAS_BIAS, PRECISION)
            # padded query rows (offs_m >= n_seq) still see key 0: no all -inf row, no NaN
            valid = mask_n[None, :] & ((causal == 0) | (offs_n[None, :] <= offs_m[:, None]))
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row whose keys so far are all masked (a -inf bias) keeps m = -inf: 0 is subtracted
            # there instead, so that exp(-inf) = 0 where exp(-inf - -inf) would be NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_sub)
            p = tl.exp(s - m_sub[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
            m_i = m_new
        # a query whose every key is masked (l = 0): a zero row, as SDPA gives, and lse = +inf, so
        # that the backward's P = exp(s - lse) is 0 there too (0 / 0 and -inf - -inf would be NaN)
        empty = l_i == 0.0
        l_i = tl.where(empty, 1.0, l_i)
        acc = acc / l_i[:, None]
        _store_rows(_sequence_base(o_ptr, b, a, h, o_stride_b, o_stride_a, o_stride_h), offs_m, o_stride_n, offs_d,
                    o_stride_d, acc, qd_mask)
        lse_base = _sequence_base(lse_ptr, b, a, h, lse_stride_b, lse_stride_a, lse_stride_h)
        tl.store(lse_base + offs_m.to(tl.int64) * lse_stride_n, tl.where(empty, float("inf"), m_i + tl.log(l_i)),
                 mask=mask_m)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _attention_bwd_delta_kernel(
        do_ptr, o_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, lse_ptr, delta_ptr,
        do_stride_b, do_stride_a, do_stride_n, do_stride_h, do_stride_d,
        o_stride_b, o_stride_a, o_stride_n, o_stride_h, o_stride_d,
        q_stride_b, q_stride_a, q_stride_n, q_stride_h, q_stride_d,
        k_stride_b, k_stride_a, k_stride_n, k_stride_h, k_stride_d,
        v_stride_b, v_stride_a, v_stride_n, v_stride_h, v_stride_d,
        lse_stride_b, lse_stride_a, lse_stride_n, lse_stride_h,
        bias_stride_h, bias_stride_m, bias_stride_n,
        n_other, n_seq, n_heads, head_dim, scale,
        causal, HAS_BIAS: tl.constexpr, RECOMPUTE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """delta = rowsum(dO * O) = rowsum(P * dP) of BLOCK_M queries, in fp32. RECOMPUTE (fp16/bf16,
        whose stored O is rounded): rowsum(P * dP) with P recomputed from lse, over the key blocks.
        delta has lse's layout (lse_stride_*)."""
        if HEAD_DIM > 0:  # see _head_dim_meta
            head_dim = HEAD_DIM
            (do_stride_h, o_stride_h, q_stride_h, k_stride_h, v_stride_h) = (
                HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM)
        b, a, h = _sequence(tl.program_id(0), n_other, n_heads)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < n_seq
        qd_mask = mask_m[:, None] & (offs_d < head_dim)[None, :]
        do = _load_rows(_sequence_base(do_ptr, b, a, h, do_stride_b, do_stride_a, do_stride_h), offs_m, do_stride_n,
                        offs_d, do_stride_d, qd_mask, UPCAST)
        lse_off = (_sequence_offset(b, a, h, lse_stride_b, lse_stride_a, lse_stride_h)
                   + offs_m.to(tl.int64) * lse_stride_n)
        if RECOMPUTE:
            q = _load_rows(_sequence_base(q_ptr, b, a, h, q_stride_b, q_stride_a, q_stride_h), offs_m, q_stride_n,
                           offs_d, q_stride_d, qd_mask, UPCAST)
            lse = tl.load(lse_ptr + lse_off, mask=mask_m, other=0.0)
            k_base = _sequence_base(k_ptr, b, a, h, k_stride_b, k_stride_a, k_stride_h)
            v_base = _sequence_base(v_ptr, b, a, h, v_stride_b, v_stride_a, v_stride_h)
            delta = tl.zeros([BLOCK_M], tl.float32)
            end_n = n_seq
            if causal:
                end_n = tl.minimum(n_seq, tl.program_id(1) * BLOCK_M + BLOCK_M)
            for start_n in range(0, end_n, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                mask_n = offs_n < n_seq
                kv_mask = mask_n[:, None] & (offs_d < head_dim)[None, :]
                k = _load_rows(k_base, offs_n, k_stride_n, offs_d, k_stride_d, kv_mask, UPCAST)
                v = _load_rows(v_base, offs_n, v_stride_n, offs_d, v_stride_d, kv_mask, UPCAST)
                p = _probs(q, k, lse, scale, bias_ptr, h, bias_stride_h, bias_stride_m, bias_stride_n, offs_m, offs_n,
                           mask_m, mask_n, causal, HAS_BIAS, PRECISION)
                delta += tl.sum(p * _mm(do, tl.trans(v), PRECISION), 1)
        else:
            o = _load_rows(_sequence_base(o_ptr, b, a, h, o_stride_b, o_stride_a, o_stride_h), offs_m, o_stride_n,
                           offs_d, o_stride_d, qd_mask, UPCAST)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(delta_ptr + lse_off, delta, mask=mask_m)

    @triton.jit(do_not_specialize=_RUNTIME + ["bias_grad"])
    def _attention_bwd_fused_kernel(
        do_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr,
        do_stride_b, do_stride_a, do_stride_n, do_stride_h, do_stride_d,
        q_stride_b, q_stride_a, q_stride_n, q_stride_h, q_stride_d,
        k_stride_b, k_stride_a, k_stride_n, k_stride_h, k_stride_d,
        v_stride_b, v_stride_a, v_stride_n, v_stride_h, v_stride_d,
        grad_stride_b, grad_stride_a, grad_stride_n, grad_stride_h, grad_stride_d,
        lse_stride_b, lse_stride_a, lse_stride_n, lse_stride_h,
        bias_stride_h, bias_stride_m, bias_stride_n,
        n_other, n_seq, n_heads, head_dim, scale,
        causal, bias_grad, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """The whole backward of one (b, a, h) sequence that fits one block, its queries and keys the
        same rows (n_seq <= BLOCK_M == BLOCK_N): P from lse, delta = rowsum(P * dP) in place of the
        delta kernel, dQ, dK, dV; dq/dk/dv share the grad_stride_* layout; dbias (H, N, N) fp32 is
        summed over (b, a) atomically."""
        tl.static_assert(BLOCK_M == BLOCK_N)
        if HEAD_DIM > 0:  # see _head_dim_meta
            head_dim = HEAD_DIM
            (do_stride_h, q_stride_h, k_stride_h, v_stride_h, grad_stride_h) = (
                HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM)
        b, a, h = _sequence(tl.program_id(0), n_other, n_heads)
        # the block starts at program_id(1) * BLOCK_N = 0 (grid (rows, 1)), written as in the dK/dV
        # kernel: without it ptxas moved 50 of the 64 variants by -42 to +19 registers (triton 3.8)
        start_n = tl.program_id(1) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < n_seq
        mask_d = offs_d < head_dim
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _load_rows(_sequence_base(k_ptr, b, a, h, k_stride_b, k_stride_a, k_stride_h), offs_n, k_stride_n,
                       offs_d, k_stride_d, kv_mask, UPCAST)
        v = _load_rows(_sequence_base(v_ptr, b, a, h, v_stride_b, v_stride_a, v_stride_h), offs_n, v_stride_n,
                       offs_d, v_stride_d, kv_mask, UPCAST)
        q_base = _sequence_base(q_ptr, b, a, h, q_stride_b, q_stride_a, q_stride_h)
        do_base = _sequence_base(do_ptr, b, a, h, do_stride_b, do_stride_a, do_stride_h)
        lse_off = _sequence_offset(b, a, h, lse_stride_b, lse_stride_a, lse_stride_h)
        grad_off = _sequence_offset(b, a, h, grad_stride_b, grad_stride_a, grad_stride_h)
        offs_m = offs_n
        mask_m = mask_n
        q = _load_rows(q_base, offs_m, q_stride_n, offs_d, q_stride_d, kv_mask, UPCAST)
        do = _load_rows(do_base, offs_m, do_stride_n, offs_d, do_stride_d, kv_mask, UPCAST)
        lse = tl.load(lse_ptr + lse_off + offs_m.to(tl.int64) * lse_stride_n, mask=mask_m, other=0.0)
        p = _probs(q, k, lse, scale, bias_ptr, h, bias_stride_h, bias_stride_m, bias_stride_n, offs_m, offs_n,
                   mask_m, mask_n, causal, HAS_BIAS, PRECISION)
        dp = _mm(do, tl.trans(v), PRECISION)
        delta = tl.sum(p * dp, 1)
        # over the row's sum of P, 1 only up to lse's rounding (csrc/attention.h, softmax_renorm; a
        # sum ~0: an all-masked row). fp32 only: 16-bit operands round far more than lse, and with
        # it two 16-bit variants spilled
        if do_ptr.dtype.element_ty == tl.float32:
            p_sum = tl.sum(p, 1)
            delta *= 1.0 / tl.where(p_sum > 0.5, p_sum, 1.0)
        ds = p * (dp - delta[:, None])
        dv = _mm(tl.trans(p.to(do.dtype)), do, PRECISION)
        dk = _mm(tl.trans(ds.to(q.dtype)), q, PRECISION)
        dq = _mm(ds.to(k.dtype), k, PRECISION)
        _store_rows(dq_ptr + grad_off, offs_m, grad_stride_n, offs_d, grad_stride_d, dq * scale, kv_mask)
        if bias_grad:
            tl.atomic_add(dbias_ptr + h * n_seq * n_seq + offs_m[:, None] * n_seq + offs_n[None, :], ds,
                          mask=mask_m[:, None] & mask_n[None, :])
        # one offset tensor for dK and dV (_store_rows each moved 36 of the 64 variants' registers)
        out_off = grad_off + offs_n[:, None].to(tl.int64) * grad_stride_n + offs_d[None, :] * grad_stride_d
        tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _attention_bwd_dkdv_kernel(
        do_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        do_stride_b, do_stride_a, do_stride_n, do_stride_h, do_stride_d,
        q_stride_b, q_stride_a, q_stride_n, q_stride_h, q_stride_d,
        k_stride_b, k_stride_a, k_stride_n, k_stride_h, k_stride_d,
        v_stride_b, v_stride_a, v_stride_n, v_stride_h, v_stride_d,
        grad_stride_b, grad_stride_a, grad_stride_n, grad_stride_h, grad_stride_d,
        lse_stride_b, lse_stride_a, lse_stride_n, lse_stride_h,
        bias_stride_h, bias_stride_m, bias_stride_n,
        n_other, n_seq, n_heads, head_dim, scale,
        causal, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """One key block, loop over the query blocks -> dK, dV (P recomputed from lse). dk/dv share
        the grad_stride_* layout, delta lse's."""
        if HEAD_DIM > 0:  # see _head_dim_meta
            head_dim = HEAD_DIM
            (do_stride_h, q_stride_h, k_stride_h, v_stride_h, grad_stride_h) = (
                HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM)
        b, a, h = _sequence(tl.program_id(0), n_other, n_heads)
        start_n = tl.program_id(1) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < n_seq
        mask_d = offs_d < head_dim
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _load_rows(_sequence_base(k_ptr, b, a, h, k_stride_b, k_stride_a, k_stride_h), offs_n, k_stride_n,
                       offs_d, k_stride_d, kv_mask, UPCAST)
        v = _load_rows(_sequence_base(v_ptr, b, a, h, v_stride_b, v_stride_a, v_stride_h), offs_n, v_stride_n,
                       offs_d, v_stride_d, kv_mask, UPCAST)
        q_base = _sequence_base(q_ptr, b, a, h, q_stride_b, q_stride_a, q_stride_h)
        do_base = _sequence_base(do_ptr, b, a, h, do_stride_b, do_stride_a, do_stride_h)
        lse_off = _sequence_offset(b, a, h, lse_stride_b, lse_stride_a, lse_stride_h)
        grad_off = _sequence_offset(b, a, h, grad_stride_b, grad_stride_a, grad_stride_h)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = 0
        if causal:
            lo = start_n // BLOCK_M * BLOCK_M  # earlier queries see none of these keys
        for start_m in range(lo, n_seq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < n_seq
            qd_mask = mask_m[:, None] & mask_d[None, :]
            q = _load_rows(q_base, offs_m, q_stride_n, offs_d, q_stride_d, qd_mask, UPCAST)
            do = _load_rows(do_base, offs_m, do_stride_n, offs_d, do_stride_d, qd_mask, UPCAST)
            lse = tl.load(lse_ptr + lse_off + offs_m.to(tl.int64) * lse_stride_n, mask=mask_m, other=0.0)
            delta = tl.load(delta_ptr + lse_off + offs_m.to(tl.int64) * lse_stride_n, mask=mask_m, other=0.0)
            p = _probs(q, k, lse, scale, bias_ptr, h, bias_stride_h, bias_stride_m, bias_stride_n, offs_m, offs_n,
                       mask_m, mask_n, causal, HAS_BIAS, PRECISION)
            dv += _mm(tl.trans(p.to(do.dtype)), do, PRECISION)
            ds = p * (_mm(do, tl.trans(v), PRECISION) - delta[:, None])
            dk += _mm(tl.trans(ds.to(q.dtype)), q, PRECISION)
        _store_rows(dk_ptr + grad_off, offs_n, grad_stride_n, offs_d, grad_stride_d, dk * scale, kv_mask)
        _store_rows(dv_ptr + grad_off, offs_n, grad_stride_n, offs_d, grad_stride_d, dv, kv_mask)

    @triton.jit(do_not_specialize=_RUNTIME + ["bias_grad"])
    def _attention_bwd_dq_kernel(
        do_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, lse_ptr, delta_ptr, dq_ptr, dbias_ptr,
        do_stride_b, do_stride_a, do_stride_n, do_stride_h, do_stride_d,
        q_stride_b, q_stride_a, q_stride_n, q_stride_h, q_stride_d,
        k_stride_b, k_stride_a, k_stride_n, k_stride_h, k_stride_d,
        v_stride_b, v_stride_a, v_stride_n, v_stride_h, v_stride_d,
        grad_stride_b, grad_stride_a, grad_stride_n, grad_stride_h, grad_stride_d,
        lse_stride_b, lse_stride_a, lse_stride_n, lse_stride_h,
        bias_stride_h, bias_stride_m, bias_stride_n,
        n_other, n_seq, n_heads, head_dim, scale,
        causal, bias_grad, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """One query block, loop over the key blocks -> dQ, and dbias (summed over (b, a) atomically)."""
        if HEAD_DIM > 0:  # see _head_dim_meta
            head_dim = HEAD_DIM
            (do_stride_h, q_stride_h, k_stride_h, v_stride_h, grad_stride_h) = (
                HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM, HEAD_DIM)
        b, a, h = _sequence(tl.program_id(0), n_other, n_heads)
        start_m = tl.program_id(1) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < n_seq
        mask_d = offs_d < head_dim
        qd_mask = mask_m[:, None] & mask_d[None, :]
        q = _load_rows(_sequence_base(q_ptr, b, a, h, q_stride_b, q_stride_a, q_stride_h), offs_m, q_stride_n,
                       offs_d, q_stride_d, qd_mask, UPCAST)
        do = _load_rows(_sequence_base(do_ptr, b, a, h, do_stride_b, do_stride_a, do_stride_h), offs_m, do_stride_n,
                        offs_d, do_stride_d, qd_mask, UPCAST)
        lse_off = (_sequence_offset(b, a, h, lse_stride_b, lse_stride_a, lse_stride_h)
                   + offs_m.to(tl.int64) * lse_stride_n)
        lse = tl.load(lse_ptr + lse_off, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + lse_off, mask=mask_m, other=0.0)
        k_base = _sequence_base(k_ptr, b, a, h, k_stride_b, k_stride_a, k_stride_h)
        v_base = _sequence_base(v_ptr, b, a, h, v_stride_b, v_stride_a, v_stride_h)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end_n = n_seq
        if causal:
            end_n = tl.minimum(n_seq, start_m + BLOCK_M)
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_seq
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = _load_rows(k_base, offs_n, k_stride_n, offs_d, k_stride_d, kv_mask, UPCAST)
            v = _load_rows(v_base, offs_n, v_stride_n, offs_d, v_stride_d, kv_mask, UPCAST)
            p = _probs(q, k, lse, scale, bias_ptr, h, bias_stride_h, bias_stride_m, bias_stride_n, offs_m, offs_n,
                       mask_m, mask_n, causal, HAS_BIAS, PRECISION)
            ds = p * (_mm(do, tl.trans(v), PRECISION) - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, PRECISION)
            if bias_grad:
                tl.atomic_add(dbias_ptr + h * n_seq * n_seq + offs_m[:, None] * n_seq + offs_n[None, :], ds,
                              mask=mask_m[:, None] & mask_n[None, :])
        _store_rows(_sequence_base(dq_ptr, b, a, h, grad_stride_b, grad_stride_a, grad_stride_h), offs_m,
                    grad_stride_n, offs_d, grad_stride_d, dq * scale, qd_mask)


# 3. launchers -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _stride_names(role: str) -> tuple:
    return tuple(f"{role}_stride_{axis}" for axis in "banhd")


def _strides(role: str, x: torch.Tensor, temporal: bool) -> dict:
    """x's strides as the kernels' keyword arguments ``{role}_stride_b/a/n/h[/d]``: the tensor
    seen as (b, a, n, h[, d]), n the attended axis (T when temporal, else S)."""
    s = x.stride()
    if temporal:
        s = (s[0], s[2], s[1]) + s[3:]
    return dict(zip(_stride_names(role), s))


def _bias_strides(bias, N: int) -> dict:
    # without a bias: the strides of a contiguous one, so that both calls share one binary
    h, m, n = bias.stride() if bias is not None else (N * N, N, 1)
    return dict(bias_stride_h=h, bias_stride_m=m, bias_stride_n=n)


def _sizes(q: torch.Tensor, temporal: bool, causal: bool) -> dict:
    _, T, S, H, D = q.shape
    N, A = (T, S) if temporal else (S, T)
    return dict(n_other=A, n_seq=N, n_heads=H, head_dim=D, scale=1.0 / math.sqrt(D), causal=int(causal))


def _tile(block_m: int, block_n: int, warps: int, stages: int, block_d: int, interpreter: bool) -> dict:
    """One kernel's meta: its tile, warps, pipeline stages and how it multiplies."""
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
                UPCAST=interpreter, PRECISION="ieee" if interpreter else "tf32x3")


_ANY = math.inf
# Each kernel's tile on a GPU: a kernel takes the first of its rows whose operands match and whose
# bounds hold for the sequence length N and head dim Dh. Chosen from the registers / spills of every
# class compiled for sm_80 and sm_90 with triton 3.6 and 3.8 (tests/test_triton_compile.py, table
# in docs/gpu.md); "spilled" below: a measured spill the row avoids (bytes per thread, target,
# triton). Where a row says "H200", its tile was timed on one (benchmarks/attention_tiles.py, at
# the diffusers motion modules' temporal shapes, sequences x frames x heads x Dh; docs/gpu.md):
# against the spill-free tile it replaces, and kept only where it was faster. Every tile side is
# >= 16, tl.dot's minimum (BLOCK_D too; a shorter sequence or head dim is masked). fp32 operands
# are split in two TF32 parts for the tensor cores (twice the operand registers of fp16/bf16), so
# fp32 takes 16-row or 16-key steps. A sequence of <= 32 (temporal attention) is one block loaded
# once (one stage) and its backward the one "fused" launch (fp32: up to Dh 64, or 16 frames up to
# Dh 128); longer ones stream key blocks through the three-kernel backward. Warps: a tile is spread
# over its threads, so more warps hold a wider tile in fewer registers each; fewer warps per
# program let more short sequences' programs share an SM.
_TILES = (
    # kernel  operands  N <=  Dh <=  BLOCK_M BLOCK_N warps stages
    ("fwd",   "fp32",   16,   64,    16,  16, 2, 1),  # one 16-key block; H200 4096x16x8x40: 1.13x 4 warps
    ("fwd",   "fp32",   32,   64,    32,  16, 2, 2),  # H200 8192x18x8x64: 1.46x 4 warps; ALLOWED_SPILL
    ("fwd",   "fp32",   _ANY, 64,    32,  16, 4, 1),  # 16-key steps (two TF32 parts per operand); 2 stages spilled 8 B
    ("fwd",   "fp32",   _ANY, _ANY,  16,  32, 8, 2),  # Dh 65-128: 16 queries, 8 warps for the wide q and accumulator
    ("fused", "fp32",   16,   64,    16,  16, 4, 1),  # H200 4096x16x8x40: 2.52x the three kernels
    ("fused", "fp32",   16,   _ANY,  16,  16, 4, 1),  # H200 1024x16x8x80: 1.64x; ALLOWED_SPILL
    ("fused", "fp32",   32,   64,    32,  32, 4, 1),  # H200 8192x18x8x64: 3.33x; ALLOWED_SPILL
    ("delta", "fp32",   _ANY, _ANY,  64,  16, 4, 1),  # rowsum(dO * O): no key loop, nothing to pipeline
    ("dkdv",  "fp32",   _ANY, 16,    16,  16, 4, 3),  # 8 warps spilled 8 B at Dh 16 (sm_90, 3.6), 2 stages with a bias
    ("dkdv",  "fp32",   _ANY, 64,    16,  16, 8, 2),  # k, v, dK and dV stay across the query loop: 8 warps
    ("dkdv",  "fp32",   _ANY, _ANY,  16,  16, 8, 3),  # 255 registers with every tile tried: ALLOWED_SPILL
    ("dq",    "fp32",   _ANY, 32,    16,  16, 8, 2),  # q, dO and dQ stay across the key loop: 8 warps
    ("dq",    "fp32",   _ANY, 64,    16,  16, 8, 3),  # 1 and 2 stages spilled 8-24 B; a bias: ALLOWED_SPILL
    ("dq",    "fp32",   _ANY, _ANY,  16,  16, 8, 1),  # 2 stages spilled 8-24 B, 3 stages 16 B (sm_80)
    ("fwd",   "16-bit", 16,   _ANY,  16,  16, 2, 1),  # 16 queries: 2 warps (16 x 16 scores are two 16 x 8 mma tiles)
    ("fwd",   "16-bit", 32,   32,    32,  32, 2, 1),  # warps grow with the q tile, 16 elements a thread: 32 x 32 on 2
    ("fwd",   "16-bit", 32,   64,    32,  32, 2, 1),  # H200 8192x18x8x64: 1.29x 4 warps; a bias: ALLOWED_SPILL
    ("fwd",   "16-bit", 32,   _ANY,  32,  32, 8, 1),  # 32 x 128 on 8
    ("fused", "16-bit", 16,   64,    16,  16, 4, 1),  # q, k, v, dO, P and dS of the whole sequence at once: 4 warps
    ("fused", "16-bit", 16,   _ANY,  16,  16, 8, 1),  # the same, twice as wide: 8 warps
    ("fused", "16-bit", 32,   64,    32,  32, 4, 1),  # as for 16, one 32-block
    ("fused", "16-bit", 32,   _ANY,  32,  32, 8, 1),  # as for 16, one 32-block
    ("fwd",   "16-bit", _ANY, 64,    128, 32, 8, 3),  # 128 queries, 32-key blocks through a 3-stage cp.async pipeline
    ("fwd",   "16-bit", _ANY, _ANY,  64,  32, 8, 3),  # Dh 65-128: half the queries for the twice-wide q and accumulator
    ("delta", "16-bit", _ANY, _ANY,  64,  32, 4, 2),  # rowsum(P * dP), P recomputed (the stored O is rounded): 2 stages
    ("dkdv",  "16-bit", _ANY, 64,    32,  32, 4, 2),  # 32 keys, 32-query steps, 2 stages
    ("dkdv",  "16-bit", _ANY, _ANY,  32,  32, 8, 2),  # Dh 65-128: 8 warps for the twice-wide rows
    ("dq",    "16-bit", _ANY, 64,    32,  32, 4, 2),  # 32 queries, 32-key steps, 2 stages
    ("dq",    "16-bit", _ANY, _ANY,  32,  32, 8, 2),  # Dh 65-128: 8 warps for the twice-wide rows
)


def _configs(N: int, D: int, dtype: torch.dtype) -> dict:
    """The meta of each kernel launched for one (sequence length, head dim, dtype): "fwd", and
    "fused" (the sequence is one block) or "delta", "dkdv" and "dq". On a GPU from _TILES; the
    interpreter computes in fp32 (its bf16 dot is wrong) with one block per sequence where it
    fits (it pays per program). Cached (a call's Python is launch overhead on a GPU): the dicts are
    shared, copy before changing one."""
    return _configs_for(N, D, dtype, triton_interpret())


@functools.lru_cache(maxsize=None)
def _configs_for(N: int, D: int, dtype: torch.dtype, interpret: bool) -> dict:
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if interpret:
        block = min(max(16, triton.next_power_of_2(N)), 64)
        tile = _tile(block, block, 4, 1, BLOCK_D, interpreter=True)
        return dict(fwd=tile, fused=tile) if N <= 64 else dict(fwd=tile, delta=tile, dkdv=tile, dq=tile)
    operands = "fp32" if dtype == torch.float32 else "16-bit"
    tiles = {}
    for kernel, ops, max_n, max_d, block_m, block_n, warps, stages in _TILES:
        if ops == operands and N <= max_n and D <= max_d and kernel not in tiles:
            tiles[kernel] = _tile(block_m, block_n, warps, stages, BLOCK_D, interpreter=False)
    if "fused" in tiles:
        return dict(fwd=tiles["fwd"], fused=tiles["fused"])
    return tiles


# Whether the launchers pass the head dim at compile time where they can (_head_dim_meta); the
# tiles sweep (benchmarks/attention_tiles.py) sets it False to time the runtime head dim.
SPECIALISE_HEAD_DIM = True


def _head_dim_meta(D: int, *tensors: torch.Tensor) -> int:
    """The kernels' HEAD_DIM: D where every (B, T, S, H, Dh) operand holds its heads packed (stride_h
    == Dh: contiguous tensors and the views of a packed projection), else 0 (head dim and head
    strides read at run time). With both known at compile time, a head's offset h * Dh and the
    head-dim mask let triton prove a row's elements aligned and contiguous and load them as vectors
    (sm_90, triton 3.6, the fp32 forward of 16 frames at Dh 40: 12 ld.global.v4 per thread instead of
    48 scalar loads, 125 registers instead of 144; bf16 6 instead of 48, 80 registers instead of 128;
    docs/gpu.md). One binary per head dim."""
    packed = all(x.shape[3] == 1 or x.stride(3) == D for x in tensors)
    return D if SPECIALISE_HEAD_DIM and packed else 0


def _attention_fwd_launches(q, k, v, bias, out, lse, temporal, causal) -> list:
    B, T, S, H, D = q.shape
    N, A = (T, S) if temporal else (S, T)
    meta = dict(_configs(N, D, q.dtype)["fwd"], HAS_BIAS=bias is not None, HEAD_DIM=_head_dim_meta(D, q, k, v, out))
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, bias_ptr=bias if bias is not None else q, o_ptr=out, lse_ptr=lse,
                **_strides("q", q, temporal), **_strides("k", k, temporal), **_strides("v", v, temporal),
                **_strides("o", out, temporal), **_strides("lse", lse, temporal), **_bias_strides(bias, N),
                **_sizes(q, temporal, causal))
    grid = (B * A * H, cdiv(N, meta["BLOCK_M"]))
    return [Launch(_attention_fwd_kernel, grid, args=(), meta=meta, kwargs=args)]


def _attention_bwd_launches(grad_out, q, k, v, bias, out, lse, delta, dq, dk, dv, dbias, temporal, causal,
                            bias_grad) -> list:
    """The backward's launches: the fused kernel when a sequence is one block, else the delta,
    dK/dV and dQ kernels. ``delta`` (like lse, fp32) is scratch for the multi-block path."""
    B, T, S, H, D = q.shape
    N, A = (T, S) if temporal else (S, T)
    cfg = _configs(N, D, q.dtype)
    has_bias = bias is not None
    rows = B * A * H
    # dq, dk, dv share one layout (alike tensors, or the views of one packed gradient), delta lse's
    assert dq.stride() == dk.stride() == dv.stride() and delta.stride() == lse.stride()
    reads = dict(do_ptr=grad_out, q_ptr=q, k_ptr=k, v_ptr=v, bias_ptr=bias if has_bias else q, lse_ptr=lse,
                 **_strides("do", grad_out, temporal), **_strides("q", q, temporal), **_strides("k", k, temporal),
                 **_strides("v", v, temporal), **_strides("lse", lse, temporal), **_bias_strides(bias, N),
                 **_sizes(q, temporal, causal))
    grads = _strides("grad", dq, temporal)
    dbias_arg = dbias if bias_grad else lse  # fp32 either way: one binary
    head_dim = _head_dim_meta(D, grad_out, q, k, v, dq, out)
    if "fused" in cfg:
        meta = dict(cfg["fused"], HAS_BIAS=has_bias, HEAD_DIM=head_dim)
        args = dict(reads, **grads, dq_ptr=dq, dk_ptr=dk, dv_ptr=dv, dbias_ptr=dbias_arg, bias_grad=int(bias_grad))
        return [Launch(_attention_bwd_fused_kernel, (rows, 1), args=(), meta=meta, kwargs=args)]
    # fp32: delta = dO . O; fp16/bf16: recomputed as rowsum(P * dP), since the stored O is rounded
    recompute = q.dtype != torch.float32
    meta = dict(cfg["delta"], HAS_BIAS=has_bias and recompute, RECOMPUTE=recompute, HEAD_DIM=head_dim)
    args = dict(reads, o_ptr=out, **_strides("o", out, temporal), delta_ptr=delta)
    delta_launch = Launch(_attention_bwd_delta_kernel, (rows, cdiv(N, meta["BLOCK_M"])), args=(), meta=meta,
                          kwargs=args)
    meta = dict(cfg["dkdv"], HAS_BIAS=has_bias, HEAD_DIM=head_dim)
    args = dict(reads, **grads, delta_ptr=delta, dk_ptr=dk, dv_ptr=dv)
    dkdv_launch = Launch(_attention_bwd_dkdv_kernel, (rows, cdiv(N, meta["BLOCK_N"])), args=(), meta=meta,
                         kwargs=args)
    meta = dict(cfg["dq"], HAS_BIAS=has_bias, HEAD_DIM=head_dim)
    args = dict(reads, **grads, delta_ptr=delta, dq_ptr=dq, dbias_ptr=dbias_arg, bias_grad=int(bias_grad))
    dq_launch = Launch(_attention_bwd_dq_kernel, (rows, cdiv(N, meta["BLOCK_M"])), args=(), meta=meta,
                       kwargs=args)
    return [delta_launch, dkdv_launch, dq_launch]


def _attention_fwd_triton_impl(q, k, v, bias, temporal, causal):
    B, T, S, H, D = q.shape
    out = torch.empty((B, T, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, S, H), dtype=torch.float32, device=q.device)
    if q.numel() > 0:
        run(_attention_fwd_launches(q, k, v, bias, out, lse, temporal, causal))
    return out, lse


def _attention_bwd_triton_impl(grad_out, q, k, v, bias, out, lse, temporal, causal, bias_grad, packed_grad):
    B, T, S, H, D = q.shape
    if packed_grad:  # one (B, T, S, 3, H, Dh) gradient for a packed qkv, written in place
        packed = torch.empty((B, T, S, 3, H, D), dtype=q.dtype, device=q.device)
        dq, dk, dv = packed.unbind(3)
    else:
        dq, dk, dv = (torch.empty((B, T, S, H, D), dtype=q.dtype, device=q.device) for _ in range(3))
    N = T if temporal else S
    dbias = (torch.zeros((H, N, N), dtype=torch.float32, device=q.device) if bias_grad
             else torch.empty(0, dtype=q.dtype, device=q.device))
    if q.numel() > 0:
        run(_attention_bwd_launches(grad_out, q, k, v, bias, out, lse, torch.empty_like(lse), dq, dk, dv, dbias,
                                    temporal, causal, bias_grad))
    if bias_grad:
        dbias = dbias.to(bias.dtype)
    if packed_grad:
        return packed, q.new_empty((0,)), q.new_empty((0,)), dbias
    return dq, dk, dv, dbias


def _attention_fwd_fake(q, k, v, bias, temporal, causal):
    B, T, S, H, D = q.shape
    return q.new_empty((B, T, S, H, D)), q.new_empty((B, T, S, H), dtype=torch.float32)


def _attention_bwd_fake(grad_out, q, k, v, bias, out, lse, temporal, causal, bias_grad, packed_grad):
    B, T, S, H, D = q.shape
    N = T if temporal else S
    dbias = bias.new_empty((H, N, N)) if bias_grad else q.new_empty((0,))
    if packed_grad:
        return q.new_empty((B, T, S, 3, H, D)), q.new_empty((0,)), q.new_empty((0,)), dbias
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias


# 4. the C++ and Triton ops ---------------------------------------------------------------
# torch.ops.pvkernels_cpp.attention_fwd / attention_bwd (csrc/attention.cpp) and their Triton
# stand-ins, one schema each, as csrc/registration.cpp declares them (tests/test_schemas.py).

_FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor? bias, bool temporal, bool causal) -> (Tensor, Tensor)"
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, "
               "bool temporal, bool causal, bool bias_grad, bool packed_grad) -> (Tensor, Tensor, Tensor, Tensor)")
_FWD = define_op("attention_fwd", _FWD_SCHEMA, _attention_fwd_triton_impl, _attention_fwd_fake)
_BWD = define_op("attention_bwd", _BWD_SCHEMA, _attention_bwd_triton_impl, _attention_bwd_fake)


def _ops(backend: str):
    return _FWD[backend], _BWD[backend]


# 5. autograd ------------------------------------------------------------------------------

class AttentionFunction(torch.autograd.Function):
    """Forward saves q, k, v, out and the fp32 log-sum-exp; backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, bias, temporal: bool, causal: bool, backend: str):
        fwd, _ = _ops(backend)
        out, lse = fwd(q, k, v, bias, temporal, causal)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.temporal, ctx.causal, ctx.backend = temporal, causal, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        _, bwd = _ops(ctx.backend)
        dq, dk, dv, dbias = bwd(grad_out, q, k, v, bias, out, lse, ctx.temporal, ctx.causal, bias_grad, False)
        return dq, dk, dv, (dbias if bias_grad else None), None, None, None


class PackedAttentionFunction(torch.autograd.Function):
    """As AttentionFunction on the q, k, v views of one packed (B, T, S, 3, H, Dh) qkv: its
    gradient is written as one packed tensor (no stack copy of three gradients)."""

    @staticmethod
    def forward(ctx, qkv, bias, temporal: bool, causal: bool, backend: str):
        fwd, _ = _ops(backend)
        q, k, v = qkv.unbind(3)
        out, lse = fwd(q, k, v, bias, temporal, causal)
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.temporal, ctx.causal, ctx.backend = temporal, causal, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, bias, out, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[1]
        _, bwd = _ops(ctx.backend)
        q, k, v = qkv.unbind(3)
        dqkv, _, _, dbias = bwd(grad_out, q, k, v, bias, out, lse, ctx.temporal, ctx.causal, bias_grad, True)
        return dqkv, (dbias if bias_grad else None), None, None, None


# 6. public functions ------------------------------------------------------------------------

def _check(name: str, q, k, v, bias, temporal: bool) -> None:
    for label, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 5:
        raise ValueError(f"{name}: q must be 5-D (B, T, S, H, Dh), got {q.dim()}-D with shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{name}: q, k and v must have the same shape (B, T, S, H, Dh), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    check_float(name, "q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{name}: q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{name}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if bias is not None:
        _, T, S, H, _ = q.shape
        N = T if temporal else S
        axis = "T" if temporal else "S"
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (H, N, N):
            raise ValueError(f"{name}: bias must have shape (H, {axis}, {axis}) = {(H, N, N)}, got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"{name}: bias must be floating point, got {bias.dtype}")
        if bias.device != q.device:
            raise ValueError(f"{name}: bias is on {bias.device} but q is on {q.device}")


def _attention(name, q, k, v, bias, temporal, causal, backend, qkv=None):
    """Validates and dispatches; ``qkv``: the packed tensor q, k, v are views of (its gradient comes back packed)."""
    _check(name, q, k, v, bias, temporal)
    D = q.shape[-1]
    def unsupported(fused: str) -> Optional[str]:
        return f"head dim Dh = {D} > {MAX_HEAD_DIM[fused]}" if D > MAX_HEAD_DIM[fused] else None

    slower = fused_slower(name, dtype=q.dtype, n=q.shape[1 if temporal else 2], head_dim=D)
    chosen = resolve_backend(name, backend, q.device, q.dtype, unsupported=unsupported, slower=slower)
    if chosen == "reference":
        return attention_reference(q, k, v, bias, temporal, causal)
    # under a forward-AD level (no public query for it) the Function runs, and says it has no jvp
    differentiated = forward_ad._current_level >= 0 or (
        torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, bias)))
    if not differentiated:  # no autograd node
        return _ops(chosen)[0](q, k, v, bias, temporal, causal)[0]
    if qkv is not None:
        return PackedAttentionFunction.apply(qkv, bias, temporal, causal, chosen)
    return AttentionFunction.apply(q, k, v, bias, temporal, causal, chosen)


def packed_attention(qkv: torch.Tensor, temporal: bool, causal: bool = False, bias: Optional[torch.Tensor] = None,
                     backend: str = "auto") -> torch.Tensor:
    """Spatial (``temporal=False``) or temporal attention of a packed (B, T, S, 3, H, Dh) qkv.

    The entry the attention modules call (DESIGN.md section 3): the same result, checks and
    backend choice as ``spatial_attention(*qkv.unbind(3), bias=bias, backend=backend)`` /
    ``temporal_attention(*qkv.unbind(3), causal=causal, bias=bias, backend=backend)``; on the
    fused backends the gradient of ``qkv`` is written packed, without the stack copy that
    autograd's ``unbind`` backward would make.

    Args:
        qkv: (B, T, S, 3, H, Dh): q, k, v along dim 3, any strides; fp32/fp16/bf16 (fp64 on
            the reference backend).
        temporal: attend over T (per (b, s, h)) instead of S (per (b, t, h)).
        causal: position i of the attended axis attends to positions <= i only (the modules
            set it for temporal attention).
        bias: optional additive (H, N, N) bias, N = T or S.
        backend: "auto", "triton", "cpp" or "reference" (env ``PVKERNELS_BACKEND`` overrides auto).

    Returns:
        o: (B, T, S, H, Dh), contiguous, dtype of qkv.

    Example:
        >>> qkv = torch.randn(2, 8, 64, 3, 4, 32, requires_grad=True)
        >>> o = packed_attention(qkv, temporal=True, causal=True)
    """
    name = "temporal_attention" if temporal else "spatial_attention"
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"{name}: qkv must be a (B, T, S, 3, H, Dh) tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    return _attention(name, *qkv.unbind(3), bias, temporal, causal, backend, qkv=qkv)


def spatial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      backend: str = "auto") -> torch.Tensor:
    """Attention over the S tokens of each frame, for every (b, t, h), reading the layout in place.

    ``o = softmax(q k^T / sqrt(Dh) + bias) v`` with an fp32 softmax; differentiable in q, k, v
    and bias. A query whose keys a -inf bias hides all gets a zero row (as SDPA), not NaN.

    Args:
        q, k, v: (B, T, S, H, Dh), any strides (e.g. ``qkv.unbind(3)`` of a packed
            (B, T, S, 3, H, Dh) projection); fp32/fp16/bf16 (fp64 on the reference backend).
        bias: optional additive (H, S, S) bias (relative position), with gradient if it requires one.
        backend: "auto", "triton", "cpp" or "reference" (env ``PVKERNELS_BACKEND`` overrides auto).

    Returns:
        o: (B, T, S, H, Dh), contiguous, dtype of q.

    Example:
        >>> qkv = torch.randn(2, 8, 64, 3, 4, 32)  # (B, T, S, 3, H, Dh)
        >>> o = pvkernels.spatial_attention(*qkv.unbind(3))
    """
    return _attention("spatial_attention", q, k, v, bias, False, False, backend)


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                       bias: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Attention over the T frames at each spatial position, for every (b, s, h), in place.

    ``o = softmax(q k^T / sqrt(Dh) + bias + mask) v`` with an fp32 softmax, ``mask`` hiding
    frames after the query's when ``causal``; differentiable in q, k, v and bias. A query whose
    keys are all hidden (a -inf bias) gets a zero row (as SDPA), not NaN.

    Args:
        q, k, v: (B, T, S, H, Dh), any strides; fp32/fp16/bf16 (fp64 on the reference backend).
        causal: frame t attends to frames <= t only.
        bias: optional additive (H, T, T) bias (T5 relative position, ALiBi).
        backend: "auto", "triton", "cpp" or "reference" (env ``PVKERNELS_BACKEND`` overrides auto).

    Returns:
        o: (B, T, S, H, Dh), contiguous, dtype of q.

    Example:
        >>> qkv = torch.randn(2, 8, 64, 3, 4, 32)
        >>> o = pvkernels.temporal_attention(*qkv.unbind(3), causal=True)
    """
    if not isinstance(causal, bool):
        raise TypeError(f"temporal_attention: causal must be a bool, got {type(causal).__name__}")
    return _attention("temporal_attention", q, k, v, bias, True, causal, backend)
