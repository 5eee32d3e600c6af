"""The Triton backend on a CUDA device: the paths the interpreter cannot take.

On a GPU the attention kernels multiply fp16/bf16 on the tensor cores (the interpreter upcasts),
fp32 dots are bf16x6 / tf32x3 products, dbias is summed by atomics from thousands of programs,
grids pass 65535 sequences, and the pseudo-video kernel takes its 4-normals-per-Philox-counter
path at GPU sizes. Skipped without CUDA; ``PVKERNELS_CUDA_TESTS_ON_CPU=1`` runs the same tests
on the CPU through the interpreter at tiny shapes (how their logic is checked on a machine
without a GPU; the tests that only mean something at GPU scale are skipped there).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import pvkernels
from pvkernels import schedules
from pvkernels.ops.pseudo_video import pseudo_video_reference
from pvkernels.ops.rng import philox_normal_reference

from .utils import assert_close, attention_math, tolerance

ON_GPU = torch.cuda.is_available()
ON_CPU = not ON_GPU and os.environ.get("PVKERNELS_CUDA_TESTS_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (ON_GPU or ON_CPU), reason="needs CUDA (or PVKERNELS_CUDA_TESTS_ON_CPU=1 "
                                                                "with TRITON_INTERPRET=1)")
DEVICE = "cuda" if ON_GPU else "cpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="only meaningful at GPU scale")


def size(gpu, cpu):
    """A GPU-sized case, or its tiny stand-in under the interpreter."""
    return gpu if ON_GPU else cpu


def attend(kind, q, k, v, bias=None, backend="triton"):
    if kind == "spatial":
        return pvkernels.spatial_attention(q, k, v, bias=bias, backend=backend)
    return pvkernels.temporal_attention(q, k, v, causal=kind == "temporal_causal", bias=bias, backend=backend)


def rel_rms(x, exact):
    """||x - exact|| / ||exact|| (the max norm of a 16-bit error is one rounding at random places)."""
    return float((x.detach().double().cpu() - exact).norm() / exact.norm())


def f64(x):
    return None if x is None else x.detach().double().cpu().requires_grad_(x.requires_grad)


# attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["spatial", "temporal_causal", "temporal_full"])
@pytest.mark.parametrize("shape", [size((2, 18, 64, 4, 64), (1, 5, 7, 2, 16)),      # one block per sequence
                                   size((1, 70, 150, 2, 32), (1, 70, 66, 1, 16))])  # streamed key blocks
def test_attention_16bit_against_fp64(dtype, kind, shape):
    # the real 16-bit path (tensor-core products of the stored values, fp32 softmax and sums)
    # against the fp64 oracle: within 2x the error of PyTorch's own 16-bit SDPA, as DESIGN asks
    B, T, S, H, D = shape
    N = S if kind == "spatial" else T
    qkv = torch.randn(B, T, S, 3, H, D, device=DEVICE).to(dtype).requires_grad_()
    bias = torch.randn(H, N, N, device=DEVICE).to(dtype).requires_grad_()
    q, k, v = qkv.unbind(3)
    out = attend(kind, q, k, v, bias)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, bias), grad)
    qkv64, bias64 = f64(qkv), f64(bias)
    want_out = attention_math(*qkv64.unbind(3), bias64, kind != "spatial", kind == "temporal_causal")
    want = torch.autograd.grad(want_out, (qkv64, bias64), grad.double().cpu())
    torch_out = attend(kind, q, k, v, bias, backend="reference")  # PyTorch's SDPA in this dtype
    # the interpreter converts fp32 to bf16 / fp16 by truncation (twice the error of rounding to
    # nearest, which a GPU's cvt.rn does): a looser bound there
    factor = 2.0 if ON_GPU else 4.0
    torch_got = torch.autograd.grad(torch_out, (qkv, bias), grad)
    for name, mine, theirs, exact in (("out", out, torch_out, want_out), ("dqkv", got[0], torch_got[0], want[0]),
                                      ("dbias", got[1], torch_got[1], want[1])):
        mine_err, torch_err = (rel_rms(x, exact) for x in (mine, theirs))
        assert mine_err <= factor * torch_err + tolerance(torch.float32)[0], \
            f"{name}: relative error {mine_err:.3g} vs PyTorch's {torch_err:.3g} ({dtype}, {kind}, {shape})"


@pytest.mark.parametrize("kind", ["spatial", "temporal_causal"])
def test_attention_fp32_large_logits(kind):
    # fp32 products on a GPU are bf16x6 tensor-core dots: at logits of ~1e3 an error of 2**-21
    # per product (tf32x3) would already move the softmax past the fp32 tolerance
    shape = size((2, 7, 49, 2, 16), (1, 5, 7, 2, 16))
    q, k, v = (torch.randn(*shape, device=DEVICE) * 30 for _ in range(3))
    out = attend(kind, q, k, v)
    assert torch.isfinite(out).all()
    assert_close(out, attention_math(f64(q), f64(k), f64(v), None, kind != "spatial", kind == "temporal_causal"),
                 torch.float32, rtol=1e-4, atol=1e-3, name=kind)


def test_dbias_atomics_under_contention():
    # every (b, s) sequence of every head adds its dS into the same (H, T, T) buffer
    B, T, S, H, D = size((8, 18, 1024, 8, 32), (2, 6, 9, 2, 8))  # GPU: 65536 sequences on 8 x 18 x 18 floats
    q, k, v = (torch.randn(B, T, S, H, D, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(H, T, T, device=DEVICE, requires_grad=True)
    grad = torch.randn(B, T, S, H, D, device=DEVICE)
    dbias = torch.autograd.grad(pvkernels.temporal_attention(q, k, v, bias=bias, backend="triton"), bias, grad)[0]
    again = torch.autograd.grad(pvkernels.temporal_attention(q, k, v, bias=bias, backend="triton"), bias, grad)[0]
    q64, k64, v64, b64 = (f64(x) for x in (q, k, v, bias))
    want = torch.autograd.grad(attention_math(q64, k64, v64, b64, True, True), b64, grad.double().cpu())[0]
    scale = want.abs().max().item()
    assert_close(dbias, want, torch.float32, atol=1e-5 * scale, rtol=1e-4, name="dbias")
    # atomics sum in any order: two runs agree to rounding, not bit for bit
    assert_close(again, dbias, torch.float32, atol=1e-6 * scale, rtol=1e-5, name="dbias rerun")
    assert bias.grad is None  # autograd.grad does not accumulate


@gpu_only
@pytest.mark.parametrize("kind", ["temporal_causal", "spatial"])
def test_more_than_65535_sequences(kind):
    # 65600 sequences in the grid's first dimension (SDPA's fused kernels stop at 65535)
    shape = (1, 3, 8200, 8, 64) if kind != "spatial" else (1, 8200, 3, 8, 64)
    q, k, v = (torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attend(kind, q, k, v)
    out.float().square().sum().backward()
    axis = 2 if kind != "spatial" else 1
    idx = torch.tensor([0, 4097, 8199], device=DEVICE)  # the first, a middle and the last positions
    sub = lambda x: x.detach().index_select(axis, idx).float()  # noqa: E731
    want = attention_math(f64(sub(q)), f64(sub(k)), f64(sub(v)), None, kind != "spatial", kind != "spatial")
    assert_close(out.index_select(axis, idx), want, torch.bfloat16, name=kind)
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_attention_nan_stays_in_its_sequence():
    B, T, S, H, D = size((2, 18, 64, 4, 32), (1, 5, 6, 2, 16))
    q, k, v = (torch.randn(B, T, S, H, D, device=DEVICE) for _ in range(3))
    clean = pvkernels.temporal_attention(q, k, v, backend="triton")
    q[0, 2, 3, 1, 0] = float("nan")  # one query of the (b=0, s=3, h=1) sequence
    out = pvkernels.temporal_attention(q, k, v, backend="triton")
    assert out[0, 2, 3, 1].isnan().all()
    others = torch.ones_like(out, dtype=torch.bool)
    others[0, 2, 3, 1] = False
    assert torch.equal(out[others], clean[others])
    k[0, 0, 3, 1, 0] = float("nan")  # a key every later query of that sequence sees
    out = pvkernels.temporal_attention(q, k, v, backend="triton")
    assert out[0, :, 3, 1].isnan().all()
    others[0, :, 3, 1] = False
    assert torch.equal(out[others], clean[others])


# vector quantisation ---------------------------------------------------------------------------

def _near_optimal(z, codebook, idx, metric):
    z64, e64 = z.double().cpu().reshape(-1, codebook.shape[1]), codebook.double().cpu()
    if metric == "l2":
        s = z64.pow(2).sum(1, keepdim=True) - 2 * z64 @ e64.T + e64.pow(2).sum(1)
        scale = z64.pow(2).sum(1) + e64.pow(2).sum(1).max()
    else:
        s = -(torch.nn.functional.normalize(z64, dim=1) @ torch.nn.functional.normalize(e64, dim=1).T)
        scale = torch.ones(s.shape[0], dtype=torch.float64)
    chosen = s.gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
    return float(((chosen - s.min(1).values) / scale).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("D", [64, 256])
def test_vq_against_fp64(dtype, metric, D):
    # fp16/bf16 l2: tensor-core products of the stored values; fp32 and cosine: 3xTF32 products
    N, K = size((20000, 8192), (300, 700))
    z = torch.randn(N, D, device=DEVICE).to(dtype)
    codebook = torch.randn(K, D, device=DEVICE).to(dtype)
    idx, zq = pvkernels.vq_lookup(z, codebook, metric=metric, backend="triton")
    assert idx.dtype == torch.int64 and int(idx.min()) >= 0 and int(idx.max()) < K
    assert torch.equal(zq, codebook[idx])
    assert _near_optimal(z, codebook, idx, metric) <= 1e-5
    ref_idx, _ = pvkernels.vq_lookup(z, codebook, metric=metric, backend="reference")
    assert (idx == ref_idx).float().mean() > 0.999  # the same code but for near-ties


@gpu_only  # the interpreter's argmax raises on an all-NaN row
def test_vq_nan_rows():
    z = torch.randn(size(4096, 70), 64, device=DEVICE)
    codebook = torch.randn(size(4096, 300), 64, device=DEVICE)
    clean, _ = pvkernels.vq_lookup(z, codebook, backend="triton")
    z[5, 3] = float("nan")
    idx, zq = pvkernels.vq_lookup(z, codebook, backend="triton")
    assert 0 <= int(idx[5]) < codebook.shape[0]  # a valid code for the NaN row (code 0, as torch's argmin)
    assert int(idx[5]) == int(pvkernels.vq_lookup(z, codebook, backend="reference")[0][5])
    keep = torch.arange(z.shape[0], device=DEVICE) != 5
    assert torch.equal(idx[keep], clean[keep])


@pytest.mark.parametrize("decay", [None, 0.9])
def test_vector_quantizer(decay):
    B, H, W = size((8, 16, 16), (2, 3, 5))
    mods = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        mods[backend] = pvkernels.nn.VectorQuantizer(64, size(1024, 64), decay=decay, backend=backend).to(DEVICE)
    z = torch.randn(B, H, W, 64, device=DEVICE, requires_grad=True)
    out = {}
    for backend, vq in mods.items():
        zz = z.detach().clone().requires_grad_()
        zq, idx, loss = vq(zz)
        (zq.square().mean() + loss).backward()
        out[backend] = (zq, idx, loss, zz.grad, vq.codebook.grad if decay is None else vq.codebook)
    for name, a, b in zip(("zq", "idx", "loss", "dz", "codebook"), out["triton"], out["reference"]):
        assert_close(a, b, torch.float32, name=name)
    assert float(mods["triton"].perplexity) > 1


# the space-time block ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_space_time_block(dtype):
    B, T, S, dim, heads = size((2, 8, 64, 256, 8), (1, 4, 6, 32, 2))
    blocks = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        blocks[backend] = pvkernels.nn.SpaceTimeBlock(dim, heads, backend=backend).to(DEVICE, dtype)
    x = torch.randn(B, T, S, dim, device=DEVICE, dtype=dtype)
    res = {}
    for backend, block in blocks.items():
        xx = x.clone().requires_grad_()
        y = block(xx)
        y.float().square().mean().backward()
        res[backend] = [y, xx.grad] + [p.grad for p in block.parameters()]
    rtol, atol = tolerance(dtype) if dtype == torch.float32 else (4e-2, 4e-2)  # vs PyTorch's bf16 SDPA
    for i, (a, b) in enumerate(zip(res["triton"], res["reference"])):
        scale = b.abs().max().item()
        assert_close(a, b, dtype, rtol=rtol, atol=atol * max(scale, 1.0), name=f"tensor {i}")


# pseudo video -----------------------------------------------------------------------------

def _pv_oracle(x, p, seed):
    T = len(p["blur_sigma"] if "blur_sigma" in p else p["noise_std"])
    get = lambda key, d: p.get(key) or [d] * T  # noqa: E731
    return pseudo_video_reference(x.double().cpu(), get("blur_sigma", 0.0), get("noise_std", 0.0),
                                  get("signal_scale", 1.0), p["order"] == "first", seed, None, 3.0)


@pytest.mark.parametrize("hw", [(32, 32), (17, 29), size((256, 200), (70, 90))])  # one block; odd; tiled
@pytest.mark.parametrize("order", ["high", "first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pseudo_video_against_reference(hw, order, dtype):
    # blur products are 3xTF32 on a GPU; noise is the same Philox stream as the reference
    B, C = size((64, 3), (1, 2))
    x = torch.rand(B, C, *hw, device=DEVICE).to(dtype)
    p = schedules.combine(schedules.linear_blur(18, 3.0, order), schedules.ddpm_noise(18, "linear", order))
    out = pvkernels.pseudo_video(x, **p, seed=11, backend="triton")
    assert torch.equal(out[:, -1], x)
    assert_close(out, _pv_oracle(x, p, 11), dtype, name=f"{hw} {order} {dtype}")


@pytest.mark.parametrize("W", [32, 29])  # four normals per Philox counter (W % 4 == 0); one per element
def test_pseudo_video_philox_stream(W):
    # pure noise, scale 1: (v - x) / std is the stream itself, element for element
    B, C, H, T = size((128, 3, 32, 18), (2, 3, 5, 4))
    x = torch.rand(B, C, H, W, device=DEVICE)
    std = [0.5] * (T - 1) + [0.0]
    for seed in (0, 2**40 + 7):  # both key words
        out = pvkernels.pseudo_video(x, noise_std=std, seed=seed, backend="triton")
        eps = ((out[:, :-1] - x[:, None]) / 0.5).double().cpu()
        index = torch.arange(B * T * C * H * W).view(B, T, C, H, W)[:, :-1]
        assert_close(eps, philox_normal_reference(seed, index), torch.float32, rtol=2e-5, atol=2e-5,
                     name=f"seed {seed}")
        if pvkernels.cpp_available():
            cpp = pvkernels.pseudo_video(x.cpu(), noise_std=std, seed=seed, backend="cpp")
            assert_close(out, cpp, torch.float32, name="cpp")


def test_pseudo_video_nan_stays_in_its_plane():
    # a non-finite pixel poisons the blurred frames of its own plane (the blur is a product with
    # the whole tile), never another plane; frame T-1 is x, NaN included
    x = torch.rand(size(16, 2), 3, 32, 32, device=DEVICE)
    p = schedules.linear_blur(4, 2.0)
    clean = pvkernels.pseudo_video(x, **p, backend="triton")
    x[1, 2, 5, 7] = float("nan")
    out = pvkernels.pseudo_video(x, **p, backend="triton")
    assert out[1, -1, 2, 5, 7].isnan() and out[1, 0, 2, 5, 7].isnan()
    others = torch.ones(out.shape[0], out.shape[2], dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(out.permute(0, 2, 1, 3, 4)[others], clean.permute(0, 2, 1, 3, 4)[others])


# lookup-free quantisation ---------------------------------------------------------------------

@pytest.mark.parametrize("N, d, t", [(size(1000, 7), size(16, 9), 100.0), (size(1000, 7), size(16, 9), 0.5),
                                     (size(1000, 7), size(13, 5), 3.0), (size(48, 3), size(20, 10), 1.0)])
def test_lfq_entropy_against_fp64(N, d, t):
    # the GPU's (32 x 64) / (32 x 32) code tiles, odd d (a ragged half), the peer's sharp softmax;
    # the fp64 oracle runs on the CPU (48 tokens of 20 bits: 800 MB of fp64 probabilities)
    C = 2
    x = torch.randn(N, C, d, device=DEVICE)
    g_avg = torch.randn(C, 2 ** d, device=DEVICE)
    ps, avg = pvkernels.lfq_entropy(x.requires_grad_(), t, backend="triton")
    (grad,) = torch.autograd.grad(ps * 0.7 + (avg * g_avg).sum(), x)
    x64 = f64(x)
    ps64, avg64 = pvkernels.lfq_entropy(x64, t, backend="reference")
    (grad64,) = torch.autograd.grad(ps64 * 0.7 + (avg64 * g_avg.double().cpu()).sum(), x64)
    assert_close(ps, ps64, rtol=1e-4, atol=1e-5, name="per-sample entropy")
    assert_close(avg, avg64, rtol=1e-4, atol=1e-6, name="avg_prob")
    assert_close(grad, grad64, rtol=1e-3, atol=1e-5 * max(1.0, grad64.abs().max().item()), name="grad x")


@gpu_only
def test_lfq_entropy_past_the_dense_memory():
    # 16384 tokens of 18 bits: the dense probabilities alone would be 17 GB
    x = torch.randn(16384, 1, 18, device=DEVICE, requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    ps, avg = pvkernels.lfq_entropy(x, backend="triton")
    (ps - (avg * avg.clamp(min=1e-5).log()).sum()).backward()
    assert math.isfinite(float(ps)) and abs(float(avg.sum()) - 1.0) < 1e-3
    assert torch.cuda.max_memory_allocated() < 1 << 30


# diffusers ---------------------------------------------------------------------------------------

@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusers_motion_module_past_65535_sequences(dtype):
    """AnimateDiff's motion module at SD 1.5's first width on a 128 x 128 latent at batch 4: 65536
    sequences of 16 frames, where SDPA's fused kernels fail. Patched (strict), against the unpatched
    module on SDPA's math backend in fp32; bf16 within 2x of the math backend's own bf16 error."""
    pytest.importorskip("diffusers")
    import copy

    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pvkernels import integrations

    torch.manual_seed(0)
    block = AnimateDiffTransformer3D(num_attention_heads=8, attention_head_dim=40, in_channels=320,
                                     norm_num_groups=32, positional_embeddings="sinusoidal",
                                     num_positional_embeddings=32).cuda()
    x, grad = torch.randn(64, 320, 128, 128, device="cuda"), torch.randn(64, 320, 128, 128, device="cuda")

    def run(module, dt, patched):
        m = copy.deepcopy(module).to(dt)
        x_ = x.to(dt).requires_grad_(True)
        if patched:
            with integrations.patch_diffusers(m, strict=True) as p:
                out = m(x_, num_frames=16)
                out.backward(grad.to(dt))
            assert p.stats == {"fast": 2, "fallback": {}}
        else:
            with sdpa_kernel(SDPBackend.MATH):
                out = m(x_, num_frames=16)
                out.backward(grad.to(dt))
        return out.float(), x_.grad.float()

    exact = run(block, torch.float32, False)
    got = run(block, dtype, True)
    if dtype == torch.float32:
        assert_close(got[0], exact[0], rtol=1e-4, atol=1e-4)
        assert_close(got[1], exact[1], rtol=1e-4, atol=1e-4 * float(exact[1].abs().max()))
    else:
        own = run(block, dtype, False)
        for e, g, o in zip(exact, got, own):
            assert float((g - e).abs().max()) <= 2 * float((o - e).abs().max())


# torch.compile ----------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    # functions calling the Triton ops trace into one graph (the custom ops' fake kernels)
    B, T, S, H, D = size((2, 8, 64, 4, 32), (1, 4, 5, 2, 16))
    qkv = torch.randn(B, T, S, 3, H, D, device=DEVICE, requires_grad=True)
    codebook = torch.randn(size(512, 40), D, device=DEVICE)
    x = torch.rand(B, 3, 16, 16, device=DEVICE)
    p = schedules.combine(schedules.linear_blur(4, 1.5), schedules.ddpm_noise(4))

    def f(qkv, codebook, x):
        q, k, v = qkv.unbind(3)
        o = pvkernels.spatial_attention(q, k, v, backend="triton")
        o = pvkernels.temporal_attention(o, k, v, backend="triton")
        idx, zq = pvkernels.vq_lookup(o.reshape(-1, D), codebook, backend="triton")
        video = pvkernels.pseudo_video(x, p["blur_sigma"], p["noise_std"], p["signal_scale"], seed=5,
                                       backend="triton")
        return o.square().mean() + zq.mean(), idx, video

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager = f(qkv, codebook, x)
    got = compiled(qkv, codebook, x)
    assert_close(got[0], eager[0], torch.float32, name="loss")
    assert torch.equal(got[1], eager[1]) and torch.equal(got[2], eager[2])
    g_eager = torch.autograd.grad(eager[0], qkv)[0]
    g_comp = torch.autograd.grad(got[0], qkv)[0]
    assert_close(g_comp, g_eager, torch.float32, name="dqkv")
    assert math.isfinite(float(got[0]))


# the GPU's tiles, run by the interpreter -------------------------------------------------------

@pytest.mark.skipif(not ON_CPU, reason="on a GPU every test above runs these tiles for real")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, N, D", [("temporal_causal", 7, 40), ("temporal_causal", 18, 40),
                                        ("temporal_full", 40, 40), ("spatial", 70, 40), ("temporal_full", 16, 80)])
def test_gpu_tiles_in_the_interpreter(monkeypatch, dtype, kind, N, D):
    # the block sizes the GPU launches (one fused block per sequence up to 32 frames: fp32 at 7 and
    # 18, and 16 at head dim 80; 16-bit up to 32; 16- to 32-key blocks and the three-kernel backward
    # beyond), with the interpreter's fp32 products, against the fp64 oracle
    from pvkernels.ops import attention, vq

    def gpu_tiles(*args):
        with monkeypatch.context() as m:
            m.setattr(attention, "triton_interpret", lambda: False)
            cfg = real(*args)
        return {k: dict(v, UPCAST=True, PRECISION="ieee") if isinstance(v, dict) else v for k, v in cfg.items()}

    real = attention._configs
    monkeypatch.setattr(attention, "_configs", gpu_tiles)
    B, A, H = 1, 3, 2
    shape = (B, N, A, H, D) if kind != "spatial" else (B, A, N, H, D)
    qkv = torch.randn(*shape[:3], 3, H, D).to(dtype).requires_grad_()
    bias = torch.randn(H, N, N).to(dtype).requires_grad_()
    out = attend(kind, *qkv.unbind(3), bias)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, bias), grad)
    qkv64, bias64 = f64(qkv), f64(bias)
    want_out = attention_math(*qkv64.unbind(3), bias64, kind != "spatial", kind == "temporal_causal")
    want = torch.autograd.grad(want_out, (qkv64, bias64), grad.double())
    assert_close(out, want_out, dtype, name="out")
    assert_close(got[0], want[0], dtype, name="dqkv")
    assert_close(got[1], want[1], dtype, atol=tolerance(dtype)[1] * max(1.0, want[1].abs().max().item()),
                 name="dbias")
    # every tile the VQ autotuner may pick on a GPU, with its feature chunks (72 = three of 32)
    dot_fp32 = dtype == torch.float32
    z, codebook = torch.randn(300, 72).to(dtype), torch.randn(200, 72).to(dtype)
    with monkeypatch.context() as m:
        m.setattr(vq, "triton_interpret", lambda: False)
        chunk = vq._config(72, dot_fp32)["BLOCK_D"]
    for c in vq._TUNED[dot_fp32].configs:
        monkeypatch.setattr(vq, "_config", lambda D, fp32, c=c: dict(c.kwargs, BLOCK_D=chunk, ONE_CHUNK=chunk >= D,
                                                                    DOT_FP32=fp32, PRECISION="ieee"))
        idx, _ = pvkernels.vq_lookup(z, codebook, backend="triton")
        assert _near_optimal(z, codebook, idx, "l2") <= 1e-5, c
