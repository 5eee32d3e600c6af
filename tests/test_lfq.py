"""lfq_entropy: every backend against the fp64 oracle (the peer's dense softmax), forward and
backward, on odd shapes; bad input; torch.compile; the LookupFreeQuantizer layer."""
import math

import pytest
import torch

import pvkernels
from pvkernels import lfq_entropy
from pvkernels.ops import lfq

from .utils import assert_close, dev

FUSED = ["cpp", "triton"]


def _skip_unavailable(backend):
    if backend == "cpp" and not pvkernels.cpp_available():
        pytest.skip("C++ extension unavailable")
    if backend == "triton" and not pvkernels.triton_available():
        pytest.skip("triton not installed")


def _loss(per_sample, avg_prob, g_avg):
    """Both entropy terms with random upstream weights (the codebook term through a random linear map)."""
    return per_sample * 0.7 + (avg_prob * g_avg).sum()


def _compare(backend, N, C, d, t, scale=1.0, spherical=False, mask=None, dtype=torch.float32, tol=None):
    _skip_unavailable(backend)
    device = dev(backend)
    x64 = torch.randn(N, C, d, dtype=torch.float64, device=device)
    if spherical:
        x64 = torch.nn.functional.normalize(x64, dim=-1) * scale
    x64 = x64.to(dtype).to(torch.float64)  # the oracle sees the input the backend sees
    g_avg = torch.randn(C, 2 ** d, dtype=torch.float64, device=device)
    x64.requires_grad_()
    ps_ref, avg_ref = lfq_entropy(x64, t, scale, spherical, mask=mask, backend="reference")
    _loss(ps_ref, avg_ref, g_avg).backward()
    x = x64.detach().to(dtype).requires_grad_()
    ps, avg = lfq_entropy(x, t, scale, spherical, mask=mask, backend=backend)
    assert ps.dtype == torch.float32 and ps.shape == () and avg.shape == (C, 2 ** d)
    _loss(ps, avg, g_avg.float()).backward()
    rtol, atol = tol or (1e-5, 1e-5)
    assert_close(ps, ps_ref, rtol=rtol, atol=atol, name="per-sample entropy")
    assert_close(avg, avg_ref, rtol=rtol, atol=atol, name="avg_prob")
    grad_scale = x64.grad.abs().max().item()
    # the gradient is returned in x's dtype: a 16-bit one is rounded once more
    g_rtol = rtol * 10 if dtype == torch.float32 else max(rtol * 10, torch.finfo(dtype).eps)
    assert_close(x.grad, x64.grad, rtol=g_rtol, atol=atol * max(1.0, grad_scale), name="grad x")
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("d", [1, 3, 8, 9, 12])
def test_matches_oracle(backend, d):
    if backend == "triton" and d > 9:
        pytest.skip("interpreter: small grids only")
    _compare(backend, 37 if backend == "cpp" else 5, 3 if backend == "cpp" else 2, d, t=1.3)


@pytest.mark.parametrize("backend", FUSED)
def test_peer_defaults_sharp_softmax(backend):
    # the peer's inv_temperature of 100: nearly one-hot probabilities, most codes below eps and many
    # below the fp32 range; the fp32 oracle's own error sets the tolerance
    N = 29 if backend == "cpp" else 4
    _compare(backend, N, 1, 10 if backend == "cpp" else 6, t=100.0, tol=(1e-4, 1e-5))


@pytest.mark.parametrize("backend", FUSED)
def test_spherical_scaled_masked(backend):
    N = 23 if backend == "cpp" else 6
    mask = torch.rand(N, device=dev(backend)) > 0.4
    mask[0] = True
    _compare(backend, N, 2, 5, t=7.0, scale=0.5, spherical=True, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype):
    _compare("cpp", 19, 2, 7, t=3.0, dtype=dtype, tol=(1e-5, 1e-5))


def test_mask_equals_selecting_tokens_and_token_shape():
    x = torch.randn(3, 11, 2, 6)  # (b, n, c, d): the peer's layout
    mask = torch.rand(3, 11) > 0.5
    ps, avg = lfq_entropy(x, 5.0, mask=mask)
    ps_sel, avg_sel = lfq_entropy(x[mask], 5.0)
    assert_close(ps, ps_sel, rtol=1e-6, atol=1e-7)
    assert_close(avg, avg_sel, rtol=1e-6, atol=1e-7)
    ps0, avg0 = lfq_entropy(x, 5.0, mask=torch.zeros(3, 11, dtype=torch.bool))
    assert ps0.isnan() and avg0.isnan().all()  # the mean of no token, as the peer's x[mask].mean()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_one_term_only_and_batch_zero(backend):
    _skip_unavailable(backend)
    x = torch.randn(9, 2, 5, requires_grad=True)
    ps, _ = lfq_entropy(x, 2.0, backend=backend)
    ps.backward()
    g_ps = x.grad.clone()
    x.grad = None
    _, avg = lfq_entropy(x, 2.0, backend=backend)
    avg[:, 3].sum().backward()
    assert g_ps.abs().sum() > 0 and x.grad.abs().sum() > 0
    empty = torch.randn(0, 2, 5)
    ps, avg = lfq_entropy(empty, backend=backend)
    assert ps.isnan() and avg.shape == (2, 32)


def test_non_contiguous_input():
    x = torch.randn(5, 17, 3).transpose(0, 1)[:, :2]  # (17, 2, 5) view with odd strides
    ps, avg = lfq_entropy(x, 3.0)
    ps_ref, avg_ref = lfq_entropy(x.contiguous(), 3.0, backend="reference")
    assert_close(ps, ps_ref)
    assert_close(avg, avg_ref)


def test_large_codebook_streams_without_the_matrix():
    # d = 20: 2^20 codes per token (the dense form holds 4 MB of probabilities per token)
    if not pvkernels.cpp_available():
        pytest.skip("C++ extension unavailable")
    x = torch.randn(4, 1, 20) * 0.05
    ps, avg = lfq_entropy(x, 1.0)
    ps_ref, avg_ref = lfq_entropy(x.double(), 1.0, backend="reference")
    assert_close(ps, ps_ref)
    assert_close(avg, avg_ref, rtol=1e-4, atol=1e-9)
    # near-fair bits: every p ~ 2^-20 < eps, so the clamped entropy is -log(eps) sum p = -log(eps)
    assert abs(ps.item() + math.log(1e-5)) < 1e-4


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=torch.randn(4, 1, 25)), ValueError, "d = 25 bits"),
    (dict(x=torch.randn(4, 16)), ValueError, "must be \\(..., C, d\\)"),
    (dict(x=torch.randint(0, 2, (4, 1, 8))), TypeError, "x must be float32"),
    (dict(x=torch.randn(4, 1, 8), eps=0.0), ValueError, "eps must be > 0"),
    (dict(x=torch.randn(4, 1, 8), inv_temperature=float("nan")), TypeError, "inv_temperature must be a finite"),
    (dict(x=torch.randn(4, 1, 8), mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask must have x's token shape"),
    (dict(x=torch.randn(4, 1, 8), mask=torch.ones(4)), TypeError, "mask must be a bool tensor"),
    (dict(x=torch.randn(4, 1, 8), backend="cuda"), ValueError, "backend must be one of"),
    (dict(x=torch.randn(4, 1, 8), spherical=1), TypeError, "spherical must be a bool"),
])
def test_bad_input_raises_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        lfq_entropy(**kwargs)


def test_float64_on_fused_backend_raises():
    if not pvkernels.cpp_available():
        pytest.skip("C++ extension unavailable")
    with pytest.raises(TypeError, match="float64"):
        lfq_entropy(torch.randn(4, 1, 8, dtype=torch.float64), backend="cpp")


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_raises(backend):
    # create_graph=True gives the first-order gradient; differentiating it raises (the fused
    # backward has no derivative), where torch's fallback took the cpp op for a constant
    _skip_unavailable(backend)
    x = torch.randn(6, 2, 5, device=dev(backend), requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    (grad,) = torch.autograd.grad(lfq_entropy(x, 1.3, backend=backend)[0], x, create_graph=True)
    (want,) = torch.autograd.grad(lfq_entropy(x64, 1.3, backend="reference")[0], x64)
    assert_close(grad, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="not implemented|no autograd formula"):
        torch.autograd.grad(grad.square().sum(), x)


def test_torch_compile_fullgraph():
    if not pvkernels.cpp_available():
        pytest.skip("C++ extension unavailable")
    x = torch.randn(13, 2, 6, requires_grad=True)
    g = torch.randn(2, 64)

    def step(x):
        ps, avg = lfq_entropy(x, 4.0, backend="cpp")
        return ps + (avg * g).sum()

    eager = step(x)
    eager.backward()
    grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert_close(x.grad, grad, rtol=1e-6, atol=1e-6)


def test_log_table_order_matches_the_peer_codes():
    # the factored tables index codes as the peer's mask does: feature 0 is the highest bit
    x = torch.randn(3, 1, 5)
    alpha, lqp, lqm = lfq._log_factors(x, 2.0, 1.0)
    table = lfq._log_table(lqp, lqm)
    dense = torch.log_softmax(torch.einsum("ncd,kd->nck", alpha, lfq.code_bits(5)), dim=-1)
    assert_close(table, dense, rtol=1e-5, atol=1e-5)


# ---- the layer ---------------------------------------------------------------------------------

def test_quantizer_signs_indices_and_straight_through():
    layer = pvkernels.nn.LookupFreeQuantizer(dim=10, bits=5, num_codebooks=2)  # 10 = 2 x 5: no projection
    x = torch.randn(3, 7, 10, requires_grad=True)
    q, idx, loss = layer(x)
    signs = (x.detach().unflatten(-1, (2, 5)) > 0)
    assert torch.equal(q.detach(), torch.where(signs, 1.0, -1.0).flatten(-2))
    assert torch.equal(idx, (signs.long() * 2 ** torch.arange(4, -1, -1)).sum(-1))
    assert idx.shape == (3, 7, 2) and loss.shape == ()
    (q * torch.arange(10.0)).sum().backward(retain_graph=True)
    assert_close(x.grad, torch.arange(10.0).expand(3, 7, 10))  # straight through
    layer.eval()
    q_eval, idx_eval, loss_eval = layer(x)
    assert loss_eval.item() == 0.0 and torch.equal(layer.indices_to_codes(idx_eval), q_eval.detach())


@pytest.mark.parametrize("spherical", [False, True])
def test_quantizer_loss_is_the_entropy_loss_of_the_oracle(spherical):
    torch.manual_seed(1)
    layer = pvkernels.nn.LookupFreeQuantizer(dim=12, bits=6, num_codebooks=1, inv_temperature=3.0,
                                             spherical=spherical, codebook_scale=0.8)
    ref = pvkernels.nn.LookupFreeQuantizer(dim=12, bits=6, inv_temperature=3.0, spherical=spherical,
                                           codebook_scale=0.8, backend="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 33, 12)
    mask = torch.rand(2, 33) > 0.3
    (q, idx, loss), (q_r, idx_r, loss_r) = layer(x, mask=mask), ref(x, mask=mask)
    assert torch.equal(idx, idx_r) and torch.equal(q, q_r)
    assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_r.backward()
    for (name, p), p_r in zip(layer.named_parameters(), ref.parameters()):
        if name.startswith("project_in"):  # the loss does not reach project_out
            assert_close(p.grad, p_r.grad, rtol=1e-4, atol=1e-6, name=name)
    h = layer.project_in(x).detach()
    h = torch.nn.functional.normalize(h, dim=-1) * 0.8 if spherical else h
    prob = torch.softmax(2 * 3.0 * h[mask] @ (lfq.code_bits(6) * (0.8 / 6 ** 0.5 if spherical else 0.8)).T, -1)
    entropy = (-prob * prob.clamp(min=1e-5).log()).sum(-1).mean()
    assert_close(layer.last_losses["per_sample_entropy"], entropy, rtol=1e-5, atol=1e-6)


def test_quantizer_bad_input():
    layer = pvkernels.nn.LookupFreeQuantizer(dim=8, bits=8)
    with pytest.raises(ValueError, match="x must be \\(..., dim=8\\)"):
        layer(torch.randn(4, 7))
    with pytest.raises(ValueError, match="mask must be a bool tensor of x's token shape"):
        layer(torch.randn(4, 8), mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bits must be 1 to 24"):
        pvkernels.nn.LookupFreeQuantizer(dim=8, bits=30)


def test_auto_takes_the_reference_for_small_codebooks(monkeypatch):
    # the measured crossover (pvkernels._backend._CPP_LOSES): d <= 8 bits runs the dense softmax
    if not pvkernels.cpp_available():
        pytest.skip("C++ extension unavailable")
    monkeypatch.delenv("PVKERNELS_BACKEND", raising=False)
    calls = []
    reference = lfq.lfq_entropy_reference
    monkeypatch.setattr(lfq, "lfq_entropy_reference", lambda x, *a: calls.append(x.shape[-1]) or reference(x, *a))
    for d in (8, 9):
        lfq_entropy(torch.randn(5, 1, d))
    lfq_entropy(torch.randn(5, 1, 8), backend="cpp")  # an explicit backend runs as asked
    assert calls == [8]
