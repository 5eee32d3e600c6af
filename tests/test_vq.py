"""vq_lookup and VectorQuantizer: every backend against the oracle, ties, bad input, the module."""
import pytest
import torch
import torch.nn.functional as F

import pvkernels
from pvkernels.nn import VectorQuantizer

from .utils import assert_close, dev

BACKENDS = ["reference", "cpp", "triton"]
INTERPRETED = not torch.cuda.is_available()


def small_for_interpreter(backend, n, k):
    # the Triton interpreter pays ~ms per program and per codebook block: cap the work there
    if backend == "triton" and INTERPRETED and n * k > 70_000:
        return max(1, min(n, 70_000 // k))
    return n


def exact_scores(z, codebook, metric):
    """fp64 distances (l2) or negated cosine similarities (cosine), shape (N, K)."""
    z, e = z.double().cpu().reshape(-1, codebook.shape[1]), codebook.double().cpu()
    if metric == "l2":
        # the expansion in fp64 is exact far below the fp32 tolerance, and needs no (N, K, D) temporary
        return z.pow(2).sum(1, keepdim=True) - 2 * z @ e.T + e.pow(2).sum(1)
    return -(F.normalize(z, dim=1) @ F.normalize(e, dim=1).T)


def check_near_optimal(z, codebook, idx, zq, metric):
    """The chosen code's score equals the minimum within fp32 rounding; zq is codebook[idx]."""
    assert idx.dtype == torch.int64 and idx.shape == z.shape[:-1]
    assert zq.shape == z.shape and zq.dtype == codebook.dtype
    flat = idx.reshape(-1).cpu()
    assert torch.equal(zq.reshape(-1, codebook.shape[1]).cpu(), codebook.cpu()[flat])
    if flat.numel() == 0:
        return
    assert int(flat.min()) >= 0 and int(flat.max()) < codebook.shape[0]
    s = exact_scores(z, codebook, metric)
    chosen = s.gather(1, flat.unsqueeze(1)).squeeze(1)
    best = s.min(1).values
    if metric == "l2":  # rounding of ||e||^2 - 2 <z, e> in fp32 scales with the squared norms
        zn = z.double().cpu().reshape(-1, codebook.shape[1]).pow(2).sum(1)
        scale = zn + codebook.double().cpu().pow(2).sum(1).max()
    else:
        scale = torch.ones_like(best)
    excess = (chosen - best) / scale
    assert float(excess.max()) <= 1e-5, f"chosen code worse than the best by {float(excess.max()):.3g} (relative)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [0, 1, 3, 1000])
@pytest.mark.parametrize("K", [1, 7, 4099])
@pytest.mark.parametrize("D", [3, 64, 256])
def test_lookup_near_optimal(backend, N, K, D):
    N = small_for_interpreter(backend, N, K * max(1, D // 64))
    z = torch.randn(N, D, device=dev(backend))
    codebook = torch.randn(K, D, device=dev(backend))
    idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend)
    check_near_optimal(z, codebook, idx, zq, "l2")


def separated(N, K, D, device, dtype=torch.float32, scale=1.0):
    """Codes far apart and vectors close to known codes: the nearest code is unambiguous."""
    codebook = torch.randn(K, D) * 4.0
    truth = torch.randint(0, K, (N,))
    z = codebook[truth] * scale + 0.05 * torch.randn(N, D)
    return z.to(device, dtype), codebook.to(device, dtype), truth.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_lookup_exact_on_separated_data(backend, dtype, metric):
    N = small_for_interpreter(backend, 500, 1100)
    z, codebook, truth = separated(N, 1100, 64, dev(backend), dtype, scale=3.0 if metric == "cosine" else 1.0)
    idx, zq = pvkernels.vq_lookup(z, codebook, metric=metric, backend=backend)
    assert torch.equal(idx, truth)
    assert torch.equal(zq, codebook[truth])
    ref_idx, _ = pvkernels.vq_lookup(z, codebook, metric=metric, backend="reference")
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_lookup_low_precision_near_optimal(backend, dtype, metric):
    # fp16/bf16 values are exact in fp64, and scores are accumulated in fp32
    z = torch.randn(3, 5, 7, 16, device=dev(backend)).to(dtype)
    codebook = torch.randn(7 if metric == "l2" else 300, 16, device=dev(backend)).to(dtype)
    idx, zq = pvkernels.vq_lookup(z, codebook, metric=metric, backend=backend)
    check_near_optimal(z, codebook, idx, zq, metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [3, 64])
def test_cosine_near_optimal(backend, D):
    z = torch.randn(37, D, device=dev(backend))
    codebook = torch.randn(999, D, device=dev(backend)) * torch.rand(999, 1, device=dev(backend))  # uneven norms
    idx, zq = pvkernels.vq_lookup(z, codebook, metric="cosine", backend=backend)
    check_near_optimal(z, codebook, idx, zq, "cosine")


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims(backend):
    B, T, S, D = 2, 3, 5, 16
    z = torch.randn(B, T, S, D, device=dev(backend))
    codebook = torch.randn(33, D, device=dev(backend))
    idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend)
    assert idx.shape == (B, T, S) and zq.shape == (B, T, S, D)
    ref_idx, ref_zq = pvkernels.vq_lookup(z.reshape(-1, D), codebook, backend=backend)
    assert torch.equal(idx.reshape(-1), ref_idx) and torch.equal(zq.reshape(-1, D), ref_zq)
    check_near_optimal(z, codebook, idx, zq, "l2")
    one_idx, one_zq = pvkernels.vq_lookup(z[0, 0, 0], codebook, backend=backend)  # a single (D,) vector
    assert one_idx.shape == () and one_zq.shape == (D,) and int(one_idx) == int(idx[0, 0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_go_to_smallest_index(backend, metric):
    # small integers: every score is exact in fp32, so duplicated codes tie exactly; the
    # duplicates sit in different codebook tiles of every backend (tiles of 64..512 codes)
    D, K = 8, 1300
    codebook = torch.randint(-3, 4, (K, D)).float()
    codebook[codebook.abs().sum(1) == 0] = 1.0  # no zero code (its cosine is undefined)
    dup = [(5, 700), (20, 1299), (600, 601), (100, 1100)]
    for a, b in dup:
        codebook[b] = codebook[a]
    z = torch.cat([codebook[b].unsqueeze(0) for _, b in dup] + [torch.randint(-3, 4, (40, D)).float()])
    if metric == "cosine":  # exact cosine ties need equal directions: scaled copies of codes
        z = z * 2.0
    N = small_for_interpreter(backend, z.shape[0], K)
    z = z[:N].to(dev(backend))
    s = exact_scores(z, codebook, metric)
    expected = torch.tensor([int((row == row.min()).nonzero()[0]) for row in s])  # first minimum
    idx, _ = pvkernels.vq_lookup(z, codebook.to(dev(backend)), metric=metric, backend=backend)
    if metric == "l2":
        assert torch.equal(idx.cpu(), expected)
    else:  # normalisation rounds; the duplicated codes still tie exactly
        assert torch.equal(idx.cpu()[: len(dup)], expected[: len(dup)])
        check_near_optimal(z, codebook.to(dev(backend)), idx, codebook.to(dev(backend))[idx], metric)
    assert [int(i) for i in idx[: len(dup)]] == [a for a, _ in dup][:N]


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_codes_all_tie(backend):
    codebook = torch.ones(9, 4, device=dev(backend))
    idx, _ = pvkernels.vq_lookup(torch.randn(5, 4, device=dev(backend)), codebook, backend=backend)
    assert torch.equal(idx.cpu(), torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_z(backend):
    base = torch.randn(64, 50, device=dev(backend))
    codebook = torch.randn(300, 25, device=dev(backend))
    for z in (base[:, ::2], base.t()[:25].t(), base[:, :25].t().contiguous().t()):
        assert not z.is_contiguous()
        idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend)
        ref_idx, _ = pvkernels.vq_lookup(z.contiguous(), codebook, backend=backend)
        assert torch.equal(idx, ref_idx)
        check_near_optimal(z, codebook, idx, zq, "l2")
    idx, zq = pvkernels.vq_lookup(base[:, :25], codebook[:, :].t().contiguous().t(), backend=backend)
    check_near_optimal(base[:, :25], codebook, idx, zq, "l2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified_and_codebook_gradient(backend):
    z = torch.randn(40, 16, device=dev(backend))
    codebook = torch.randn(50, 16, device=dev(backend), requires_grad=True)
    z0, c0 = z.clone(), codebook.detach().clone()
    idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend)
    assert torch.equal(z, z0) and torch.equal(codebook.detach(), c0)
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    expected = torch.zeros_like(c0).index_add_(0, idx, g)
    assert_close(codebook.grad, expected, torch.float32)


def test_fp64_reference_and_auto():
    z, codebook, truth = separated(20, 30, 8, "cpu", torch.float64)
    idx, zq = pvkernels.vq_lookup(z, codebook)  # auto: fp64 goes to the reference
    assert torch.equal(idx, truth) and zq.dtype == torch.float64


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_bad_input(backend):
    torch.set_default_device(dev(backend))
    try:
        check_bad_input(backend)
    finally:
        torch.set_default_device(None)


def check_bad_input(backend):
    z, e = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="D = 8"):
        pvkernels.vq_lookup(torch.randn(4, 7), e, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        pvkernels.vq_lookup(z, torch.randn(0, 8), backend=backend)
    with pytest.raises(TypeError, match="z must be float32, float16, bfloat16 or float64"):
        pvkernels.vq_lookup(z.long(), e, backend=backend)
    with pytest.raises(TypeError, match="codebook must be float32, float16, bfloat16 or float64"):
        pvkernels.vq_lookup(z, e.int(), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        pvkernels.vq_lookup(z, torch.randn(8), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        pvkernels.vq_lookup(z, torch.randn(2, 5, 8), backend=backend)
    with pytest.raises(ValueError, match="metric"):
        pvkernels.vq_lookup(z, e, metric="l1", backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        pvkernels.vq_lookup(z.half(), e, backend=backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        pvkernels.vq_lookup(z.tolist(), e, backend=backend)
    if backend != "reference":
        with pytest.raises(TypeError, match="float64"):
            pvkernels.vq_lookup(z.double(), e.double(), backend=backend)


def test_cpp_op_checks_directly():
    op = torch.ops.pvkernels_cpp.vq_lookup
    with pytest.raises(ValueError, match="D = 3"):
        op(torch.randn(4, 3), torch.randn(5, 4), False)
    with pytest.raises(ValueError, match="empty"):
        op(torch.randn(4, 3), torch.randn(0, 3), False)
    with pytest.raises(TypeError, match="float32"):
        op(torch.randn(4, 3).long(), torch.randn(5, 3).long(), False)


# k nearest codes ---------------------------------------------------------------------------

def check_near_optimal_topk(z, codebook, idx, zq, metric, k):
    """idx (..., k): k distinct codes whose exact scores are, slot by slot, the k smallest within fp32
    rounding (so the right set, nearest first, up to near-ties); zq is codebook[idx]."""
    D = codebook.shape[1]
    assert idx.dtype == torch.int64 and idx.shape == (*z.shape[:-1], k)
    assert zq.shape == (*z.shape[:-1], k, D) and zq.dtype == codebook.dtype
    flat = idx.reshape(-1, k).cpu()
    assert torch.equal(zq.reshape(-1, k, D).cpu(), codebook.cpu()[flat])
    if flat.numel() == 0:
        return
    assert int(flat.min()) >= 0 and int(flat.max()) < codebook.shape[0]
    assert bool((flat.sort(1).values.diff(dim=1) > 0).all()), "a code is listed twice in a row"
    s = exact_scores(z, codebook, metric)
    chosen = s.gather(1, flat)
    best = s.sort(1).values[:, :k]
    if metric == "l2":
        zn = z.double().cpu().reshape(-1, D).pow(2).sum(1, keepdim=True)
        scale = zn + codebook.double().cpu().pow(2).sum(1).max()
    else:
        scale = torch.ones_like(best[:, :1])
    excess = (chosen - best).abs() / scale
    assert float(excess.max()) <= 1e-5, f"slot score off the k smallest by {float(excess.max()):.3g} (relative)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, K, D", [(1, 7, 3), (3, 4099, 64), (1000, 600, 25), (37, 1300, 256)])
@pytest.mark.parametrize("k", [2, 5, 32])
def test_topk_near_optimal(backend, N, K, D, k):
    N = small_for_interpreter(backend, N, K * max(1, D // 64) * k)
    k = min(k, K)
    z = torch.randn(N, D, device=dev(backend))
    codebook = torch.randn(K, D, device=dev(backend))
    idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend, k=k)
    check_near_optimal_topk(z, codebook, idx, zq, "l2", k)
    one, _ = pvkernels.vq_lookup(z, codebook, backend=backend)
    if dev(backend) == "cpu":  # the same fp32 scores as the k = 1 kernel's (on a GPU, other tiles)
        assert torch.equal(idx[:, 0], one), "the nearest of the k is the k = 1 answer"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_topk_dtypes_and_metrics(backend, dtype, metric):
    # fp16/bf16 values are exact in fp64 and scores are accumulated in fp32, as for k = 1
    z = torch.randn(3, 5, 7, 48, device=dev(backend)).to(dtype)
    codebook = (torch.randn(301, 48, device=dev(backend)) * torch.rand(301, 1, device=dev(backend))).to(dtype)
    idx, zq = pvkernels.vq_lookup(z, codebook, metric=metric, backend=backend, k=5)
    check_near_optimal_topk(z, codebook, idx, zq, metric, 5)
    one, _ = pvkernels.vq_lookup(z, codebook, metric=metric, backend=backend)
    if dev(backend) == "cpu":
        assert torch.equal(idx[..., 0], one)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_topk_ties_in_index_order(backend, metric):
    # small integers: every score exact in fp32; codes repeated up to 4 times, across the tiles of
    # every backend, so whole runs of equal scores straddle the k-th slot
    D, K = 6, 1300
    base = torch.randint(-2, 3, (K, D)).float()
    base[base.abs().sum(1) == 0] = 1.0
    for a, copies in ((5, (700, 1299, 64)), (600, (601, 602)), (100, (1100,))):
        for b in copies:
            base[b] = base[a]
    z = torch.cat([base[[5, 600, 100, 1299]], torch.randint(-2, 3, (30, D)).float()])
    if metric == "cosine":
        z = z * 2.0
    N = small_for_interpreter(backend, z.shape[0], K * 8)
    z = z[:N].to(dev(backend))
    s = exact_scores(z, base, metric)
    for k in (2, 5, 8):
        idx, zq = pvkernels.vq_lookup(z, base.to(dev(backend)), metric=metric, backend=backend, k=k)
        if metric == "l2":
            assert torch.equal(idx.cpu(), s.sort(dim=1, stable=True).indices[:, :k]), k  # by score, then index
        else:  # normalisation rounds (parallel codes need not tie); copies of one code tie exactly
            check_near_optimal_topk(z, base.to(dev(backend)), idx, zq, metric, k)
    idx, _ = pvkernels.vq_lookup(z[:2], base.to(dev(backend)), metric=metric, backend=backend, k=8)
    for row, copies in zip(idx.cpu().tolist(), ([5, 64, 700, 1299], [600, 601, 602])):
        assert [c for c in row if c in copies] == copies, row  # all there, in index order


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_whole_codebook_and_identical_codes(backend):
    z = torch.randn(9, 5, device=dev(backend))
    codebook = torch.randn(23, 5, device=dev(backend))
    idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend, k=23)  # k = K: every code, ranked
    assert torch.equal(idx.sort(1).values.cpu(), torch.arange(23).expand(9, 23))
    check_near_optimal_topk(z, codebook, idx, zq, "l2", 23)
    # integer inputs: exact dots (a BLAS may round identical columns differently, as numpy does
    # under the Triton interpreter)
    z = torch.randint(-3, 4, (9, 5), device=dev(backend)).float()
    idx, _ = pvkernels.vq_lookup(z, torch.ones(40, 5, device=dev(backend)), backend=backend, k=32)
    assert torch.equal(idx.cpu(), torch.arange(32).expand(9, 32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_nan_row_gives_valid_codes(backend):
    # a NaN score counts as +inf distance: the row's codes are then the first k, in order
    z = torch.randn(4, 8, device=dev(backend))
    z[1, 3] = float("nan")
    codebook = torch.randn(70, 8, device=dev(backend))
    idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend, k=6)
    assert idx[1].cpu().tolist() == list(range(6))
    assert torch.equal(zq, codebook[idx])
    check_near_optimal_topk(z[[0, 2, 3]], codebook, idx[[0, 2, 3]], zq[[0, 2, 3]], "l2", 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_shapes(backend):
    B, T, S, D, k = 2, 3, 5, 16, 3
    z = torch.randn(B, T, S, D, device=dev(backend))
    codebook = torch.randn(33, D, device=dev(backend))
    idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend, k=k)
    assert idx.shape == (B, T, S, k) and zq.shape == (B, T, S, k, D) and zq.is_contiguous()
    flat_idx, flat_zq = pvkernels.vq_lookup(z.reshape(-1, D), codebook, backend=backend, k=k)
    assert torch.equal(idx.reshape(-1, k), flat_idx) and torch.equal(zq.reshape(-1, k, D), flat_zq)
    one_idx, one_zq = pvkernels.vq_lookup(z[0, 0, 0], codebook, backend=backend, k=k)  # a single (D,) vector
    assert one_idx.shape == (k,) and one_zq.shape == (k, D) and torch.equal(one_idx, idx[0, 0, 0])
    empty_idx, empty_zq = pvkernels.vq_lookup(z[:0], codebook, backend=backend, k=k)
    assert empty_idx.shape == (0, T, S, k) and empty_zq.shape == (0, T, S, k, D)
    strided = torch.randn(40, 2 * D, device=dev(backend))[:, ::2]
    idx, zq = pvkernels.vq_lookup(strided, codebook, backend=backend, k=k)
    assert torch.equal(idx, pvkernels.vq_lookup(strided.contiguous(), codebook, backend=backend, k=k)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_codebook_gradient(backend):
    z = torch.randn(20, 16, device=dev(backend))
    codebook = torch.randn(50, 16, device=dev(backend), requires_grad=True)
    idx, zq = pvkernels.vq_lookup(z, codebook, backend=backend, k=4)
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    expected = torch.zeros(50, 16, device=dev(backend)).index_add_(0, idx.reshape(-1), g.reshape(-1, 16))
    assert_close(codebook.grad, expected, torch.float32)


@pytest.mark.parametrize("threads", [1, 3, 7])
@pytest.mark.parametrize("K", [3000, 513])
def test_topk_cpp_codebook_splits(threads, K):
    # few rows: the cpp kernel splits the codebook across threads and merges the splits' top-k
    # (K = 513: the last split holds one code and padding)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # small integers: exact dots whatever GEMM shape a tile gets, so ties are exact
        z, codebook = torch.randint(-3, 4, (5, 24)).float(), torch.randint(-3, 4, (K, 24)).float()
        codebook[K - 1] = codebook[7]  # a tie across splits (the last code)
        z[0] = codebook[7]
        idx, zq = pvkernels.vq_lookup(z, codebook, backend="cpp", k=32)
        check_near_optimal_topk(z, codebook, idx, zq, "l2", 32)
        assert idx[0, :2].tolist() == [7, K - 1]
        ref, _ = pvkernels.vq_lookup(z, codebook, backend="reference", k=32)
        assert torch.equal(idx, ref)
    finally:
        torch.set_num_threads(before)


def test_topk_torch_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda z, e: pvkernels.vq_lookup(z, e, backend="cpp", k=3), fullgraph=True)
    z, e = torch.randn(2, 5, 8), torch.randn(11, 8)
    idx, zq = fn(z, e)
    ref_idx, ref_zq = pvkernels.vq_lookup(z, e, backend="reference", k=3)
    assert idx.shape == (2, 5, 3) and torch.equal(idx, ref_idx) and torch.equal(zq, ref_zq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_bad_k(backend):
    z, e = torch.randn(4, 8, device=dev(backend)), torch.randn(70, 8, device=dev(backend))
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be between 1 and K = 70"):
            pvkernels.vq_lookup(z, e, backend=backend, k=k)
    with pytest.raises(ValueError, match="k must be between 1 and K = 5 .the codebook size., got k = 6"):
        pvkernels.vq_lookup(z, e[:5], backend=backend, k=6)
    with pytest.raises(ValueError, match="k = 65 is more than the 64 nearest codes"):
        pvkernels.vq_lookup(z, e, backend=backend, k=65)
    for k in (2.0, True, "2", None):
        with pytest.raises(TypeError, match="k must be an int"):
            pvkernels.vq_lookup(z, e, backend=backend, k=k)
    idx, _ = pvkernels.vq_lookup(z, e, backend=backend, k=torch.tensor(64))  # anything with __index__
    assert idx.shape == (4, 64)


def test_cpp_topk_op_checks_directly():
    op = torch.ops.pvkernels_cpp.vq_lookup_topk
    with pytest.raises(ValueError, match="between 1 and K = 5"):
        op(torch.randn(4, 3), torch.randn(5, 3), False, 6)
    with pytest.raises(ValueError, match="between 1 and K = 5"):
        op(torch.randn(4, 3), torch.randn(5, 3), False, 0)
    with pytest.raises(ValueError, match="more than the 64"):
        op(torch.randn(4, 3), torch.randn(70, 3), False, 65)
    with pytest.raises(ValueError, match="D = 3"):
        op(torch.randn(4, 3), torch.randn(5, 4), False, 2)


# VectorQuantizer ---------------------------------------------------------------------------

def vq_module(**kw):
    kw.setdefault("backend", "cpp")
    return VectorQuantizer(16, 40, **kw)


def test_straight_through_and_loss_gradients():
    vq = vq_module(decay=None, beta=0.3)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(2, 3, 5, 16, requires_grad=True)
    zq, idx, loss = vq(z)
    e = vq.codebook.detach()
    assert_close(zq, e[idx], torch.float32)  # z + sg(zq - z) rounds
    assert idx.shape == (2, 3, 5)
    g = torch.randn_like(zq)
    (zq * g).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, g)  # straight through: identity
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    z.grad = None
    loss.backward()
    n = z.numel()
    diff = z.detach() - e[idx]
    assert_close(loss.detach(), (1 + 0.3) * diff.pow(2).mean(), torch.float32)
    assert_close(z.grad, 0.3 * 2 * diff / n, torch.float32, name="commitment grad")
    expected = torch.zeros_like(e).index_add_(0, idx.reshape(-1), (-2 * diff / n).reshape(-1, 16))
    assert_close(vq.codebook.grad, expected, torch.float32, name="codebook grad")


def ema_reference(codebook, cluster_size, ema_sum, z, idx, decay, eps):
    K = codebook.shape[0]
    onehot = F.one_hot(idx, K).double()
    counts = onehot.sum(0)
    sums = onehot.T @ z.double()
    cs = cluster_size.double() * decay + (1 - decay) * counts
    es = ema_sum.double() * decay + (1 - decay) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + K * eps) * n
    return es / smoothed[:, None], cs, es, counts


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ema_step_equals_reference(backend):
    vq = vq_module(decay=0.9, beta=0.25, backend=backend)
    z = torch.randn(7, 11, 16)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    zq, idx, loss = vq(z)
    assert_close(zq, before["codebook"][idx], torch.float32)  # the lookup uses the codebook before the step
    assert_close(loss, 0.25 * (z - zq).pow(2).mean(), torch.float32)
    flat = idx.reshape(-1)
    e, cs, es, counts = ema_reference(before["codebook"], before["cluster_size"], before["ema_sum"],
                                      z.reshape(-1, 16), flat, 0.9, vq.eps)
    assert_close(vq.cluster_size, cs, torch.float32, name="cluster_size")
    assert_close(vq.ema_sum, es, torch.float32, name="ema_sum")
    assert_close(vq.codebook, e, torch.float32, name="codebook")
    p = counts / counts.sum()
    p = p[p > 0]
    assert_close(vq.perplexity, torch.exp(-(p * p.log()).sum()), torch.float32, name="perplexity")
    vq.eval()
    frozen = vq.codebook.clone()
    vq(z)
    assert torch.equal(vq.codebook, frozen), "eval mode must not update the codebook"


def test_usage_and_dead_codes():
    vq = vq_module(decay=0.5, dead_threshold=0.1)
    with torch.no_grad():  # four codes far away from the data: never chosen
        vq.codebook[:4] = 100.0
        vq.ema_sum[:4] = 100.0
    z = torch.randn(256, 16)
    assert int(vq.dead_codes) == 0
    for _ in range(5):
        vq(z)
    assert int(vq.dead_codes) >= 4  # 0.5**5 < 0.1
    assert bool((vq.cluster_size[:4] < 0.1).all())
    assert 1.0 <= float(vq.perplexity) <= 36.0


@pytest.mark.parametrize("decay", [None, 0.9])
def test_dead_code_restart(decay):
    vq = vq_module(decay=decay, dead_threshold=0.5, restart_dead=True)
    with torch.no_grad():
        vq.codebook.normal_()
        vq.codebook[:4] = 100.0
        if decay is not None:
            vq.ema_sum.copy_(vq.codebook)
        vq.cluster_size[:4] = 0.0  # dead
    z = torch.randn(64, 16)
    vq(z)
    rows = z.reshape(-1, 16)
    for k in range(4):  # each restarted code is one of the batch vectors
        assert bool((rows == vq.codebook[k]).all(1).any()), k
    assert int(vq.dead_codes) == 0
    assert vq.codebook.abs().max() < 100.0


@pytest.mark.parametrize("decay", [None, 0.99])
def test_state_dict_round_trip(decay):
    vq = vq_module(decay=decay, metric="cosine")
    vq(torch.randn(30, 16))
    other = vq_module(decay=decay, metric="cosine")
    other.load_state_dict(vq.state_dict())
    for name, value in vq.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
    z = torch.randn(5, 16)
    vq.eval(), other.eval()
    assert torch.equal(vq(z)[1], other(z)[1])
    expected = {"codebook", "cluster_size"} | ({"ema_sum"} if decay is not None else set())
    assert set(vq.state_dict()) == expected


def test_module_equals_functional_and_backends_agree():
    vq = vq_module(decay=0.99, backend="reference")
    vq.eval()
    z, _, _ = separated(50, 40, 16, "cpu")
    _, idx, _ = vq(z)
    assert torch.equal(idx, pvkernels.vq_lookup(z, vq.codebook)[0])
    vq.backend = "cpp"
    assert torch.equal(vq(z)[1], idx)


def test_module_low_precision_input():
    vq = vq_module(decay=0.99)
    z = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    zq, idx, loss = vq(z)
    assert zq.dtype == torch.bfloat16 and loss.dtype == torch.bfloat16
    loss.backward()
    assert z.grad.dtype == torch.bfloat16


def test_module_bad_input():
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(8, 4, metric="dot")
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(8, 4, decay=1.5)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        VectorQuantizer(8, 4)(torch.randn(3, 7))


@pytest.mark.parametrize("decay", [0.9, None])
def test_module_torch_compile(decay):
    torch._dynamo.reset()
    eager, compiled = vq_module(decay=decay), vq_module(decay=decay)
    compiled.load_state_dict(eager.state_dict())
    fn = torch.compile(compiled, fullgraph=True)
    for _ in range(2):
        z = torch.randn(3, 9, 16, requires_grad=True)
        zq_e, idx_e, loss_e = eager(z)
        zq_c, idx_c, loss_c = fn(z)
        assert torch.equal(idx_e, idx_c)
        assert_close(zq_c, zq_e, torch.float32)
        assert_close(loss_c, loss_e, torch.float32)
        assert_close(compiled.codebook, eager.codebook, torch.float32)
        assert_close(compiled.cluster_size, eager.cluster_size, torch.float32)
        loss_c.backward()
        assert z.grad is not None
        if decay is None:
            loss_e.backward()
            assert_close(compiled.codebook.grad, eager.codebook.grad, torch.float32, name="codebook grad")


def test_lookup_torch_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda z, e: pvkernels.vq_lookup(z, e, backend="cpp"), fullgraph=True)
    z, e = torch.randn(2, 5, 8), torch.randn(11, 8)
    idx, zq = fn(z, e)
    ref_idx, ref_zq = pvkernels.vq_lookup(z, e, backend="reference")
    assert torch.equal(idx, ref_idx) and torch.equal(zq, ref_zq)


def test_module_empty_batch():
    vq = vq_module(decay=0.9)
    zq, idx, loss = vq(torch.randn(0, 16))
    assert zq.shape == (0, 16) and idx.shape == (0,)
    assert float(loss) == 0.0
    assert torch.isfinite(vq.codebook).all()


def _ddp_worker(rank, world, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        vq = VectorQuantizer(8, 6, decay=0.8, backend="cpp")
        torch.manual_seed(100 + rank)
        z = torch.randn(10, 8)
        vq(z)
        results[rank] = (z, vq.codebook.clone(), vq.cluster_size.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_statistics_all_reduced(tmp_path):
    # both ranks must end with the codebook of one EMA step over the union of their batches
    import torch.multiprocessing as mp

    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), results), nprocs=world, join=True)
        results = dict(results)
    torch.manual_seed(0)
    single = VectorQuantizer(8, 6, decay=0.8, backend="cpp")
    single(torch.cat([results[r][0] for r in range(world)]))
    for r in range(world):
        assert_close(results[r][1], single.codebook, torch.float32, name=f"codebook rank {r}")
        assert_close(results[r][2], single.cluster_size, torch.float32, name=f"cluster_size rank {r}")
