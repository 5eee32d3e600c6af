"""patch_vector_quantize on vector-quantize-pytorch's ``LFQ`` (and ResidualLFQ, GroupedResidualLFQ).

Patched vs unpatched copies trained a few SGD steps: quantized output, indices, aux loss and its
breakdown, the input's and every parameter's gradient per step, every final parameter and
buffer. Not bit-equal, and why: the fused op sums the entropy over codes in another order than
the peer's softmax (fp32 rounding, ~1e-7 relative); at the peer's default inverse temperature
(100) the logits reach ~1e3 and the peer's own fp32 softmax is only good to ~1e-5, so those runs
get 1e-4. Indices are sign bits of the (equal up to rounding) input: they are compared exactly.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

vqp = pytest.importorskip("vector_quantize_pytorch")
from vector_quantize_pytorch import LFQ, GroupedResidualLFQ, ResidualLFQ  # noqa: E402
from vector_quantize_pytorch import lookup_free_quantization as peer  # noqa: E402

import pvkernels  # noqa: E402
from pvkernels import integrations  # noqa: E402
from pvkernels.integrations import PeerVersionError  # noqa: E402

from .parity import compare, fake_version, instance_and_class, train  # noqa: E402

HAS_ROTATION = "orthogonal_rotation" in inspect.signature(LFQ.__init__).parameters  # 1.28.1+


def tokens(dim, shape=(3, 40)):
    return lambda gen: torch.randn(*shape, dim, generator=gen)


def lfq_step(mask=None, **call):
    """``mask``: None, "seq" (batch, seq), "batch" (batch,) or "none" (selects no token); the rest
    goes to the call."""
    def step(model, x):
        kwargs = dict(call)
        if mask == "seq":
            n = x.shape[1]
            kwargs["mask"] = torch.arange(n).expand(x.shape[0], -1) < torch.tensor([[n], [7], [n - 5]])[:x.shape[0]]
        elif mask == "batch":
            kwargs["mask"] = torch.tensor([True, False, True])[:x.shape[0]]
        elif mask == "none":  # nothing selected: NaN entropies on both sides, as the mean of nothing
            kwargs["mask"] = torch.zeros(x.shape[:2], dtype=torch.bool)
        (quantized, indices, aux), breakdown = model(x, return_loss_breakdown=True, **kwargs)
        outputs = {"quantized": quantized, "indices": indices, "aux": aux}
        outputs.update({name: torch.as_tensor(v) for name, v in breakdown._asdict().items()})
        return quantized.square().mean() + aux, outputs
    return step


CONFIGS = {
    # name: (LFQ kwargs, call kwargs)
    "peer_defaults": (dict(dim=8, codebook_size=2 ** 8), {}),  # inv_temperature 100
    "codebooks": (dict(dim=8, codebook_size=2 ** 4, num_codebooks=2), dict(inv_temperature=3.0)),
    "projections": (dict(dim=16, codebook_size=2 ** 5, num_codebooks=2), dict(inv_temperature=2.0)),
    "cosine_project_in": (dict(dim=16, codebook_size=2 ** 6, cosine_sim_project_in=True), dict(inv_temperature=4.0)),
    "spherical_scaled": (dict(dim=10, codebook_size=2 ** 5, num_codebooks=2, spherical=True, codebook_scale=0.7),
                         dict(inv_temperature=5.0)),
    "codebook_scale": (dict(dim=6, codebook_size=2 ** 6, codebook_scale=0.25), dict(inv_temperature=8.0)),
    "soft_clamp": (dict(dim=16, codebook_size=2 ** 7, soft_clamp_input_value=1.5), dict(inv_temperature=2.0)),
    "frac_per_sample_entropy": (dict(dim=7, codebook_size=2 ** 7, frac_per_sample_entropy=0.4),
                                dict(inv_temperature=3.0)),
    "softplus_commitment": (dict(dim=9, codebook_size=2 ** 9, experimental_softplus_entropy_loss=True,
                                 commitment_loss_weight=0.25), dict(inv_temperature=1.5)),
    "no_force_f32": (dict(dim=5, codebook_size=2 ** 5, force_quantization_f32=False), dict(inv_temperature=2.0)),
    "activation_gamma": (dict(dim=16, codebook_size=2 ** 10, straight_through_activation=nn.Tanh(),
                              diversity_gamma=2.5, entropy_loss_weight=0.3), dict(inv_temperature=1.0)),
    "magvit2_like": (dict(dim=12, codebook_size=2 ** 4, num_codebooks=2, commitment_loss_weight=1.0,
                          diversity_gamma=2.5, soft_clamp_input_value=10.0, spherical=True), dict(inv_temperature=6.0)),
}
if HAS_ROTATION:
    CONFIGS["orthogonal_rotation"] = (dict(dim=8, codebook_size=2 ** 4, num_codebooks=2, orthogonal_rotation=True),
                                      dict(inv_temperature=3.0))


def _tolerances(call):
    return dict(rtol=1e-4, atol=1e-4) if call.get("inv_temperature", 100.0) >= 50 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_parity(name):
    kw, call = CONFIGS[name]
    by_instance, by_class = instance_and_class(lambda: LFQ(**kw), integrations.patch_vector_quantize,
                                               tokens(kw["dim"]), lfq_step(**call), **_tolerances(call))
    for p in (by_instance, by_class):
        assert p.stats == {"fast": 5, "fallback": {}}, p.stats


VARIANTS = {
    # name: (LFQ kwargs, input shape, step kwargs)
    "mask_seq": (dict(dim=8, codebook_size=2 ** 4, num_codebooks=2), (3, 40, 8), dict(mask="seq")),
    "mask_seq_frac": (dict(dim=8, codebook_size=2 ** 4, num_codebooks=2, frac_per_sample_entropy=0.5), (3, 40, 8),
                      dict(mask="seq")),
    "mask_batch": (dict(dim=8, codebook_size=2 ** 4, num_codebooks=2), (3, 40, 8), dict(mask="batch")),
    "mask_batch_frac": (dict(dim=6, codebook_size=2 ** 6, frac_per_sample_entropy=0.3), (3, 40, 6),
                        dict(mask="batch")),
    "mask_none_selected": (dict(dim=12, codebook_size=2 ** 5, num_codebooks=2), (3, 40, 12), dict(mask="none")),
    "image_channel_first": (dict(dim=8, codebook_size=2 ** 8), (2, 8, 5, 6), {}),
    "video_channel_first": (dict(dim=12, codebook_size=2 ** 6, num_codebooks=2), (2, 12, 3, 4, 5), {}),
    "explicit_channel_first": (dict(dim=6, codebook_size=2 ** 6, channel_first=True), (2, 6, 30), {}),
    "keep_codebook_dim": (dict(dim=6, codebook_size=2 ** 6, keep_num_codebooks_dim=True), (3, 40, 6), {}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_call_variants(name):
    kw, shape, step_kw = VARIANTS[name]
    step = lfq_step(inv_temperature=2.5, **step_kw)
    by_instance, by_class = instance_and_class(lambda: LFQ(**kw), integrations.patch_vector_quantize,
                                               lambda gen: torch.randn(*shape, generator=gen), step,
                                               rtol=1e-5, atol=1e-5)
    for p in (by_instance, by_class):
        assert p.stats == {"fast": 5, "fallback": {}}, p.stats


def test_seq_mask_makes_the_peer_fold_codebooks_into_rows():
    """With a (batch, seq) mask the peer's avg_prob is its per-row probability matrix: codebook
    entropy == per-sample entropy, bit for bit, unpatched and patched (a peer quirk we keep)."""
    lfq = LFQ(dim=8, codebook_size=2 ** 4, num_codebooks=2)
    mask = torch.rand(3, 20) > 0.3
    x = torch.randn(3, 20, 8)
    for patched in (False, True):
        p = integrations.patch_vector_quantize(lfq) if patched else None
        (_, _, aux), breakdown = lfq(x, inv_temperature=2.0, mask=mask, return_loss_breakdown=True)
        assert torch.equal(breakdown.per_sample_entropy, breakdown.batch_entropy)
        assert float(aux) == 0.0  # diversity_gamma 1: per-sample - codebook entropy
        if p is not None:
            assert p.stats == {"fast": 1, "fallback": {}}
            p.unpatch()


def test_inv_temperature_changes_per_call():
    temperatures = iter([1.0, 7.0, 30.0, 0.5, 100.0])

    def step(model, x):
        return lfq_step(inv_temperature=next(temperatures))(model, x)
    torch.manual_seed(0)
    model = LFQ(dim=8, codebook_size=2 ** 8)
    twin = copy.deepcopy(model)
    ref = train(model, tokens(8), step)
    temperatures = iter([1.0, 7.0, 30.0, 0.5, 100.0])
    p = integrations.patch_vector_quantize(twin)
    compare(ref, train(twin, tokens(8), step), rtol=1e-4, atol=1e-4)
    assert p.stats == {"fast": 5, "fallback": {}}


def test_eval_mode_runs_the_original_uncounted():
    """Eval: no entropy (the peer returns zeros), nothing to replace: neither fast nor a fallback."""
    def build():
        return LFQ(dim=8, codebook_size=2 ** 8, commitment_loss_weight=0.5).eval()
    by_instance, by_class = instance_and_class(build, integrations.patch_vector_quantize, tokens(8), lfq_step(),
                                               rtol=0, atol=0)
    for p in (by_instance, by_class):
        assert p.stats == {"fast": 0, "fallback": {}}, p.stats


def test_bf16_codebook_buffer_with_forced_f32():
    """A bf16 module (codebook buffer rounded to bf16, input bf16): the peer upcasts both; the code
    magnitude is read from the upcast buffer, so codebook_scale 0.3 is bf16(0.3) on both sides."""
    def build():
        return LFQ(dim=8, codebook_size=2 ** 8, codebook_scale=0.3).to(torch.bfloat16)

    def make_input(gen):
        return torch.randn(3, 40, 8, generator=gen).to(torch.bfloat16)
    # the input's gradient is bf16: an fp32 difference of ~1e-7 can round to the next bf16 value
    by_instance, by_class = instance_and_class(build, integrations.patch_vector_quantize, make_input,
                                               lfq_step(inv_temperature=4.0), rtol=2 ** -7, atol=1e-5)
    assert by_instance.stats == {"fast": 5, "fallback": {}}, by_instance.stats


@pytest.mark.parametrize("grouped", [False, True], ids=["residual", "grouped_residual"])
def test_residual_lfq(grouped):
    """ResidualLFQ (codebook scale 2^-q per layer, quantize dropout drawing from the torch RNG) and
    GroupedResidualLFQ hold LFQ instances: every layer's call is on the fast path."""
    def build():
        if grouped:
            return GroupedResidualLFQ(dim=12, groups=2, num_quantizers=2, codebook_size=2 ** 6)
        return ResidualLFQ(dim=8, num_quantizers=3, codebook_size=2 ** 8, quantize_dropout=True)

    def step(model, x):
        quantized, indices, losses = model(x)
        return quantized.square().mean() + losses.sum(), {"quantized": quantized, "indices": indices,
                                                         "losses": losses}
    by_instance, by_class = instance_and_class(build, integrations.patch_vector_quantize,
                                               tokens(12 if grouped else 8), step, rtol=1e-4, atol=1e-4)
    for p in (by_instance, by_class):
        assert p.stats["fallback"] == {} and p.stats["fast"] >= 5 * 2, p.stats
    if grouped:
        assert by_instance.stats["fast"] == 5 * 4


def _scale_parameter(lfq):
    lfq.codebook_scale = nn.Parameter(torch.tensor(0.5))


def _bent_codebook(lfq):
    lfq.codebook[0, 0] *= 1.5


FALLBACKS = {
    # name: (LFQ kwargs, prepare(lfq), input dtype, call kwargs, context factory, reason substring)
    "autocast_cpu": (dict(dim=8, codebook_size=2 ** 6, num_codebooks=1, has_projections=True), None, torch.float32,
                     {}, lambda: torch.autocast("cpu", dtype=torch.bfloat16), "autocast on cpu"),
    "bf16_without_forced_f32": (dict(dim=6, codebook_size=2 ** 6, force_quantization_f32=False),
                                lambda m: m.to(torch.bfloat16), torch.bfloat16, {}, None, "force_quantization_f32=False"),
    "tensor_inv_temperature": (dict(dim=6, codebook_size=2 ** 6), None, torch.float32,
                               dict(inv_temperature=torch.tensor(3.0)), None, "inv_temperature of type Tensor"),
    "spherical_scale_parameter": (dict(dim=6, codebook_size=2 ** 6, spherical=True), _scale_parameter, torch.float32,
                                  {}, None, "spherical codebook_scale"),
    "changed_codebook": (dict(dim=6, codebook_size=2 ** 6), _bent_codebook, torch.float32, {}, None,
                         "unequal magnitude"),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_unsupported_calls_fall_back(name):
    kw, prepare, dtype, call, context, reason = FALLBACKS[name]

    def build():
        model = LFQ(**kw)
        if prepare is not None:
            prepare(model)
        return model

    def step(model, x):
        with context() if context is not None else torch.enable_grad():
            return lfq_step(**call)(model, x.to(dtype))
    torch.manual_seed(0)
    ref_model = build()
    torch.manual_seed(0)
    fast_model = build()  # not a deep copy: a spherical LFQ's maybe_l2norm reads the original's scale
    ref = train(ref_model, tokens(kw["dim"]), step, steps=2)
    p = integrations.patch_vector_quantize(fast_model)
    compare(ref, train(fast_model, tokens(kw["dim"]), step, steps=2), rtol=0, atol=0)  # the original ran
    assert p.stats["fast"] == 0 and sum(p.stats["fallback"].values()) == 2, p.stats
    assert any(reason in r for r in p.stats["fallback"]), p.stats
    torch.manual_seed(0)
    strict_model = build()
    with integrations.patch_vector_quantize(strict_model, strict=True):
        with pytest.raises(ValueError, match="strict=True"):
            step(strict_model, torch.randn(2, 5, kw["dim"]))


def test_rng_use_is_the_peers():
    """Making the patch draws nothing; a patched call draws what the peer draws (the random subset
    of frac_per_sample_entropy), so the next number drawn is the same."""
    torch.manual_seed(0)
    lfq = LFQ(dim=8, codebook_size=2 ** 8, frac_per_sample_entropy=0.3)
    twin = copy.deepcopy(lfq)
    x = torch.randn(3, 40, 8)
    state = torch.get_rng_state()
    p = integrations.patch_vector_quantize(twin)
    assert torch.equal(torch.get_rng_state(), state)
    draws = []
    for model in (lfq, twin):
        torch.manual_seed(7)
        model(x, inv_temperature=3.0)
        draws.append(torch.rand(4))
    assert torch.equal(*draws) and p.stats == {"fast": 1, "fallback": {}}


def test_a_mask_the_peer_cannot_take_falls_back_to_its_error():
    lfq = LFQ(dim=8, codebook_size=2 ** 4, num_codebooks=2)
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, 2, dtype=torch.bool)  # (batch, seq, codebook)
    with pytest.raises(Exception) as peer_error:
        lfq(x, mask=mask)
    with integrations.patch_vector_quantize(lfq) as p:
        with pytest.raises(type(peer_error.value)):
            lfq(x, mask=mask)
    assert p.stats["fast"] == 0 and "a 3-D mask" in next(iter(p.stats["fallback"]))


def test_lowered_fp32_matmul_precision_falls_back():
    """set_float32_matmul_precision("medium") lets the peer's einsum run in bf16 on the CPU."""
    lfq = LFQ(dim=6, codebook_size=2 ** 6)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with integrations.patch_vector_quantize(lfq) as p:
            lfq(torch.randn(2, 9, 6))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert p.stats["fast"] == 0 and "fp32 matmuls as bf16 on cpu" in next(iter(p.stats["fallback"]))


def test_codebook_check_follows_the_buffer():
    """The code magnitude is cached per buffer state: an in-place change is seen at the next call."""
    lfq = LFQ(dim=6, codebook_size=2 ** 6)
    x = torch.randn(2, 9, 6)
    with integrations.patch_vector_quantize(lfq) as p:
        lfq(x)
        lfq.codebook.mul_(2.0)  # still sign codes, of magnitude 2
        expected = copy.deepcopy(lfq)
        got = lfq(x, return_loss_breakdown=True)[1]
        _bent_codebook(lfq)
        lfq(x)
    assert p.stats["fast"] == 2 and sum(p.stats["fallback"].values()) == 1, p.stats
    want = expected(x, return_loss_breakdown=True)[1]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unpatch_restores_exactly():
    model = ResidualLFQ(dim=8, num_quantizers=2, codebook_size=2 ** 8)
    keys = list(model.state_dict())
    cls_forward = LFQ.forward
    p = integrations.patch_vector_quantize(model)
    layer = model.layers[0]
    assert "forward" in vars(layer) and "pvkernels: vector_quantize" in repr(layer) and p.modules == 2
    assert list(model.state_dict()) == keys
    p.unpatch()
    assert all("forward" not in vars(m) and "extra_repr" not in vars(m) for m in model.modules())
    assert "pvkernels" not in repr(model)
    with integrations.patch_vector_quantize() as p:
        assert LFQ.forward is not cls_forward and "pvkernels" in repr(LFQ(dim=4, codebook_size=16))
    assert LFQ.forward is cls_forward and "extra_repr" not in vars(LFQ) and not p.active


def test_peer_version_errors(monkeypatch):
    fake_version(monkeypatch, "vector-quantize-pytorch", "1.99.0")
    with pytest.raises(PeerVersionError, match="1.99.0 is outside the tested versions"):
        integrations.patch_vector_quantize(LFQ(dim=4, codebook_size=16))


def test_structural_changes_are_refused(monkeypatch):
    lfq = LFQ(dim=4, codebook_size=16)
    with monkeypatch.context() as m:
        m.delattr(peer, "maybe_distributed_mean")
        with pytest.raises(PeerVersionError, match="maybe_distributed_mean is gone"):
            integrations.patch_vector_quantize(lfq)
    original_init = LFQ.__init__

    def init_with_a_new_option(self, *, new_option=False, **kwargs):
        original_init(self, **kwargs)
    monkeypatch.setattr(LFQ, "__init__", init_with_a_new_option)
    with pytest.raises(PeerVersionError, match="new parameter 'new_option'"):
        integrations.patch_vector_quantize(lfq)
    with pytest.raises(PeerVersionError, match="new parameter 'new_option'"):
        integrations.patch_vector_quantize()  # the class level patches LFQ too
    # a model without LFQ is not refused for LFQ's sake
    integrations.patch_vector_quantize(vqp.VectorQuantize(dim=4, codebook_size=8)).unpatch()


def test_patch_by_name():
    lfq = LFQ(dim=6, codebook_size=2 ** 6)
    with integrations.patch("vector_quantize", lfq) as p:
        lfq(torch.randn(2, 3, 6))
    assert p.stats == {"fast": 1, "fallback": {}}


# DDP: avg_prob goes through the peer's maybe_distributed_mean ------------------------------

def _ddp_worker(rank, world, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = LFQ(dim=10, codebook_size=2 ** 4, num_codebooks=2, frac_per_sample_entropy=0.75)
        twin = copy.deepcopy(model)
        make_input = tokens(10, shape=(2, 30 + 10 * rank))  # each rank its own batch and size
        ref = train(model, make_input, lfq_step(inv_temperature=2.0), steps=3)
        p = integrations.patch_vector_quantize(twin)
        compare(ref, train(twin, make_input, lfq_step(inv_temperature=2.0), steps=3), rtol=1e-5, atol=1e-5)
        fast_stats = copy.deepcopy(p.stats)
        # a (batch, seq) mask: the peer all-reduces its per-row matrix, so both ranks fall back
        twin(torch.randn(2, 30, 10), mask=torch.ones(2, 30, dtype=torch.bool))
        # what the peer's distributed mean gives: torch.distributed.nn.all_reduce is out of place and
        # the peer drops its result, so avg_prob is this rank's own divided by the world size
        plain = LFQ(dim=8, codebook_size=2 ** 8)
        x = torch.randn(2, 20 + rank, 8)
        with integrations.patch_vector_quantize(plain):
            breakdown = plain(x, inv_temperature=2.0, return_loss_breakdown=True)[1]
        _, avg_prob = pvkernels.lfq_entropy(x.reshape(-1, 1, 8).double(), 2.0, backend="reference")
        own = float(peer.entropy(avg_prob / world).mean())
        results[rank] = (peer.is_distributed(), fast_stats, dict(p.stats["fallback"]),
                         float(breakdown.batch_entropy), own)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_gloo_processes(tmp_path):
    """Two gloo ranks, each its own data: patched vs unpatched on every rank (with the peer's
    collective in the same place), the (batch, seq)-mask fallback taken on both ranks alike."""
    import torch.multiprocessing as mp

    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), results), nprocs=world, join=True)
        results = dict(results)
    for rank in range(world):
        distributed, fast_stats, fallback, batch_entropy, own = results[rank]
        assert distributed and fast_stats == {"fast": 3, "fallback": {}}, fast_stats
        assert list(fallback.values()) == [1] and "under DDP" in next(iter(fallback))
        assert abs(batch_entropy - own) <= 1e-5 * abs(own), (rank, batch_entropy, own)
