"""spatial_attention / temporal_attention: every backend against the fp64 oracle, forward and
backward, causality, bias gradients, strided views, odd shapes, big batches, modules, compile."""
import ctypes
import mmap
import os
import random
import subprocess
import sys

import pytest
import torch

import pvkernels
from pvkernels.ops.attention import MAX_HEAD_DIM

from .utils import assert_close, attention_math, dev, tolerance

BACKENDS = ["reference", "cpp", "triton"]
KINDS = ["spatial", "temporal_causal", "temporal_full"]


def attend(kind, q, k, v, bias=None, backend="auto"):
    if kind == "spatial":
        return pvkernels.spatial_attention(q, k, v, bias=bias, backend=backend)
    return pvkernels.temporal_attention(q, k, v, causal=kind == "temporal_causal", bias=bias, backend=backend)


def oracle(kind, q, k, v, bias=None):
    """fp64 softmax(q k^T / sqrt(Dh) + bias) v on the CPU."""
    d = lambda x: None if x is None else x.detach().double().cpu().requires_grad_(x.requires_grad)  # noqa: E731
    return attention_math(d(q), d(k), d(v), d(bias), kind != "spatial", kind == "temporal_causal")


def packed(B, T, S, H, D, device, dtype=torch.float32):
    """q, k, v as the strided views of one (B, T, S, 3, H, Dh) projection, plus the leaf."""
    qkv = torch.randn(B, T, S, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    return qkv, qkv.unbind(3)


def check_forward_backward(kind, backend, shape, with_bias, dtype=torch.float32):
    B, T, S, H, D = shape
    device = dev(backend)
    qkv, (q, k, v) = packed(B, T, S, H, D, device, dtype)
    N = S if kind == "spatial" else T
    bias = torch.randn(H, N, N, device=device, dtype=dtype, requires_grad=True) if with_bias else None
    out = attend(kind, q, k, v, bias, backend)
    assert out.shape == (B, T, S, H, D) and out.dtype == dtype and out.is_contiguous()
    grad = torch.randn_like(out)
    leaves = [qkv] + ([bias] if with_bias else [])
    got = torch.autograd.grad(out, leaves, grad)

    qkv64 = qkv.detach().double().cpu().requires_grad_()
    bias64 = bias.detach().double().cpu().requires_grad_() if with_bias else None
    expected = attention_math(*qkv64.unbind(3), bias64, kind != "spatial", kind == "temporal_causal")
    want = torch.autograd.grad(expected, [qkv64] + ([bias64] if with_bias else []), grad.double().cpu())
    name = f"{backend}/{kind}/{shape}/bias={with_bias}"
    assert_close(out, expected, dtype, name=name + " out")
    assert_close(got[0], want[0], dtype, name=name + " dqkv")
    if with_bias:
        assert_dbias_close(got[1], want[1], dtype, name=name + " dbias")


def assert_dbias_close(got, want, dtype, name):
    # dbias sums over B * A sequences: the absolute tolerance scales with its largest entry
    atol = tolerance(dtype)[1] * max(want.abs().max().item(), 1.0)
    assert_close(got, want, dtype, atol=atol, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 49, 2, 40), (2, 5, 6, 3, 16)])
def test_matches_fp64_oracle(backend, kind, with_bias, shape):
    check_forward_backward(kind, backend, shape, with_bias)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("kind", ["temporal_full", "temporal_causal"])
@pytest.mark.parametrize("shape", [(4, 16, 1, 2, 40), (4, 12, 1, 2, 8), (4, 8, 1, 4, 4), (4, 33, 1, 2, 1)],
                         ids=["rows", "lanes", "lanes-small", "blocked"])  # the cpp kernel families (AVX-512)
def test_gradients_of_a_peaked_softmax(backend, kind, shape):
    # scores ~100 (q, k ~ 10 N(0, 1)): the backward's P = exp(s - lse) is off by lse's rounding, one
    # relative error per row (~8e-6), which delta = rowsum(P * dP) carried into the cancellation in
    # dP - delta: over 6 draws dQ and dK here 5-55x the error of the reference's fp32 (torch's
    # softmax backward) in 9 of these cases before delta was renormalised (csrc/attention.h,
    # softmax_renorm), 0.3-2.2x after
    device = dev(backend)
    worst = {"fused": 0.0, "reference": 0.0}
    for _ in range(6):
        q, k, v = (10 * torch.randn(shape, device=device) for _ in range(3))
        grad = torch.randn(shape, device=device)
        leaves = [x.double().cpu().requires_grad_() for x in (q, k, v)]
        want = torch.autograd.grad(attention_math(*leaves, None, True, kind == "temporal_causal"), leaves[:2],
                                   grad.double().cpu())
        for name, b in (("fused", backend), ("reference", "reference")):
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            got = torch.autograd.grad(attend(kind, *leaves, backend=b), leaves[:2], grad)
            for g, w in zip(got, want):
                worst[name] = max(worst[name], ((g.double().cpu() - w).abs().max() / w.abs().max()).item())
    # CUDA's fp32 products are tf32x3 (three tf32 products), a little less exact than the CPU's
    assert worst["fused"] <= (3.0 if device == "cpu" else 4.0) * worst["reference"], worst


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_masked_leading_key_blocks(backend, kind):
    # a -inf bias hiding the first 133 of 200 keys from the first 100 queries (causal: the first
    # 66 from the last 100), no row all -inf: over those key blocks an online softmax's running max
    # stays -inf, where exp(-inf - -inf) must not make the row NaN
    N = 200
    shape = (1, 2, N, 2, 16) if kind == "spatial" else (1, N, 2, 2, 16)
    device = dev(backend)
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, N, N, device=device)
    if kind == "temporal_causal":
        bias[:, N // 2:, : N // 3] = float("-inf")
    else:
        bias[:, : N // 2, : 2 * N // 3] = float("-inf")
    bias.requires_grad_()
    out = attend(kind, q, k, v, bias, backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), grad)
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, bias)]
    expected = attention_math(*leaves, kind != "spatial", kind == "temporal_causal")
    want = torch.autograd.grad(expected, leaves, grad.double().cpu())
    assert_close(out, expected, torch.float32, name=f"{backend}/{kind} out")
    for g, w, n in zip(got[:3], want[:3], "qkv"):
        assert_close(g, w, torch.float32, name=f"{backend}/{kind} d{n}")
    assert_dbias_close(got[3], want[3], torch.float32, name=f"{backend}/{kind} dbias")


@pytest.mark.parametrize("backend, kernel, kind, N", [
    (backend, kernel, kind, N) for kind, N in [("temporal_full", 16), ("temporal_causal", 16), ("spatial", 5),
                                               ("spatial", 70), ("temporal_causal", 200)]
    for backend, kernel in [("cpp", None), ("triton", None)] + ([("cpp", "rows"), ("cpp", "lanes")] if N <= 16 else [])])
def test_fully_masked_queries(monkeypatch, backend, kernel, kind, N):
    # queries whose every key a -inf bias hides (every third; causal: query 0 too, whose one key is
    # masked): a zero output row and nothing through it backward, what the reference (SDPA) gives,
    # where softmax's 0 / 0 would be NaN. N 16: both short-sequence cpp kernels; 70 and 200 the
    # blocked one and several Triton key blocks
    if kernel is not None:
        monkeypatch.setenv("PVKERNELS_CPU_ATTENTION_KERNEL", kernel)
    shape = (2, 3, N, 2, 24) if kind == "spatial" else (2, N, 3, 2, 24)
    device = dev(backend)
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, N, N, device=device)
    bias[:, 1::3, :] = float("-inf")
    bias[:, 0, 0] = float("-inf")
    bias.requires_grad_()
    out = attend(kind, q, k, v, bias, backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), grad)
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, bias)]
    expected = attend(kind, *leaves, backend="reference")
    want = torch.autograd.grad(expected, leaves, grad.double().cpu())
    rows = out.index_select(2 if kind == "spatial" else 1, torch.arange(1, N, 3, device=device))
    assert torch.equal(rows, torch.zeros_like(rows)), f"{backend}/{kind}: fully masked queries are not zero"
    assert_close(out, expected, torch.float32, name=f"{backend}/{kind} out")
    for g, w, n in zip(got[:3], want[:3], "qkv"):
        assert_close(g, w, torch.float32, name=f"{backend}/{kind} d{n}")
    assert not got[3].isnan().any(), f"{backend}/{kind}: NaN in dbias"
    finite = want[3].isfinite()
    assert_dbias_close(got[3][finite.to(device)], want[3][finite], torch.float32, name=f"{backend}/{kind} dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 1, 5, 2, 16), (1, 3, 1, 1, 8), (1, 18, 3, 2, 128), (1, 33, 2, 1, 24),
                                   (1, 6, 5, 20, 8), (1, 5, 20, 3, 20)])
def test_edge_shapes(backend, kind, shape):
    # T = 1, S = 1, Dh = 128, sequences longer than one 16-lane / one Triton block, more heads
    # than the 16 lanes of a cpp short-sequence unit, a head dim that is no multiple of 8 lanes
    # (the masked tails of the cpp kernels' row loads and stores)
    check_forward_backward(kind, backend, shape, with_bias=True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("kind, shape", [("spatial", (1, 2, 150, 1, 32)), ("temporal_causal", (1, 70, 3, 1, 32)),
                                         ("spatial", (1, 2, 136, 2, 32)), ("temporal_causal", (1, 72, 2, 2, 16))])
def test_long_sequence(backend, kind, shape):
    # past one Triton block (64) and past the cpp short-sequence kernel: the blocked cpp kernels
    # with several 16-query chunks, N % 8 != 0 and == 0
    check_forward_backward(kind, backend, shape, with_bias=True)


@pytest.mark.parametrize("kind, shape", [("spatial", (1, 1, 273, 2, 40)), ("temporal_causal", (1, 141, 1, 2, 24))])
def test_cpp_backward_in_query_blocks(kind, shape):
    # the blocked kernel's backward takes 64 queries a block (csrc/attention_blocked.cpp, BQB): five
    # and three blocks, the last partial, N % 16 != 0; dK, dV (and dbias) summed over the blocks
    check_forward_backward(kind, "cpp", shape, with_bias=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["oracle", "reference backend"])
def test_oracle_and_reference_backend_pass_fp64_gradcheck(kind, path):
    # the gradients the tests compare with come from autograd through the fp64 oracle
    # (tests.utils.attention_math); the reference backend is SDPA's. Both against finite
    # differences, the bias gradient included
    B, T, S, H, D = 1, 3, 4, 2, 5
    q, k, v = (torch.randn(B, T, S, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    N = S if kind == "spatial" else T
    bias = torch.randn(H, N, N, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, b):
        if path == "oracle":
            return attention_math(q, k, v, b, kind != "spatial", kind == "temporal_causal")
        return attend(kind, q, k, v, b, "reference")

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("kind, shape", [("spatial", (2, 5, 7, 3, 12)), ("temporal_causal", (2, 5, 7, 3, 12)),
                                         ("temporal_full", (2, 5, 7, 3, 12)), ("spatial", (1, 2, 67, 1, 8)),
                                         ("temporal_causal", (1, 67, 2, 1, 8))])
def test_fused_gradients_pass_fp64_gradcheck(backend, kind, shape):
    # gradcheck's fast mode for kernels that compute in fp32 (one block per sequence and, past
    # 64, the multi-block backward): for random directions u of (q, k, v, bias) and w of the
    # output, the fused backward's <w, J u> against central differences of the fp64 reference
    # backend, on fresh random inputs; then every gradient element against the fp64 reference's
    B, T, S, H, D = shape
    device = dev(backend)
    N = S if kind == "spatial" else T
    leaves = [torch.randn(B, T, S, H, D, device=device, requires_grad=True) for _ in range(3)]
    leaves.append(torch.randn(H, N, N, device=device, requires_grad=True))
    out = attend(kind, *leaves, backend=backend)
    w = torch.randn_like(out)
    got = [g.double().cpu() for g in torch.autograd.grad(out, leaves, w)]
    x64 = [x.detach().double().cpu() for x in leaves]

    def ref(xs):
        return attend(kind, *xs, backend="reference")

    eps = 1e-6
    for _ in range(3):
        u = [torch.randn_like(x) for x in x64]
        plus, minus = ref([x + eps * d for x, d in zip(x64, u)]), ref([x - eps * d for x, d in zip(x64, u)])
        numeric = ((plus - minus) / (2 * eps) * w.double().cpu()).sum().item()
        analytic = sum((g * d).sum() for g, d in zip(got, u)).item()
        scale = sum((g * d).abs().sum() for g, d in zip(got, u)).item()  # fp32 rounding is relative to this
        assert abs(analytic - numeric) <= 1e-5 * scale, f"<w, J u>: fused {analytic!r}, fp64 differences {numeric!r}"
    x64 = [x.requires_grad_() for x in x64]
    want = torch.autograd.grad(ref(x64), x64, w.double().cpu())
    for g, r, name in zip(got, want, ("dq", "dk", "dv", "dbias")):
        if name == "dbias":
            assert_dbias_close(g, r, torch.float32, name=name)
        else:
            assert_close(g, r, torch.float32, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality(backend):
    B, T, S, H, D = 2, 6, 5, 2, 16
    device = dev(backend)
    q, k, v = (torch.randn(B, T, S, H, D, device=device) for _ in range(3))
    out = pvkernels.temporal_attention(q, k, v, backend=backend)
    t = 2
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, t + 1:] += torch.randn_like(x[:, t + 1:])
    out2 = pvkernels.temporal_attention(q2, k2, v2, backend=backend)
    assert torch.equal(out[:, : t + 1], out2[:, : t + 1])
    assert not torch.equal(out[:, t + 1:], out2[:, t + 1:])
    # the first frame only sees itself: exactly v[:, 0]
    assert torch.equal(out[:, 0], v[:, 0])
    # gradients of the outputs at frames <= t reach no input at frames > t
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = pvkernels.temporal_attention(*leaves, backend=backend)
    grads = torch.autograd.grad(o[:, : t + 1].square().sum(), leaves)
    for g in grads:
        assert torch.count_nonzero(g[:, t + 1:]) == 0
        assert torch.count_nonzero(g[:, : t + 1]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_are_stable(backend):
    B, T, S, H, D = 1, 5, 7, 2, 16
    device = dev(backend)
    q, k, v = (torch.randn(B, T, S, H, D, device=device) * 30 for _ in range(3))
    # scores reach ~4000, where one fp32 rounding (2**-24 relative) of the product and one of the
    # scale shift a probability by up to 2**-23 * |s| / 4, and the output by that times |v|
    s_max = (q.double().flatten(0, 3) @ k.double().flatten(0, 3).T).abs().max().item() / D ** 0.5
    atol = 2**-23 * s_max / 4 * v.abs().max().item()
    for kind in KINDS:
        out = attend(kind, q, k, v, backend=backend)
        assert torch.isfinite(out).all()
        assert_close(out, oracle(kind, q, k, v), torch.float32, rtol=0, atol=atol, name=kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_without_grad(backend):
    B, T, S, H, D = 2, 4, 5, 2, 8
    device = dev(backend)
    q, k, v = (torch.randn(B, T, S, H, D, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(H, T, T, device=device)
    out = pvkernels.temporal_attention(q, k, v, bias=bias, backend=backend)
    out.sum().backward()
    assert bias.grad is None and q.grad is not None
    assert_close(out, oracle("temporal_causal", q, k, v, bias), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 5, 6, 3, 16), (1, 40, 20, 2, 16)])  # cpp: short-sequence, blocked kernels
def test_arbitrary_strides(backend, kind, shape):
    B, T, S, H, D = shape
    device = dev(backend)
    q = torch.randn(B, T, S, D, H, device=device).transpose(3, 4)  # last-dim stride != 1
    k = torch.randn(S, T, B, H, D, device=device).permute(2, 1, 0, 3, 4)
    v = torch.randn(B, T, 2 * S, H, D, device=device)[:, :, ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    grad = torch.randn(B, T, S, D, H, device=device).transpose(3, 4)  # non-contiguous upstream grad
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attend(kind, *leaves, backend=backend)
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    expected = attention_math(*leaves64, None, kind != "spatial", kind == "temporal_causal")
    want = torch.autograd.grad(expected, leaves64, grad.double().cpu())
    assert_close(out, expected, torch.float32, name="out")
    for g, w, n in zip(got, want, "qkv"):
        assert_close(g, w, torch.float32, name="d" + n)


def random_layout(shape, layout, device):
    """q, k, v of (B, T, S, H, Dh) in one of the layouts the kernels read in place: "packed" (views of a
    (B, T, S, 3, H, Dh) projection), "heads" (of (B, T, S, H, 3, Dh): heads 3 * Dh apart), "permuted"
    (stored (B, H, S, T, Dh)) or "sliced" (every axis offset, rows Dh + 3 apart)."""
    B, T, S, H, D = shape
    if layout == "packed":
        return torch.randn(B, T, S, 3, H, D, device=device).unbind(3)
    if layout == "heads":
        return torch.randn(B, T, S, H, 3, D, device=device).unbind(4)
    if layout == "permuted":
        return [torch.randn(B, H, S, T, D, device=device).permute(0, 3, 2, 1, 4) for _ in range(3)]
    return [torch.randn(B + 1, T + 1, S + 1, H, D + 3, device=device)[1:, 1:, 1:, :, 2:D + 2] for _ in range(3)]


# Random shapes past the hand-picked ones: every layout, sequence lengths on both sides of each
# kernel family's bounds (8, 16, 24, 32 ...), head dims up to the fused limit with and without a
# partial last vector, biases with masked (-inf) entries, forward and backward against the fp64
# oracle. PVKERNELS_TEST_SEED draws other cases (a failure names its case).
@pytest.mark.parametrize("backend, cases", [("cpp", 48), ("triton", 10)])
def test_random_cases_match_fp64_oracle(backend, cases):
    rng = random.Random(int(os.environ.get("PVKERNELS_TEST_SEED", "0")))
    device = dev(backend)
    for _ in range(cases):
        kind = rng.choice(KINDS)
        N = rng.choice([1, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 48, 65])
        D = rng.choice([d for d in (3, 8, 16, 17, 31, 40, 47, 48, 64, 72, 100, 128, 129, 160, 255, 256) if d <= MAX_HEAD_DIM[backend]])
        B, A, H = rng.randint(1, 2), rng.randint(1, 4), rng.randint(1, 3)
        shape = (B, N, A, H, D) if kind != "spatial" else (B, A, N, H, D)
        layout = rng.choice(["packed", "heads", "permuted", "sliced"])
        bias_kind = rng.choice(["none", "fixed", "grad", "masked"])
        case = f"{backend}/{kind}/{shape}/{layout}/bias={bias_kind}"
        q, k, v = random_layout(shape, layout, device)
        bias = None if bias_kind == "none" else torch.randn(H, N, N, device=device)
        if bias_kind == "masked":  # key 0 stays visible: whole masked rows are test_fully_masked_queries'
            hidden = torch.rand(H, N, N, device=device) < 0.3
            hidden[:, :, 0] = False
            bias[hidden] = float("-inf")
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        bias_leaf = None if bias is None else bias.requires_grad_(bias_kind == "grad")
        out = attend(kind, *leaves, bias=bias_leaf, backend=backend)
        grad = torch.randn_like(out)
        wrt = leaves + ([bias_leaf] if bias_kind == "grad" else [])
        got = torch.autograd.grad(out, wrt, grad)
        leaves64 = [x.detach().double().cpu().requires_grad_(x.requires_grad) for x in wrt]
        bias64 = leaves64[3] if bias_kind == "grad" else None if bias is None else bias.double().cpu()
        expected = attention_math(*leaves64[:3], bias64, kind != "spatial", kind == "temporal_causal")
        want = torch.autograd.grad(expected, leaves64, grad.double().cpu())
        # sums of up to 256 products (dQ, dK: of N of them too): an absolute error in proportion to the largest entry
        for name, g, w in zip(["out", "dq", "dk", "dv", "dbias"], [out, *got], [expected, *want]):
            scale = max(w.abs().max().item() if w.numel() else 0.0, 1.0)
            assert_close(g, w, torch.float32, atol=(1e-4 if name == "dbias" else 2e-5) * scale, name=f"{case} {name}")


# the cpp kernel of unit-stride rows (8 <= n, Dh >= 16; AVX2: n <= 16, Dh >= 32; attention.cpp's family_of):
# every sequence length of its range, head dims with and without a partial last vector, both ways
# to the scores (attention_rows.cpp's dot_products: with AVX-512 broadcasts below Dh 48 and past
# n 24 except fp32 from Dh 129, dot products else; the dots read fp32 rows of whole vectors in
# place and stage the rest and, with AVX-512, rows a multiple of 4 KB apart: Dh 128 and 256 x 8
# heads), blocks of padded queries alone (n 8, 24), up to the limit
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kind, shape", [
    ("temporal_full", (2, 16, 3, 8, 40)), ("temporal_causal", (1, 8, 5, 3, 24)), ("temporal_full", (3, 13, 2, 2, 80)),
    ("temporal_causal", (1, 32, 2, 2, 160)), ("temporal_full", (1, 24, 1, 1, 256)), ("temporal_causal", (2, 17, 3, 2, 33)),
    ("spatial", (2, 3, 16, 4, 40)), ("spatial", (1, 2, 11, 2, 72)), ("temporal_causal", (2, 11, 3, 2, 36)),
    ("temporal_causal", (2, 8, 3, 2, 64)), ("temporal_full", (1, 12, 1, 8, 128)), ("temporal_full", (1, 30, 2, 2, 64)),
    ("temporal_full", (1, 27, 2, 3, 144)), ("temporal_causal", (1, 29, 1, 8, 256))])
def test_cpp_row_kernel(kind, shape, with_bias):
    check_forward_backward(kind, "cpp", shape, with_bias)


@pytest.mark.parametrize("kernel", ["rows", "lanes"])
@pytest.mark.parametrize("kind, shape", [("temporal_causal", (2, 3, 5, 2, 8)), ("temporal_full", (1, 16, 3, 4, 40)),
                                         ("spatial", (2, 2, 12, 3, 20)), ("temporal_causal", (1, 30, 2, 2, 16))])
def test_cpp_short_sequence_kernels_forced(monkeypatch, kernel, kind, shape):
    # PVKERNELS_CPU_ATTENTION_KERNEL runs either short-sequence kernel outside its own range too
    monkeypatch.setenv("PVKERNELS_CPU_ATTENTION_KERNEL", kernel)
    check_forward_backward(kind, "cpp", shape, with_bias=True)


def test_cpp_short_sequence_kernel_setting_is_checked(monkeypatch):
    monkeypatch.setenv("PVKERNELS_CPU_ATTENTION_KERNEL", "blocks")
    q = torch.randn(1, 16, 1, 2, 32)
    with pytest.raises(ValueError, match="PVKERNELS_CPU_ATTENTION_KERNEL must be 'rows' or 'lanes'"):
        pvkernels.temporal_attention(q, q, q, backend="cpp")


@pytest.mark.parametrize("n, H, D, buffer", [(64, 8, 160, 6 << 20), (5, 3, 100, 24 << 12)])
def test_cpp_output_cache(n, H, D, buffer):
    # outputs from 64 KiB on take their buffers from a cache (csrc/attention.h, empty_output): a
    # freed output's buffer serves the next output of its size, forward and backward, and a reused
    # buffer's old contents never show through. 5.2 MB per output: three 2 MiB pages; 96,000 bytes
    # (a small latent's): 24 pages of 4 KiB
    pvkernels.empty_cache()
    T = 16
    view = lambda x: x.view(n, T, 1, H, D)  # noqa: E731
    q, k, v = (torch.randn(n, T, H * D, requires_grad=True) for _ in range(3))
    out = pvkernels.temporal_attention(view(q), view(k), view(v), causal=False, backend="cpp")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    out = got = None
    assert pvkernels.empty_cache() == 4 * buffer  # out, dq, dk, dv (lse: under 64 KiB)
    assert pvkernels.empty_cache() == 0

    def checked_round():  # fresh inputs against the oracle; the outputs' addresses (outputs freed on return)
        q, k, v = (torch.randn(n, T, H * D, requires_grad=True) for _ in range(3))
        out = pvkernels.temporal_attention(view(q), view(k), view(v), causal=True, backend="cpp")
        got = torch.autograd.grad(out, (q, k, v), grad)
        leaves = [view(x).detach().double().requires_grad_() for x in (q, k, v)]
        expected = attention_math(*leaves, None, True, True)
        want = torch.autograd.grad(expected, leaves, grad.double())
        assert_close(out, expected, torch.float32, name="out")
        for g, w, name in zip(got, want, "qkv"):
            assert_close(view(g), w, torch.float32, name="d" + name)
        return {x.data_ptr() for x in (out, *got)}

    addresses = [checked_round(), checked_round()]  # the second round reuses the first's buffers
    assert len(addresses[0]) == 4 and addresses[1] == addresses[0]


@pytest.mark.parametrize("setting, cached", [("0", 0), ("10", 6 << 20), ("lots", None)])
def test_cpp_output_cache_setting(setting, cached):
    # PVKERNELS_CPU_OUTPUT_CACHE_MB bounds the cache (0: none); anything but a whole number is refused
    code = ("import torch, pvkernels\n"
            "q = torch.randn(64, 16, 1, 8, 160)\n"
            "outs = [pvkernels.temporal_attention(q, q, q, causal=False, backend='cpp') for _ in range(3)]\n"
            "outs = None\n"
            "print(pvkernels.empty_cache())\n")
    env = {**os.environ, "PVKERNELS_CPU_OUTPUT_CACHE_MB": setting}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if cached is None:
        assert run.returncode != 0
        assert "PVKERNELS_CPU_OUTPUT_CACHE_MB must be a whole number of MB >= 0" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert int(run.stdout.split()[-1]) == cached  # 10 MB: one of the three 6 MiB buffers


@pytest.mark.parametrize("n", [37, 421])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_diffusers_layout(dtype, n):
    # diffusers' motion modules: three (batch * pixels, frames, heads * head_dim) projections, seen
    # as (B, T, 1, H, Dh) views, more items than a thread's prefetch distance; 421 items: outputs
    # past 4 MB, streamed, where two heads share a line at Dh 40: assembled in a scratch and written
    # out a share of the rows after each head of the next item (csrc/attention_rows.cpp)
    T, H, D = 16, 8, 40
    q, k, v = (torch.randn(n, T, H * D, dtype=dtype, requires_grad=True) for _ in range(3))
    view = lambda x: x.view(n, T, 1, H, D)  # noqa: E731
    out = pvkernels.temporal_attention(view(q), view(k), view(v), causal=False, backend="cpp")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [view(x).detach().double().requires_grad_() for x in (q, k, v)]
    expected = attention_math(*leaves, None, True, False)
    want = torch.autograd.grad(expected, leaves, grad.double())
    assert_close(out, expected, dtype, name="out")
    for g, w, name in zip(got, want, "qkv"):
        assert_close(view(g), w, dtype, name="d" + name)


@pytest.mark.parametrize("kind, shape", [("temporal_causal", (2, 5, 1001, 4, 32)), ("temporal_causal", (2, 9, 1001, 4, 32)),
                                         ("temporal_full", (2, 9, 701, 4, 40)), ("temporal_causal", (2, 12, 600, 4, 40)),
                                         ("spatial", (4, 16, 150, 4, 32))])
def test_cpp_large_outputs(kind, shape):
    # outputs past 4 MB are written with streaming stores, by the lanes kernel (T = 5; its last
    # 16-sequence unit is partial here: 2 * 1001 * 4 sequences), the rows kernel (T = 9 and 12 on
    # AVX-512 builds: a head's rows whole cache lines at Dh 32, written by the products; at Dh 40
    # two heads share lines, assembled in a scratch first and written out a share of the rows after
    # each head of the next item) and the blocked one
    check_forward_backward(kind, "cpp", shape, with_bias=True)


def _smaps(address: int, field: str) -> int:
    """``field`` ("AnonHugePages", kB, or "THPeligible") of this process's mapping that holds ``address``."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= address < hi
            elif found and head == field + ":":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}, or it has no {field}")


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


def _fresh_mapping_gets_huge_pages(nbytes: int) -> bool:
    """Whether a new anonymous mapping of ``nbytes``, marked for 2 MiB pages before it is written,
    faults in as them now: the kernel gives them only while it finds free 2 MiB blocks."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
        for offset in range(0, nbytes, 4096):
            m[offset] = 1
        byte = ctypes.c_char.from_buffer(m)
        try:
            return _smaps(ctypes.addressof(byte) + nbytes // 2, "AnonHugePages") >= 2048
        finally:
            del byte
    finally:
        m.close()


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason=f"transparent huge pages: {_thp_mode()}")
def test_cpp_large_outputs_on_huge_pages():
    # an output's new buffer (the output cache's: csrc/attention.h, empty_output) is marked for
    # 2 MiB pages before it is first written (84 MB fault in ~6 ms instead of ~38); past glibc's
    # 32 MB threshold it is a fresh mapping, which faults in as huge pages when the kernel finds free
    # 2 MiB blocks. It does not always (CI's VM, now and then, for one buffer: dq), so a buffer on
    # 4 KiB pages fails the test only if it is so in every one of 5 tries while a fresh anonymous
    # mapping marked the same way gets 2 MiB pages (a buffer written before its mark: every time)
    for _ in range(5):
        pvkernels.empty_cache()
        q, k, v = (torch.randn(4096, 16, 1, 8, 40, requires_grad=True) for _ in range(3))
        out = pvkernels.temporal_attention(q, k, v, causal=False, backend="cpp")
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        small = []
        for t, name in zip((out, *grads), ("out", "dq", "dk", "dv")):
            middle = t.data_ptr() + t.nbytes // 2
            assert _smaps(middle, "THPeligible") == 1, name
            if _smaps(middle, "AnonHugePages") < 2048:
                small.append(name)
        if not small or not _fresh_mapping_gets_huge_pages(out.nbytes):
            return
        del out, grads
    pytest.fail(f"{small} on 4 KiB pages in 5 tries, while a fresh marked mapping got 2 MiB pages")


@pytest.mark.skipif(_thp_mode() != "madvise", reason=f"transparent huge pages: {_thp_mode()}, not madvise")
def test_cpp_heap_sized_outputs_marked_for_huge_pages():
    # new buffers from 2 MiB up to glibc's 32 MB threshold come from its heap: marked for 2 MiB pages
    # too (a 256 x 16 x 8 x 160 forward + backward after a trim, before the output cache: 66-69 ms
    # on 4 KiB pages, 25-27 ms marked). Already faulted-in pages stay 4 KiB, so the mark (the
    # mapping's THPeligible) is what is checked; the buffers are whole 2 MiB pages
    q, k, v = (torch.randn(64, 16, 1, 8, 160, requires_grad=True) for _ in range(3))
    out = pvkernels.temporal_attention(q, k, v, causal=False, backend="cpp")
    assert _smaps(out.data_ptr() + out.nbytes // 2, "THPeligible") == 1
    for g in torch.autograd.grad(out, (q, k, v), torch.randn_like(out)):
        assert _smaps(g.data_ptr() + g.nbytes // 2, "THPeligible") == 1


@pytest.mark.parametrize("backend", ["reference", "cpp"] + (["triton"] if torch.cuda.is_available() else []))
def test_more_than_65535_sequences(backend):
    # SDPA's fast GPU paths fail past a batch of 65535; the kernels' grids and loops must not.
    # Forward and backward on a slice of the sequences (first, middle and last) against the oracle
    B, T, S, H, D = 1, 3, 8200, 8, 8  # 65600 temporal sequences
    device = dev(backend)
    q, k, v = (torch.randn(B, T, S, H, D, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, T, S, H, D, device=device)
    out = pvkernels.temporal_attention(q, k, v, backend=backend)
    got = torch.autograd.grad(out, (q, k, v), grad)
    idx = torch.tensor([0, 4097, 8199], device=device)
    sub = lambda x: x.detach().index_select(2, idx).double().cpu().requires_grad_()  # noqa: E731
    leaves = [sub(x) for x in (q, k, v)]
    expected = attention_math(*leaves, None, True, True)
    want = torch.autograd.grad(expected, leaves, sub(grad))
    assert_close(out.index_select(2, idx), expected, torch.float32, name="temporal out")
    for g, w, n in zip(got, want, "qkv"):
        assert_close(g.index_select(2, idx), w, torch.float32, name=f"temporal d{n}")
    # spatial: B * T * H = 65600 sequences; the last two frames
    q, k, v = (torch.randn(1, 8200, 3, 8, D, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 8200, 3, 8, D, device=device)
    out = pvkernels.spatial_attention(q, k, v, backend=backend)
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [x.detach()[:, -2:].double().cpu().requires_grad_() for x in (q, k, v)]
    expected = attention_math(*leaves, None, False, False)
    want = torch.autograd.grad(expected, leaves, grad[:, -2:].double().cpu())
    assert_close(out[:, -2:], expected, torch.float32, name="spatial out")
    for g, w, n in zip(got, want, "qkv"):
        assert_close(g[:, -2:], w, torch.float32, name=f"spatial d{n}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_within_twice_torch_error(backend, dtype, kind):
    B, T, S, H, D = 2, 7, 20, 2, 32
    device = dev(backend)
    qkv, (q, k, v) = packed(B, T, S, H, D, device, dtype)
    N = S if kind == "spatial" else T
    bias = torch.randn(H, N, N, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, T, S, H, D, device=device, dtype=dtype)
    qkv64 = qkv.detach().double().cpu().requires_grad_()
    b64 = bias.detach().double().cpu().requires_grad_()
    expected = attention_math(*qkv64.unbind(3), b64, kind != "spatial", kind == "temporal_causal")
    want = torch.autograd.grad(expected, [qkv64, b64], grad.double().cpu())

    def errors(backend_):
        out = attend(kind, q, k, v, bias, backend_)
        g = torch.autograd.grad(out, [qkv, bias], grad)
        return [(a.double().cpu() - b).abs().max().item() for a, b in zip([out, *g], [expected, *want])]

    mine, torch_own = errors(backend), errors("reference")
    for name, m, t, ref in zip(("out", "dqkv", "dbias"), mine, torch_own, [expected, *want]):
        floor = 1e-3 * ref.abs().max().item()  # torch's own error can be ~0 on a lucky draw
        assert m <= 2 * t + floor, f"{name}: error {m:.3g} > 2 x torch's {t:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind, shape", [("temporal_causal", (2, 5, 23, 2, 32)), ("spatial", (2, 3, 40, 2, 32)),
                                         ("temporal_full", (2, 16, 3, 2, 40))])
def test_cpp_16bit_is_the_fp32_kernel_rounded_once(dtype, kind, shape):
    # 16-bit rows are converted to fp32 exactly on the way in and rounded to nearest even once
    # on the way out (vectorised; the partial last unit of 2 * 23 * 2 = 92 temporal sequences
    # takes the element-wise path): bit for bit the fp32 kernel's result rounded by torch; NaN
    # in, NaN out (short-sequence and blocked kernels, forward and backward)
    B, T, S, H, D = shape
    qkv = torch.randn(B, T, S, 3, H, D, dtype=dtype)
    qkv[0, 1, 2, 0, 1, 3] = float("nan")
    q, k, v = qkv.requires_grad_().unbind(3)
    grad = torch.randn(shape, dtype=dtype)
    out = attend(kind, q, k, v, backend="cpp")
    qkv32 = qkv.detach().float().requires_grad_()
    out32 = attend(kind, *qkv32.unbind(3), backend="cpp")
    assert_close(out, out32.to(dtype), rtol=0, atol=0, name="out")
    assert_close(torch.autograd.grad(out, qkv, grad)[0], torch.autograd.grad(out32, qkv32, grad.float())[0].to(dtype),
                 rtol=0, atol=0, name="dqkv")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero(backend):
    q = torch.randn(0, 4, 5, 2, 8, device=dev(backend), requires_grad=True)
    for kind in KINDS:
        out = attend(kind, q, q, q, backend=backend)
        assert out.shape == q.shape
        out.sum().backward()


@pytest.mark.parametrize("kind, shape", [("temporal_causal", (2, 5, 3, 2, 160)), ("temporal_full", (1, 16, 2, 3, 200)),
                                         ("spatial", (1, 2, 40, 1, 200)), ("spatial", (1, 2, 7, 2, 256))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_head_dims_past_128(kind, shape, dtype):
    # Dh up to 256 on the cpp kernels (AnimateDiff's 1280-channel levels: 8 heads of 160): the
    # short-sequence and blocked families, Dh % 16 != 0
    check_forward_backward(kind, "cpp", shape, with_bias=True, dtype=dtype)


def test_head_dim_limits():
    q = torch.randn(1, 3, 4, 1, 257)
    with pytest.raises(ValueError, match="Dh = 257 > 256"):
        pvkernels.temporal_attention(q, q, q, backend="cpp")
    # "auto" falls back to the reference (documented), with the right answer
    assert_close(pvkernels.temporal_attention(q, q, q), oracle("temporal_causal", q, q, q), torch.float32)
    from pvkernels.ops.attention import fused_head_dim_limit
    assert MAX_HEAD_DIM == {"cpp": 256, "triton": 128}
    assert fused_head_dim_limit(torch.device("cpu")) == 256 and fused_head_dim_limit(torch.device("cuda")) == 128


def test_triton_head_dim_at_compile_time(monkeypatch):
    # the launchers pass the head dim as a constexpr (vector loads on a GPU: test_triton_compile) where
    # every operand holds its heads packed, diffusers' (pixels, frames, heads * Dh) projections
    # included, and leave it to run time (0) for any operand whose heads are not, or when told not to
    pytest.importorskip("triton")
    from pvkernels.ops import attention

    proj = torch.empty(64, 16, 8 * 40, device="meta")
    q = proj.view(64, 16, 1, 8, 40)
    apart = torch.empty(64, 16, 1, 3, 8, 40, device="meta")[:, :, :, 0]  # heads 40 apart, rows 960 apart
    spread = torch.empty(64, 16, 1, 40, 8, device="meta").transpose(3, 4)  # heads 1 apart
    one_head = torch.empty(64, 16, 1, 1, 40, device="meta").as_strided((64, 16, 1, 1, 40), (640, 40, 40, 7, 1))
    lse = torch.empty(64, 16, 1, 8, device="meta")

    def head_dim(q, k, v, out=None):
        out = torch.empty(q.shape, device="meta") if out is None else out
        fwd = attention._attention_fwd_launches(q, k, v, None, out, lse[..., :q.shape[3]], True, False)
        bwd = attention._attention_bwd_launches(out, q, k, v, None, out, lse[..., :q.shape[3]], lse[..., :q.shape[3]],
                                                out, out, out, None, True, False, False)
        return {launch.meta["HEAD_DIM"] for launch in fwd + bwd}

    assert head_dim(q, q, q) == {40}
    assert head_dim(q, apart, q) == {40}
    assert head_dim(q, spread, q) == {0}
    assert head_dim(one_head, one_head, one_head) == {40}  # one head: its stride never multiplies
    monkeypatch.setattr(attention, "SPECIALISE_HEAD_DIM", False)
    assert head_dim(q, q, q) == {0}


def test_triton_configs_cached_per_target(monkeypatch):
    # _configs is cached (launch overhead on a GPU): the interpreter's tiles and the GPU's stay apart
    # whichever is asked first, and each call gets the same answer as the first
    pytest.importorskip("triton")
    from pvkernels.ops import attention

    attention._configs_for.cache_clear()

    def configs(interpret, N, D, dtype=torch.float32):
        monkeypatch.setattr(attention, "triton_interpret", lambda: interpret)
        return attention._configs(N, D, dtype)

    for i, (N, D) in enumerate(((16, 40), (77, 40), (16, 96))):
        first = bool(i % 2)  # either target asked first
        a, b = configs(first, N, D), configs(not first, N, D)
        gpu, interp = (b, a) if first else (a, b)
        assert {tile["PRECISION"] for tile in gpu.values()} == {"tf32x3"}
        assert {tile["PRECISION"] for tile in interp.values()} == {"ieee"}
        assert configs(False, N, D) == gpu and configs(True, N, D) == interp
    assert configs(False, 77, 40).keys() == {"fwd", "delta", "dkdv", "dq"}
    assert configs(False, 16, 96)["fwd"]["BLOCK_D"] == 128 and configs(True, 16, 40)["fwd"]["BLOCK_D"] == 64
    assert configs(False, 77, 40)["fwd"]["BLOCK_M"] == 32  # fp32's row, then the 16-bit one
    assert configs(False, 77, 40, torch.bfloat16)["fwd"]["BLOCK_M"] == 128


def skip_unavailable(backend):
    if backend == "cpp" and not pvkernels.cpp_available():
        pytest.skip("C++ extension unavailable")
    if backend == "triton":
        pytest.importorskip("triton")


def test_triton_eager_calls_skip_the_custom_op(monkeypatch):
    # a plain eager call runs the Triton impls itself (the custom op's dispatch is ~10 us of Python a
    # call, launch overhead on a GPU), forward and backward; the profiler and dispatch modes see the op
    pytest.importorskip("triton")
    from torch.utils.flop_counter import FlopCounterMode

    from pvkernels.ops import attention

    calls = []
    for entry in (attention._FWD["triton"], attention._BWD["triton"]):
        monkeypatch.setattr(entry, "op", lambda *args, op=entry.op: calls.append(op) or op(*args))
    device = dev("triton")
    q, k, v = (torch.randn(2, 5, 3, 2, 8, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 5, 3, 2, 8, device=device)
    q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    want = attention_math(q64, k64, v64, None, True, True)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad.double().cpu())
    out = attend("temporal_causal", q, k, v, backend="triton")
    for got, expected in zip((out, *torch.autograd.grad(out, (q, k, v), grad)), (want, *want_grads)):
        assert_close(got, expected, torch.float32)
    with torch.no_grad():
        assert_close(attend("temporal_causal", q, k, v, backend="triton"), want, torch.float32)
    assert calls == []
    with torch.profiler.profile() as prof:
        attend("temporal_causal", q.detach(), k.detach(), v.detach(), backend="triton")
    assert len(calls) == 1 and any("attention_fwd_triton" in event.name for event in prof.events())
    with FlopCounterMode(display=False):
        attend("temporal_causal", q.detach(), k.detach(), v.detach(), backend="triton")
    assert len(calls) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_inference(backend):
    # torch.vmap over inputs that need no grad: the fused ops run per example (torch's batching
    # fallback; the Triton entry hands vmap's batched tensors to its custom op, not the kernels)
    skip_unavailable(backend)
    device = dev(backend)
    q, k, v = (torch.randn(3, 1, 4, 2, 2, 8, device=device) for _ in range(3))
    out = torch.vmap(lambda a, b, c: attend("temporal_causal", a, b, c, backend=backend))(q, k, v)
    for i in range(3):
        assert_close(out[i], oracle("temporal_causal", q[i], k[i], v[i]), torch.float32)


def test_triton_op_under_torch_compile():
    # traced, the Triton entry is the custom op (its fake kernel gives the shapes)
    pytest.importorskip("triton")
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    device = dev("triton")
    q, k, v = (torch.randn(2, 5, 3, 2, 8, device=device) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attend("temporal_full", q, k, v, backend="triton") * 2.0,
                             backend=backend, fullgraph=True)
    assert_close(compiled(q, k, v), oracle("temporal_full", q, k, v) * 2.0, torch.float32)
    assert "pvkernels.attention_fwd_triton.default" in ops


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_jit_trace_records_the_op(backend):
    # torch.jit.trace records the fused op, so the traced function computes on new inputs
    skip_unavailable(backend)
    device = dev(backend)
    f = lambda q, k, v: attend("temporal_full", q, k, v, backend=backend) * 2.0  # noqa: E731
    traced = torch.jit.trace(f, tuple(torch.randn(1, 4, 3, 2, 8, device=device) for _ in range(3)))
    assert "pvkernels" in str(traced.graph)
    q, k, v = (torch.randn(1, 4, 3, 2, 8, device=device) for _ in range(3))
    assert_close(traced(q, k, v), oracle("temporal_full", q, k, v) * 2.0, torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_forward_ad_raises(backend):
    # forward-mode AD has no rule on the fused backends: it raises rather than drop the tangent
    import torch.autograd.forward_ad as fwAD

    skip_unavailable(backend)
    q, k, v = (torch.randn(1, 4, 3, 2, 8, device=dev(backend)) for _ in range(3))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="jvp|forward AD"):
        attend("temporal_full", fwAD.make_dual(q, torch.randn_like(q)), k, v, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_double_backward_raises(backend):
    # the fused backward has no derivative of its own: create_graph=True gives the first-order
    # gradient, and differentiating that raises (torch's fallback took the cpp ops for constants)
    skip_unavailable(backend)
    device = dev(backend)
    q, k, v = (torch.randn(1, 4, 3, 2, 8, device=device, requires_grad=True) for _ in range(3))
    out = attend("temporal_full", q, k, v, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(attention_math(q64, k64, v64, None, True, False).square().sum(), (q64, k64, v64))
    for got, expected in zip(grads, want):
        assert_close(got, expected, torch.float32)
    with pytest.raises(RuntimeError, match="not implemented|no autograd formula"):
        torch.autograd.grad(grads[0].sum(), (q, k, v))


def test_triton_head_dim_limit(monkeypatch):
    # triton stops at 128 where cpp goes on: the limit is the asked backend's (checked without a
    # GPU under the interpreter flag; the error comes before any launch)
    pytest.importorskip("triton")
    import pvkernels._backend as backend
    monkeypatch.setattr(backend, "triton_interpret", lambda: True)
    q = torch.randn(1, 3, 4, 1, 160)
    with pytest.raises(ValueError, match="Dh = 160 > 128 is not supported by the triton kernels"):
        pvkernels.temporal_attention(q, q, q, backend="triton")


@pytest.mark.parametrize("call, error, match", [
    (lambda: pvkernels.temporal_attention(torch.randn(2, 3, 4, 2, 8), torch.randn(2, 3, 5, 2, 8),
                                          torch.randn(2, 3, 4, 2, 8)), ValueError, "same shape"),
    (lambda: pvkernels.spatial_attention(torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8),
                                         torch.randn(3, 4, 2, 8)), ValueError, "5-D"),
    (lambda: pvkernels.temporal_attention(*(torch.randn(2, 3, 4, 2, 8),) * 3, bias=torch.randn(2, 4, 4)),
     ValueError, r"bias must have shape \(H, T, T\) = \(2, 3, 3\)"),
    (lambda: pvkernels.spatial_attention(*(torch.randn(2, 3, 4, 2, 8),) * 3, bias=torch.randn(3, 4, 4)),
     ValueError, r"\(H, S, S\)"),
    (lambda: pvkernels.spatial_attention(torch.randn(2, 3, 4, 2, 8), torch.randn(2, 3, 4, 2, 8).half(),
                                         torch.randn(2, 3, 4, 2, 8)), TypeError, "same dtype"),
    (lambda: pvkernels.spatial_attention(*(torch.ones(2, 3, 4, 2, 8, dtype=torch.int32),) * 3), TypeError,
     "q must be float32, float16, bfloat16 or float64"),
    (lambda: pvkernels.temporal_attention(*(torch.randn(2, 3, 4, 2, 8),) * 3, causal=1), TypeError, "causal"),
    (lambda: pvkernels.temporal_attention(*(torch.randn(2, 3, 4, 2, 8),) * 3, backend="gpu"), ValueError, "backend"),
    (lambda: pvkernels.temporal_attention(*(torch.randn(2, 3, 4, 2, 8).double(),) * 3, backend="cpp"), TypeError,
     "float64"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cpp_op_checks_its_own_arguments():
    q = torch.randn(2, 3, 4, 2, 8)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.pvkernels_cpp.attention_fwd(q, q, q, torch.randn(2, 4, 4), True, True)
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.pvkernels_cpp.attention_fwd(q, q[:, :2], q, None, False, False)
    with pytest.raises(ValueError, match="> 256"):
        big = torch.randn(1, 2, 2, 1, 257)
        torch.ops.pvkernels_cpp.attention_fwd(big, big, big, None, True, True)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_backend(kind):
    from pvkernels._backend import resolve_backend
    q, k, v = (torch.randn(3, 5, 7, 2, 8, requires_grad=True) for _ in range(3))
    assert resolve_backend("temporal_attention", "auto", q.device, q.dtype) == "cpp"
    out = attend(kind, q, k, v)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = attention_math(*leaves, None, kind != "spatial", kind == "temporal_causal")
    assert_close(out, expected, torch.float32, name="out")
    for g, w, n in zip(got, torch.autograd.grad(expected, leaves, grad.double()), "qkv"):
        assert_close(g, w, torch.float32, name="d" + n)


# modules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel_pos", ["t5", "alibi", None])
def test_temporal_module_equals_functional(rel_pos):
    B, T, S, dim, heads = 2, 5, 6, 32, 4
    m = pvkernels.nn.TemporalAttention(dim, heads, causal=True, rel_pos=rel_pos)
    if rel_pos == "t5":
        torch.nn.init.normal_(m.rel_bias)
    x = torch.randn(B, T, S, dim)
    qkv = m.qkv(x).view(B, T, S, 3, heads, dim // heads)
    pos = torch.arange(T)
    bias = None
    if rel_pos == "t5":
        bias = m.rel_bias[:, (pos.view(1, -1) - pos.view(-1, 1)).clamp(-32, 32) + 32]
    elif rel_pos == "alibi":
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
        bias = -slopes.view(-1, 1, 1) * (pos.view(1, -1) - pos.view(-1, 1)).abs()
    o = attention_math(*qkv.unbind(3), bias, True, True)
    expected = m.proj(o.reshape(B, T, S, dim))
    assert_close(m(x), expected, "fp32 layers")
    if rel_pos == "t5":  # the relative-position table learns through the bias gradient
        m(x).square().sum().backward()
        assert m.rel_bias.grad is not None and torch.count_nonzero(m.rel_bias.grad) > 0


def test_spatial_module_equals_functional():
    B, T, S, dim, heads = 2, 3, 7, 24, 3
    m = pvkernels.nn.SpatialAttention(dim, heads)
    x = torch.randn(B, T, S, dim)
    qkv = m.qkv(x).view(B, T, S, 3, heads, dim // heads)
    expected = m.proj(attention_math(*qkv.unbind(3), None, False, False).reshape(B, T, S, dim))
    assert_close(m(x), expected, "fp32 layers")
    assert "heads=3" in repr(m)
    with pytest.raises(ValueError, match="multiple of heads"):
        pvkernels.nn.SpatialAttention(10, 3)
    with pytest.raises(ValueError, match="rel_pos"):
        pvkernels.nn.TemporalAttention(8, 2, rel_pos="rope")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_space_time_block_matches_reference_ops(backend):
    torch.manual_seed(0)
    block = pvkernels.nn.SpaceTimeBlock(32, 4, causal_time=True, mlp_ratio=2, backend=backend)
    ref = pvkernels.nn.SpaceTimeBlock(32, 4, causal_time=True, mlp_ratio=2, backend="reference")
    ref.load_state_dict(block.state_dict())
    torch.nn.init.normal_(block.time.rel_bias)
    ref.time.rel_bias.data.copy_(block.time.rel_bias.data)
    x = torch.randn(2, 5, 9, 32)
    y, y_ref = block(x), ref(x)
    assert_close(y, y_ref, "fp32 layers")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, "fp32 layers", name=name)


# torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    def f(qkv, bias):
        q, k, v = qkv.unbind(3)
        o = pvkernels.temporal_attention(q, k, v, bias=bias, backend="cpp")
        return pvkernels.spatial_attention(o, k, v, backend="cpp") * 2.0

    qkv = torch.randn(2, 4, 5, 3, 2, 8, requires_grad=True)
    bias = torch.randn(2, 4, 4, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(qkv, bias)
    expected = f(qkv, bias)
    assert_close(out, expected, torch.float32)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [qkv, bias], grad)
    want = torch.autograd.grad(expected, [qkv, bias], grad)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_qkv_gradient(backend, kind):
    # the modules' entry: the qkv gradient is produced packed on the fused backends
    from pvkernels.ops.attention import packed_attention
    B, T, S, H, D = 3, 7, 9, 2, 16
    device = dev(backend)
    qkv = torch.randn(B, T, S, 3, H, D, device=device, requires_grad=True)
    N = S if kind == "spatial" else T
    bias = torch.randn(H, N, N, device=device, requires_grad=True)
    out = packed_attention(qkv, kind != "spatial", kind == "temporal_causal", bias, backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [qkv, bias], grad)
    qkv64 = qkv.detach().double().cpu().requires_grad_()
    b64 = bias.detach().double().cpu().requires_grad_()
    expected = attention_math(*qkv64.unbind(3), b64, kind != "spatial", kind == "temporal_causal")
    want = torch.autograd.grad(expected, [qkv64, b64], grad.double().cpu())
    assert_close(out, expected, torch.float32, name="out")
    assert_close(got[0], want[0], torch.float32, name="dqkv")
    assert_dbias_close(got[1], want[1], torch.float32, name="dbias")
    with pytest.raises(ValueError, match=r"\(B, T, S, 3, H, Dh\)"):
        packed_attention(qkv[:, :, :, :2], kind != "spatial", backend=backend)


def test_module_under_torch_compile():
    block = pvkernels.nn.SpaceTimeBlock(16, 2, mlp_ratio=2, backend="cpp")
    x = torch.randn(2, 4, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, y_eager = compiled(x), block(x)
    assert_close(y, y_eager, torch.float32)
    g, g_eager = (torch.autograd.grad(t.square().sum(), x)[0] for t in (y, y_eager))
    assert_close(g, g_eager, "fp32 layers")
