"""Lookup-free quantisation (LFQ, MAGVIT-v2) entropy terms without the N x 2^d probability matrix.

Replaces the peers' ``softmax(2 t <x, codes>)`` over all 2^d sign codes (vector-quantize-pytorch's
``LFQ``), its clamped per-sample entropy and the batch-mean distribution ``avg_prob``. The logits
are a sum over bits, so p(c) factors into per-bit Bernoulli terms: the fused kernels stream the
codes of a row as the outer sum of two half-width log tables (forward entropy, backward sums per
bit); ``avg_prob`` is a sum of outer products, one GEMM per token chunk. Memory O(N d + C 2^d).
Limits: d <= 24 bits per codebook (2^24 codes per token are streamed, not skipped).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._backend import check_float, fused_slower, resolve_backend, triton
from ._library import define_op
from ._triton import Launch, run

MAX_BITS = 24
_MIN_LOG_P = -87.0  # exp(-87) ~ 1.6e-38: smaller probabilities are 0 (no denormals), as in csrc/lfq.cpp


def code_bits(d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The 2^d codes as +-1 bits, (2^d, d); feature 0 is the highest bit of the index, as the peer's
    ``mask = 2 ** arange(d - 1, -1, -1)`` makes it."""
    index = torch.arange(2 ** d, device=device)
    shifts = torch.arange(d - 1, -1, -1, device=device)
    return ((index[:, None] >> shifts) & 1).to(dtype) * 2 - 1


# 1. reference -------------------------------------------------------------------------------

def lfq_entropy_reference(x: torch.Tensor, inv_temperature: float, code_value: float, eps: float,
                          weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The peer's formula on (N, C, d) rows, the oracle: the full softmax over the 2^d codes.

    ``prob = softmax(2 t <x, c>)`` with codes ``c`` in {-code_value, +code_value}^d; the per-sample
    entropy ``-sum p log max(p, eps)`` averaged over tokens (weighted by ``weights``) and
    codebooks; ``avg_prob`` the weighted mean of ``prob`` over tokens. Math in fp32 (fp64 for fp64).
    Memory traffic: writes and reads the N x C x 2^d logits and probabilities several times.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, C, d = x.shape
    codebook = code_bits(d, x.device, compute) * code_value
    logits = 2.0 * inv_temperature * torch.einsum("ncd,kd->nck", x.to(compute), codebook)
    prob = logits.softmax(dim=-1)
    entropy = (-prob * prob.clamp(min=eps).log()).sum(dim=-1)
    if weights is None:
        return entropy.mean(), prob.mean(dim=0)
    w = weights.to(compute) / weights.sum()
    return (entropy * w[:, None]).sum() / C, (prob * w[:, None, None]).sum(dim=0)


# the factored form, shared by the fused backends ------------------------------------------

def low_bits(d: int) -> int:
    """Bits of the low (vector) half of a code index; up to 8 bits the whole code is one table."""
    return d if d <= 8 else (d + 1) // 2


def _log_factors(x: torch.Tensor, inv_temperature: float, code_value: float):
    """alpha = 2 t s x and the log of each bit's probability of +1 and -1: log sigmoid(+-2 alpha)."""
    alpha = x.float() * (2.0 * inv_temperature * code_value)
    return alpha, F.logsigmoid(2.0 * alpha), F.logsigmoid(-2.0 * alpha)


def _log_table(lqp: torch.Tensor, lqm: torch.Tensor) -> torch.Tensor:
    """(..., k) log factors -> (..., 2^k) log probabilities of the k-bit codes (feature 0 the highest
    bit): the outer sum of the tables of the first and the last half of the bits, recursively
    (sums of terms <= 0: no cancellation; log2(k) broadcast adds, not k)."""
    k = lqp.shape[-1]
    if k <= 1:
        return torch.cat((lqm, lqp), dim=-1) if k else lqp.new_zeros(*lqp.shape[:-1], 1)
    high, low = _log_table(lqp[..., :k // 2], lqm[..., :k // 2]), _log_table(lqp[..., k // 2:], lqm[..., k // 2:])
    return (high[..., :, None] + low[..., None, :]).flatten(-2)


def _prob(log_p: torch.Tensor) -> torch.Tensor:
    return torch.where(log_p >= _MIN_LOG_P, log_p.clamp(min=_MIN_LOG_P).exp(), 0.0)


def _avg_prob(lqp: torch.Tensor, lqm: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_n w_n p_n(c) for each codebook: the outer products of the high and low half tables of each
    token, one batched GEMM per chunk of tokens (chunks keep the tables and their doubling steps ~50 MB)."""
    N, C, d = lqp.shape
    dl = low_bits(d)
    dh = d - dl
    avg = lqp.new_zeros(C, 2 ** dh, 2 ** dl)
    chunk = max(1, (4 << 20) // (C * (2 ** dh + 2 ** dl)))
    for n0 in range(0, N, chunk):
        p, m = lqp[n0:n0 + chunk], lqm[n0:n0 + chunk]
        high = _prob(_log_table(p[..., :dh], m[..., :dh])) * w[n0:n0 + chunk, None, None]
        low = _prob(_log_table(p[..., dh:], m[..., dh:]))
        avg += torch.einsum("nch,ncl->chl", high, low)
    return avg.reshape(C, 2 ** d)


# 2. triton kernels --------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _lfq_log_part(lqp_row, lqm_row, idx, first, n_bits, d, BLOCK_D: tl.constexpr):
        """Log probabilities of the codes ``idx`` of the bits [first, first + n_bits) (the first the
        highest bit of idx), and each code's bits over all d features (0 outside the part)."""
        f = tl.arange(0, BLOCK_D)
        in_part = (f >= first) & (f < first + n_bits)
        shift = tl.where(in_part, first + n_bits - 1 - f, 0)  # never a negative shift
        bit = ((idx[:, None] >> shift[None, :]) & 1) == 1
        lp = tl.load(lqp_row + f, mask=f < d, other=0.0)
        lm = tl.load(lqm_row + f, mask=f < d, other=0.0)
        term = tl.where(in_part[None, :], tl.where(bit, lp[None, :], lm[None, :]), 0.0)
        return tl.sum(term, axis=1), bit, in_part

    @triton.jit
    def _lfq_prob(log_p):
        return tl.where(log_p >= -87.0, tl.exp(tl.maximum(log_p, -87.0)), 0.0)

    @triton.jit(do_not_specialize=["log_eps"])
    def _lfq_entropy_fwd_kernel(
        lqp_ptr, lqm_ptr, h_ptr, d, n_low, log_eps,
        BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """One row (token, codebook): -sum_c p log max(p, eps) over the (high, low) grid of codes."""
        row = tl.program_id(0).to(tl.int64)  # int64: rows * d can pass 2**31
        lqp_row, lqm_row = lqp_ptr + row * d, lqm_ptr + row * d
        n_high = d - n_low
        acc = tl.zeros([BLOCK_H, BLOCK_L], tl.float32)
        for l0 in range(0, 1 << n_low, BLOCK_L):
            cl = l0 + tl.arange(0, BLOCK_L)
            ll, _, _ = _lfq_log_part(lqp_row, lqm_row, cl, n_high, n_low, d, BLOCK_D)
            ll = tl.where(cl < (1 << n_low), ll, float("-inf"))
            for h0 in range(0, 1 << n_high, BLOCK_H):
                ch = h0 + tl.arange(0, BLOCK_H)
                lh, _, _ = _lfq_log_part(lqp_row, lqm_row, ch, 0, n_high, d, BLOCK_D)
                lh = tl.where(ch < (1 << n_high), lh, float("-inf"))
                log_p = lh[:, None] + ll[None, :]
                acc += _lfq_prob(log_p) * tl.maximum(log_p, log_eps)
        tl.store(h_ptr + row, -tl.sum(tl.sum(acc, axis=1), axis=0))

    @triton.jit(do_not_specialize=["log_eps", "n_codebooks"])
    def _lfq_entropy_bwd_kernel(
        lqp_ptr, lqm_ptr, w_entropy_ptr, w_avg_ptr, grad_avg_ptr, plus_ptr, minus_ptr,
        d, n_low, log_eps, n_codebooks,
        HAS_GRAD_AVG: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """One row: u(c) = p(c) (w_entropy dH/dp(c) + w_avg grad_avg[c]) summed over the codes whose
        bit f is 1 (plus) and 0 (minus), for every feature f."""
        row = tl.program_id(0).to(tl.int64)
        lqp_row, lqm_row = lqp_ptr + row * d, lqm_ptr + row * d
        n_high = d - n_low
        w_entropy = tl.load(w_entropy_ptr + row)
        w_avg = tl.load(w_avg_ptr + row)
        g_row = grad_avg_ptr + (row % n_codebooks) * (1 << d)
        plus = tl.zeros([BLOCK_D], tl.float32)
        minus = tl.zeros([BLOCK_D], tl.float32)
        for l0 in range(0, 1 << n_low, BLOCK_L):
            cl = l0 + tl.arange(0, BLOCK_L)
            cl_ok = cl < (1 << n_low)
            ll, bit_l, in_l = _lfq_log_part(lqp_row, lqm_row, cl, n_high, n_low, d, BLOCK_D)
            ll = tl.where(cl_ok, ll, float("-inf"))
            low = tl.zeros([BLOCK_L], tl.float32)
            for h0 in range(0, 1 << n_high, BLOCK_H):
                ch = h0 + tl.arange(0, BLOCK_H)
                lh, bit_h, in_h = _lfq_log_part(lqp_row, lqm_row, ch, 0, n_high, d, BLOCK_D)
                lh = tl.where(ch < (1 << n_high), lh, float("-inf"))
                log_p = lh[:, None] + ll[None, :]
                # dH/dp of -p log max(p, eps): -(log p + 1) where p >= eps, -log eps below
                g = w_entropy * tl.where(log_p >= log_eps, -(log_p + 1.0), -log_eps)
                if HAS_GRAD_AVG:
                    g_mask = (ch < (1 << n_high))[:, None] & cl_ok[None, :]
                    g += w_avg * tl.load(g_row + ch[:, None] * (1 << n_low) + cl[None, :], mask=g_mask, other=0.0)
                u = _lfq_prob(log_p) * g
                low += tl.sum(u, axis=0)
                high = tl.sum(u, axis=1)
                plus += tl.sum(tl.where(bit_h & in_h[None, :], high[:, None], 0.0), axis=0)
                minus += tl.sum(tl.where(~bit_h & in_h[None, :], high[:, None], 0.0), axis=0)
            plus += tl.sum(tl.where(bit_l & in_l[None, :], low[:, None], 0.0), axis=0)
            minus += tl.sum(tl.where(~bit_l & in_l[None, :], low[:, None], 0.0), axis=0)
        f = tl.arange(0, BLOCK_D)
        tl.store(plus_ptr + row * d + f, plus, mask=f < d)
        tl.store(minus_ptr + row * d + f, minus, mask=f < d)


# 3. launchers -------------------------------------------------------------------------------

def _config(d: int) -> dict:
    """A (high x low) tile of codes per step: 32 x 64 fp32 with 4 warps (16 per thread, plus the
    bit tiles of the two halves); smaller halves take smaller tiles. The interpreter takes the
    same tiles (it pays per step, and the tiles are small)."""
    dl = low_bits(d)
    return dict(BLOCK_D=max(2, triton.next_power_of_2(d)), BLOCK_H=min(32, max(2, 2 ** (d - dl))),
                BLOCK_L=min(64, max(16, 2 ** dl)), num_warps=4)


def _lfq_entropy_fwd_launches(lqp, lqm, out, log_eps=0.0) -> list:
    rows, d = lqp.shape
    return [Launch(_lfq_entropy_fwd_kernel, (rows,), (lqp, lqm, out, d, low_bits(d), log_eps), _config(d))]


def _lfq_entropy_bwd_launches(lqp, lqm, w_entropy, w_avg, grad_avg, plus, minus, log_eps=0.0) -> list:
    rows, d = lqp.shape
    has_g = grad_avg is not None
    args = (lqp, lqm, w_entropy, w_avg, grad_avg if has_g else w_avg, plus, minus, d, low_bits(d), log_eps,
            grad_avg.shape[0] if has_g else 1)
    # a (32 x 32) tile: on (32 x 64) the bit tiles of both halves beside it spilled 8-16 B for
    # sm_80 with 4 warps (triton 3.8) and 8 B with 8 warps (triton 3.6)
    cfg = dict(_config(d), BLOCK_L=min(32, _config(d)["BLOCK_L"]), HAS_GRAD_AVG=has_g)
    return [Launch(_lfq_entropy_bwd_kernel, (rows,), args, cfg)]


def _lfq_entropy_fwd_triton_impl(lqp, lqm, n_low: int, log_eps: float):
    out = torch.empty(lqp.shape[0], dtype=torch.float32, device=lqp.device)
    if lqp.shape[0]:
        run(_lfq_entropy_fwd_launches(lqp, lqm, out, log_eps))
    return out


def _lfq_entropy_bwd_triton_impl(lqp, lqm, n_low: int, log_eps: float, w_entropy, w_avg, grad_avg):
    plus, minus = torch.empty_like(lqp), torch.empty_like(lqp)
    if lqp.shape[0]:
        run(_lfq_entropy_bwd_launches(lqp, lqm, w_entropy, w_avg, grad_avg, plus, minus, log_eps))
    return plus, minus


def _fwd_fake(lqp, lqm, n_low: int, log_eps: float):
    return lqp.new_empty((lqp.shape[0],))


def _bwd_fake(lqp, lqm, n_low: int, log_eps: float, w_entropy, w_avg, grad_avg):
    return lqp.new_empty(lqp.shape), lqp.new_empty(lqp.shape)


# 4. the C++ and Triton ops ---------------------------------------------------------------
# torch.ops.pvkernels_cpp.lfq_entropy_fwd / lfq_entropy_bwd (csrc/lfq.cpp) and their Triton
# stand-ins, one schema each, as csrc/registration.cpp declares them (tests/test_schemas.py).

_FWD_SCHEMA = "(Tensor lqp, Tensor lqm, int low_bits, float log_eps) -> Tensor"
_BWD_SCHEMA = ("(Tensor lqp, Tensor lqm, int low_bits, float log_eps, Tensor w_entropy, Tensor w_avg, "
               "Tensor? grad_avg) -> (Tensor, Tensor)")
_FWD = define_op("lfq_entropy_fwd", _FWD_SCHEMA, _lfq_entropy_fwd_triton_impl, _fwd_fake)
_BWD = define_op("lfq_entropy_bwd", _BWD_SCHEMA, _lfq_entropy_bwd_triton_impl, _bwd_fake)


def _ops(backend: str):
    return _FWD[backend], _BWD[backend]


# 5. autograd ------------------------------------------------------------------------------

class LFQEntropyFunction(torch.autograd.Function):
    """Forward keeps x and the token weights; backward recomputes the log factors (O(N d)) and
    streams the codes again."""

    @staticmethod
    def forward(ctx, x, weights, inv_temperature: float, code_value: float, eps: float, backend: str):
        N, C, d = x.shape
        fwd, _ = _ops(backend)
        _, lqp, lqm = _log_factors(x, inv_temperature, code_value)
        total = weights.sum()  # 0 tokens: 0 / 0, NaN, as the mean of nothing
        entropy = fwd(lqp.reshape(N * C, d), lqm.reshape(N * C, d), low_bits(d), math.log(eps)).view(N, C)
        per_sample = (entropy * weights[:, None]).sum() / (total * C)
        avg_prob = _avg_prob(lqp, lqm, weights) / total
        w = weights / total
        ctx.save_for_backward(x, w)
        ctx.args = (inv_temperature, code_value, eps, backend)
        return per_sample, avg_prob

    @staticmethod
    def backward(ctx, grad_per_sample, grad_avg_prob):
        x, w = ctx.saved_tensors
        inv_temperature, code_value, eps, backend = ctx.args
        N, C, d = x.shape
        _, bwd = _ops(backend)
        alpha, lqp, lqm = _log_factors(x, inv_temperature, code_value)
        g = grad_per_sample if grad_per_sample is not None else w.new_zeros(())
        w_entropy = (w * (g.float() / C))[:, None].expand(N, C).reshape(-1).contiguous()
        w_avg = w[:, None].expand(N, C).reshape(-1).contiguous()
        grad_avg = grad_avg_prob.float().contiguous() if grad_avg_prob is not None else None
        plus, minus = bwd(lqp.reshape(N * C, d), lqm.reshape(N * C, d), low_bits(d), math.log(eps), w_entropy,
                          w_avg, grad_avg)
        # d p(c) / d alpha_f = p(c) (b_f - tanh alpha_f): 1 - tanh = 2 sigmoid(-2 alpha) on the codes
        # whose bit is 1, -(1 + tanh) = -2 sigmoid(2 alpha) on the others (no cancellation)
        plus, minus = plus.view(N, C, d), minus.view(N, C, d)
        d_alpha = 2.0 * (torch.sigmoid(-2.0 * alpha) * plus - torch.sigmoid(2.0 * alpha) * minus)
        grad_x = (d_alpha * (2.0 * inv_temperature * code_value)).to(x.dtype)
        return grad_x, None, None, None, None, None


# 6. public function ------------------------------------------------------------------------

def _check_args(x, inv_temperature, codebook_scale, eps, mask):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lfq_entropy: x must be a torch.Tensor, got {type(x).__name__}")
    check_float("lfq_entropy", "x", x)
    if x.dim() < 3:
        raise ValueError(f"lfq_entropy: x must be (..., C, d): tokens, codebooks, bits; got {x.dim()}-D with shape "
                         f"{tuple(x.shape)}")
    d = x.shape[-1]
    if not 1 <= d <= MAX_BITS:
        raise ValueError(f"lfq_entropy: d = {d} bits per codebook (x's last dim), expected 1 to {MAX_BITS} "
                         f"(2^d codes are streamed per token)")
    if x.shape[-2] == 0:
        raise ValueError(f"lfq_entropy: x has C = 0 codebooks, shape {tuple(x.shape)}")
    for name, value in (("inv_temperature", inv_temperature), ("codebook_scale", codebook_scale), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise TypeError(f"lfq_entropy: {name} must be a finite number, got {value!r}")
    if eps <= 0:
        raise ValueError(f"lfq_entropy: eps must be > 0 (the clamp of log p), got {eps}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"lfq_entropy: mask must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.shape != x.shape[:-2]:
            raise ValueError(f"lfq_entropy: mask must have x's token shape {tuple(x.shape[:-2])}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"lfq_entropy: mask is on {mask.device} but x is on {x.device}")


def lfq_entropy(x: torch.Tensor, inv_temperature: float = 100.0, codebook_scale: float = 1.0,
                spherical: bool = False, eps: float = 1e-5, mask: Optional[torch.Tensor] = None,
                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """The entropy terms of lookup-free quantisation, exactly, without the N x 2^d probabilities.

    For every token and codebook, ``p(c) = softmax_c(2 * inv_temperature * <x, c>)`` over the 2^d
    codes ``c`` in {-s, +s}^d (``s = codebook_scale``, or ``codebook_scale / sqrt(d)`` when
    ``spherical``), as vector-quantize-pytorch's ``LFQ`` computes it. Returns the per-sample
    entropy ``-sum_c p log max(p, eps)`` averaged over tokens and codebooks, and ``avg_prob``, the
    mean of ``p`` over tokens per codebook (its entropy is the codebook-usage term; all-reduce it
    under DDP before taking it). Differentiable in ``x``; math in fp32.

    Args:
        x: (..., C, d) the quantiser's input as its entropy sees it (after projection, clamp,
            rotation and, when ``spherical``, l2 normalisation); fp32/fp16/bf16 (fp64 on the
            reference backend). d <= 24.
        inv_temperature: the softmax's inverse temperature (the peer's default 100).
        codebook_scale: the magnitude of a code's entries.
        spherical: codes are l2-normalised and scaled (binary spherical quantisation).
        eps: the clamp of ``log p`` (the peer's 1e-5).
        mask: optional bool (...) over tokens: only True tokens count (as ``x[mask]``).
        backend: "auto", "triton", "cpp" or "reference" (the dense N x 2^d softmax; env
            ``PVKERNELS_BACKEND`` overrides auto).

    Returns:
        ``(per_sample_entropy, avg_prob)``: a 0-d fp32 tensor and (C, 2^d) fp32. With no token
        selected both are NaN, as the mean of nothing.

    Shape:
        x: (..., C, d) -> (), (C, 2^d).

    Example:
        >>> x = torch.randn(4096, 1, 16, requires_grad=True)
        >>> per_sample, avg_prob = pvkernels.lfq_entropy(x)
        >>> codebook_entropy = -(avg_prob * avg_prob.clamp(min=1e-5).log()).sum(-1).mean()
        >>> (per_sample - codebook_entropy).backward()
    """
    _check_args(x, inv_temperature, codebook_scale, eps, mask)
    if not isinstance(spherical, bool):
        raise TypeError(f"lfq_entropy: spherical must be a bool, got {type(spherical).__name__}")
    chosen = resolve_backend("lfq_entropy", backend, x.device, x.dtype,
                             slower=fused_slower("lfq_entropy", d=x.shape[-1]))
    C, d = x.shape[-2:]
    rows = x.reshape(-1, C, d)
    code_value = float(codebook_scale) / math.sqrt(d) if spherical else float(codebook_scale)
    weights = None if mask is None else mask.reshape(-1)
    if chosen == "reference":
        return lfq_entropy_reference(rows, float(inv_temperature), code_value, float(eps),
                                     None if weights is None else weights.float())
    weights = torch.ones(rows.shape[0], device=x.device) if weights is None else weights.float()
    return LFQEntropyFunction.apply(rows, weights, float(inv_temperature), code_value, float(eps), chosen)
