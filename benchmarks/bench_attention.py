"""spatial / temporal attention and a SpaceTimeBlock, forward and forward+backward, side by side.

Providers (every one on ``DEVICE``, same q, k, v views of one packed qkv): reference (permute +
SDPA with torch's own backend choice + permute back, the oracle), compiled (torch.compile of
it), and the fused backend (cpp on the CPU, triton on CUDA). On CUDA also each SDPA backend
chosen explicitly (sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math, with the permutes they
need) and FlexAttention (compiled, causal as a block mask); a backend that cannot run a case
(e.g. more than 65535 sequences) is skipped with its error.

Roofline: forward moves q, k, v in and o out (4 tensors); forward+backward adds o, dO, lse in and
dq, dk, dv out (12 tensors in all). FLOPs: 4 B A H N^2 Dh forward (half when causal), 2.5x that
for the backward.
"""
from __future__ import annotations

import pytest
import torch

import pvkernels
from pvkernels.ops.attention import attention_reference

from .harness import DEVICE, QUICK, case_key, run

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def shapes(kind: str, device: str = DEVICE, quick: bool = QUICK) -> list:
    """(B, T, S, H, Dh) cases of one attention kind."""
    if quick:
        return [(2, 5, 16, 2, 16)]
    if device == "cuda":  # issue 11: temporal at T=18 and past 65535 sequences; spatial at S=256, 1024
        return [(32, 18, 256, 8, 64), (256, 8, 256, 8, 64)] if kind == "temporal" else \
            [(32, 18, 256, 8, 64), (8, 18, 1024, 8, 64)]
    return [(4, 18, 256, 8, 32), (16, 8, 64, 8, 64)]


def block_shapes(quick: bool = QUICK) -> list:
    """(B, T, S, dim, heads) cases of the SpaceTimeBlock."""
    return [(2, 4, 16, 32, 2)] if quick else [(4, 8, 64, 256, 8), (4, 18, 64, 128, 4)]


def providers(device: str = DEVICE) -> list:
    fused = "triton" if device == "cuda" else "cpp"
    if device == "cpu":
        return ["reference", "compiled", fused]
    return ["reference", *(f"sdpa_{b}" for b in SDPA_BACKENDS), "flex", "compiled", fused]


_compiled_reference = torch.compile(attention_reference)
_flex = {}


def sdpa(backend: str, temporal: bool, causal: bool):
    """The reference (with its permutes) on one SDPA backend chosen explicitly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def fn(q, k, v):
        with sdpa_kernel(chosen):
            return attention_reference(q, k, v, None, temporal, causal)
    return fn


def flex(temporal: bool, causal: bool, N: int, device: str):
    """FlexAttention (compiled once) with the reference's permutes; causal as a block mask built once."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, N, N, device=device) \
        if causal else None
    perm, inverse = ((0, 2, 3, 1, 4), (0, 3, 1, 2, 4)) if temporal else ((0, 1, 3, 2, 4), (0, 1, 3, 2, 4))

    def fn(q, k, v):
        B, T, S, H, D = q.shape
        qq, kk, vv = (x.permute(perm).reshape(-1, H, N, D) for x in (q, k, v))
        o = _flex["fn"](qq, kk, vv, block_mask=mask)
        return o.reshape(B, S if temporal else T, H, N, D).permute(inverse).contiguous()
    return fn


def attention_fn(kind: str, provider: str, N: int, device: str = DEVICE):
    temporal = causal = kind == "temporal"
    if provider == "reference":
        return lambda q, k, v: attention_reference(q, k, v, None, temporal, causal)
    if provider == "compiled":
        return lambda q, k, v: _compiled_reference(q, k, v, None, temporal, causal)
    if provider.startswith("sdpa_"):
        return sdpa(provider[5:], temporal, causal)
    if provider == "flex":
        return flex(temporal, causal, N, device)
    if temporal:
        return lambda q, k, v: pvkernels.temporal_attention(q, k, v, causal=True, backend=provider)
    return lambda q, k, v: pvkernels.spatial_attention(q, k, v, backend=provider)


def _flops(kind, B, T, S, H, D):
    N, A = (T, S) if kind == "temporal" else (S, T)
    return 4 * B * H * A * N * N * D * (0.5 if kind == "temporal" else 1.0)


def _warm_or_skip(call, provider):
    try:
        call()
    except (RuntimeError, ValueError) as exc:  # an SDPA backend refusing the shape, Flex missing a kernel
        pytest.skip(f"{provider} cannot run this case on {DEVICE}: {str(exc).strip().splitlines()[0][:200]}")


@pytest.mark.parametrize("kind, mode, shape, provider",
                         [(k, m, s, p) for k in ("temporal", "spatial") for m in ("fwd", "fwd+bwd")
                          for s in shapes(k) for p in providers()])
def bench_attention(benchmark, kind, mode, shape, provider):
    B, T, S, H, D = shape
    qkv = torch.randn(B, T, S, 3, H, D, device=DEVICE, requires_grad=mode != "fwd")
    q, k, v = qkv.unbind(3)  # the packed-projection views a model hands over
    fn = attention_fn(kind, provider, T if kind == "temporal" else S)
    flops = _flops(kind, B, T, S, H, D)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v)
        tensors = 4
    else:
        grad = torch.randn(B, T, S, H, D, device=DEVICE)

        def call():
            # gradients of the three views: the unbind backward (a stack copy into the packed
            # gradient, identical for every provider) is not part of the attention op
            return torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
        tensors, flops = 12, flops * 3.5
    _warm_or_skip(call, provider)
    run(benchmark, call, f"{kind}_attention", case_key(mode, "x".join(map(str, shape)), "float32"), provider,
        tensors * q.numel() * 4, flops=flops)


@pytest.mark.parametrize("kind, dtype, provider",
                         [(k, d, p) for k in ("temporal", "spatial") for d in ("bfloat16", "float16")
                          for p in providers() if p != "compiled"])
def bench_attention_16bit(benchmark, kind, dtype, provider):
    # forward on 16-bit inputs (fp32 softmax and accumulation in the kernels), first shape only
    B, T, S, H, D = shape = shapes(kind)[0]
    q, k, v = torch.randn(B, T, S, 3, H, D, device=DEVICE, dtype=getattr(torch, dtype)).unbind(3)
    fn = attention_fn(kind, provider, T if kind == "temporal" else S)

    def call():
        with torch.no_grad():
            return fn(q, k, v)
    _warm_or_skip(call, provider)
    run(benchmark, call, f"{kind}_attention", case_key("fwd", "x".join(map(str, shape)), dtype), provider,
        4 * q.numel() * 2, flops=_flops(kind, B, T, S, H, D))


_blocks: dict = {}


def _block(shape, provider):
    B, T, S, dim, heads = shape
    key = (shape, provider)
    if key not in _blocks:
        torch.manual_seed(0)
        block = pvkernels.nn.SpaceTimeBlock(dim, heads, backend="reference" if provider == "compiled" else provider)
        block = block.to(DEVICE)
        _blocks[key] = torch.compile(block) if provider == "compiled" else block
    return _blocks[key]


@pytest.mark.parametrize("shape, provider", [(s, p) for s in block_shapes()
                                             for p in ("reference", "compiled", providers()[-1])])
def bench_space_time_block(benchmark, shape, provider):
    B, T, S, dim, heads = shape
    block = _block(shape, provider)
    x = torch.randn(B, T, S, dim, device=DEVICE, requires_grad=True)
    params = [p for p in block.parameters()]

    def call():
        y = block(x)
        return torch.autograd.grad(y.square().mean(), [x] + params)

    Dh = dim // heads
    attn_flops = 4 * B * heads * Dh * (T * S * S + S * T * T * 0.5) * 3.5
    linear_flops = 3 * 2 * B * T * S * dim * dim * 16  # (qkv + proj) x 2 attentions + MLP x4, fwd + bwd
    run(benchmark, call, "space_time_block", case_key("fwd+bwd", f"{B}x{T}x{S}x{dim}", f"h{heads}"), provider,
        12 * B * T * S * dim * 4, flops=attn_flops + linear_flops)
