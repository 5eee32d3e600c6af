"""spatial / temporal attention and a SpaceTimeBlock: reference (permute + SDPA), torch.compile of
it, cpp (triton on CUDA), forward and forward+backward, side by side in one run.

Roofline: forward moves q, k, v in and o out (4 tensors); forward+backward adds o, dO, lse in and
dq, dk, dv out (12 tensors in all). FLOPs: 4 B A H N^2 Dh forward (half when causal), 2.5x that
for the backward.
"""
import pytest
import torch

import pvkernels
from pvkernels.ops.attention import attention_reference

from .harness import HAS_CUDA, QUICK, run

SHAPES = [(2, 5, 16, 2, 16)] if QUICK else [(4, 18, 256, 8, 32), (16, 8, 64, 8, 64)]
BLOCK_SHAPES = [(2, 4, 16, 32, 2)] if QUICK else [(4, 8, 64, 256, 8), (4, 18, 64, 128, 4)]  # B, T, S, dim, heads
FAST = "triton" if HAS_CUDA else "cpp"
PROVIDERS = ["reference", "compiled", FAST]
DEVICE = "cuda" if HAS_CUDA else "cpu"

_compiled_reference = torch.compile(attention_reference)


def _fn(kind, provider):
    temporal, causal = kind == "temporal", kind == "temporal"
    if provider == "reference":
        return lambda q, k, v: attention_reference(q, k, v, None, temporal, causal)
    if provider == "compiled":
        return lambda q, k, v: _compiled_reference(q, k, v, None, temporal, causal)
    if temporal:
        return lambda q, k, v: pvkernels.temporal_attention(q, k, v, causal=True, backend=provider)
    return lambda q, k, v: pvkernels.spatial_attention(q, k, v, backend=provider)


@pytest.mark.parametrize("kind, mode, shape, provider",
                         [(k, m, s, p) for k in ("temporal", "spatial") for m in ("fwd", "fwd+bwd") for s in SHAPES
                          for p in PROVIDERS])
def bench_attention(benchmark, kind, mode, shape, provider):
    B, T, S, H, D = shape
    qkv = torch.randn(B, T, S, 3, H, D, device=DEVICE, requires_grad=mode != "fwd")
    q, k, v = qkv.unbind(3)  # the packed-projection views a model hands over
    fn = _fn(kind, provider)
    numel = q.numel()
    N = T if kind == "temporal" else S
    flops = 4 * B * H * (S if kind == "temporal" else T) * N * N * D * (0.5 if kind == "temporal" else 1.0)
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
    run(benchmark, call, f"{kind}_attention", f"{mode}/{'x'.join(map(str, shape))}", provider, tensors * numel * 4,
        DEVICE, flops=flops)


@pytest.mark.parametrize("kind, dtype, provider",
                         [(k, d, p) for k in ("temporal", "spatial") for d in ("bfloat16", "float16")
                          for p in ("reference", FAST)])
def bench_attention_16bit(benchmark, kind, dtype, provider):
    # forward on 16-bit inputs (fp32 softmax and accumulation in the kernels), first shape only
    B, T, S, H, D = shape = SHAPES[0]
    q, k, v = torch.randn(B, T, S, 3, H, D, device=DEVICE, dtype=getattr(torch, dtype)).unbind(3)
    fn = _fn(kind, provider)
    N = T if kind == "temporal" else S
    flops = 4 * B * H * (S if kind == "temporal" else T) * N * N * D * (0.5 if kind == "temporal" else 1.0)

    def call():
        with torch.no_grad():
            return fn(q, k, v)
    run(benchmark, call, f"{kind}_attention", f"fwd/{'x'.join(map(str, shape))}/{dtype}", provider,
        4 * q.numel() * 2, DEVICE, flops=flops)


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


@pytest.mark.parametrize("shape, provider", [(s, p) for s in BLOCK_SHAPES for p in PROVIDERS])
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
    run(benchmark, call, "space_time_block", f"fwd+bwd/{B}x{T}x{S}x{dim}/h{heads}", provider,
        12 * B * T * S * dim * 4, DEVICE, flops=attn_flops + linear_flops)
