"""pvkernels.integrations.patch_vector_quantize against vector-quantize-pytorch itself.

Runs with whichever version is importable: CI runs this file once with the pinned release (the
1.30+ ``Codebook``) and once with 1.26.0 on PYTHONPATH (``EuclideanCodebook`` /
``CosineSimCodebook``). Near-ties: where indices differ, both codes must be equally near in fp64.
"""
from __future__ import annotations

import copy

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch")
from vector_quantize_pytorch import ResidualVQ, VectorQuantize  # noqa: E402
from vector_quantize_pytorch import vector_quantize_pytorch as peer  # noqa: E402

from pvkernels import integrations  # noqa: E402
from pvkernels.integrations import PeerVersionError  # noqa: E402

from ..utils import assert_close  # noqa: E402
from .parity import compare, fake_version, instance_and_class, train  # noqa: E402

NEW_LAYOUT = hasattr(peer, "Codebook")
D, K = 16, 64


def tokens(shape=(3, 50, D)):
    return lambda gen: torch.randn(*shape, generator=gen)


def vq_step(mask=False, **call):
    def step(model, x):
        kwargs = dict(call)
        if mask:
            kwargs["mask"] = torch.arange(x.shape[1]).expand(x.shape[0], -1) < torch.tensor([[x.shape[1]], [7], [30]])
        quantized, indices, loss = model(x, **kwargs)
        return quantized.square().mean() + loss, {"quantized": quantized, "indices": indices}
    return step


CONFIGS = {
    "l2_ema": dict(dim=D, codebook_size=K, decay=0.8),
    "cosine_ema": dict(dim=D, codebook_size=K, decay=0.8, use_cosine_sim=True),
    "dead_code_expiry": dict(dim=D, codebook_size=K, decay=0.8, threshold_ema_dead_code=2),
    "kmeans_init": dict(dim=D, codebook_size=K, kmeans_init=True, kmeans_iters=3),
    "heads_separate": dict(dim=D, codebook_size=K, heads=4, separate_codebook_per_head=True, codebook_dim=8),
    "heads_shared": dict(dim=D, codebook_size=K, heads=2, codebook_dim=8),
    "learnable_codebook": dict(dim=D, codebook_size=K, learnable_codebook=True, ema_update=False),
    "straight_through_ste": dict(dim=D, codebook_size=K, rotation_trick=False),
    "orthogonal_reg": dict(dim=D, codebook_size=K, orthogonal_reg_weight=0.5),
    "affine": dict(dim=D, codebook_size=K, affine_param=True),
    "ema_weight": dict(dim=D, codebook_size=K),
    "project_in_out": dict(dim=D, codebook_size=K, codebook_dim=6),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_parity(name):
    kw = CONFIGS[name]
    call = {"ema_update_weight": lambda embed_sum, counts: (counts > 0).float() * 0.5} if name == "ema_weight" else {}
    by_instance, by_class = instance_and_class(lambda: VectorQuantize(**kw), integrations.patch_vector_quantize,
                                               tokens(), vq_step(**call))
    for p in (by_instance, by_class):
        assert p.stats == {"fast": 5, "fallback": {}}, p.stats


def test_masked_rows_are_left_out():
    by_instance, _ = instance_and_class(lambda: VectorQuantize(dim=D, codebook_size=K, threshold_ema_dead_code=1),
                                        integrations.patch_vector_quantize, tokens(), vq_step(mask=True))
    assert by_instance.stats["fast"] == 5


@pytest.mark.parametrize("kind", ["eval", "single_token", "image_fmap", "channel_first", "freeze", "accum"])
def test_call_variants(kind):
    kw = dict(dim=D, codebook_size=K)
    shape, call = (3, 50, D), {}
    if kind == "single_token":
        shape = (7, D)
    elif kind == "image_fmap":
        kw["accept_image_fmap"], shape = True, (2, D, 5, 6)
    elif kind == "channel_first":
        kw["channel_last"], shape = False, (2, D, 9)
    elif kind == "freeze":
        call["freeze_codebook"] = True
    elif kind == "accum":
        call["accum_ema_update"] = True

    def build():
        model = VectorQuantize(**kw)
        return model.eval() if kind == "eval" else model

    by_instance, by_class = instance_and_class(build, integrations.patch_vector_quantize, tokens(shape),
                                               vq_step(**call))
    assert by_instance.stats == {"fast": 5, "fallback": {}}


@pytest.mark.parametrize("shared", [False, True])
def test_residual_vq(shared):
    def build():
        return ResidualVQ(dim=D, num_quantizers=3, codebook_size=K, shared_codebook=shared, decay=0.8)

    def step(model, x):
        quantized, indices, losses = model(x)
        return quantized.square().mean() + losses.sum(), {"quantized": quantized, "indices": indices}
    by_instance, _ = instance_and_class(build, integrations.patch_vector_quantize, tokens(), step)
    assert by_instance.stats == {"fast": 15, "fallback": {}}


@pytest.mark.skipif(not NEW_LAYOUT, reason="the peer's own in-place optimizer fails before 1.27 (no use_ddp)")
def test_in_place_codebook_optimizer():
    def build():
        return VectorQuantize(dim=D, codebook_size=K, learnable_codebook=True, ema_update=False,
                              in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    by_instance, _ = instance_and_class(build, integrations.patch_vector_quantize, tokens(), vq_step())
    assert by_instance.stats == {"fast": 10, "fallback": {}}  # quantised again after the in-place step


FALLBACKS = {
    "stochastic": (dict(stochastic_sample_codes=True), {}, "stochastic_sample_codes"),
    "gumbel_straight_through": (dict(straight_through=True, rotation_trick=False), {}, "straight_through"),
    "cross_entropy_commitment": (dict(commitment_use_cross_entropy_loss=True), {}, "commitment_use_cross_entropy_loss"),
    "codebook_diversity": (dict(codebook_diversity_loss_weight=0.1), {}, "codebook_diversity_loss_weight"),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_unsupported_calls_fall_back(name):
    kw, call, reason = FALLBACKS[name]
    torch.manual_seed(0)
    ref_model = VectorQuantize(dim=D, codebook_size=K, **kw)
    fast_model = copy.deepcopy(ref_model)
    ref = train(ref_model, tokens(), vq_step(**call), steps=2)
    p = integrations.patch_vector_quantize(fast_model)
    compare(ref, train(fast_model, tokens(), vq_step(**call), steps=2), rtol=0, atol=0)  # the original ran
    assert p.stats["fast"] == 0 and sum(p.stats["fallback"].values()) == 2, p.stats
    assert any(reason in r for r in p.stats["fallback"]), p.stats
    strict_model = VectorQuantize(dim=D, codebook_size=K, **kw)
    with integrations.patch_vector_quantize(strict_model, strict=True):
        with pytest.raises(ValueError, match=reason):
            strict_model(torch.randn(2, 5, D))


@pytest.mark.skipif(not NEW_LAYOUT, reason="topk and the distance-returning Codebook call are 1.30+ features")
def test_indices_calls_and_topk_past_64_fall_back():
    vq = VectorQuantize(dim=D, codebook_size=K + 16)
    x = torch.randn(2, 9, D)
    with integrations.patch_vector_quantize(vq) as p:
        vq(x, indices=torch.randint(0, K, (2, 9)))
        vq._codebook(x[None])  # direct call: the caller reads its distances
        vq.eval()(x, topk=65)
    reasons = " | ".join(p.stats["fallback"])
    assert p.stats["fast"] == 0 and "indices=" in reasons and "outside VectorQuantize" in reasons, reasons
    assert "topk > 64" in reasons


def topk_step(k, mask=False):
    def step(model, x):
        kwargs = {"topk": k}
        if mask:
            kwargs["mask"] = torch.arange(x.shape[1]).expand(x.shape[0], -1) < torch.tensor([[x.shape[1]], [7], [30]])
        quantized, indices, loss = model(x, **kwargs)
        return quantized.square().mean() + loss.sum(), {"quantized": quantized, "indices": indices}
    return step


@pytest.mark.skipif(not NEW_LAYOUT, reason="topk is a 1.27+ feature")
@pytest.mark.parametrize("k, mode, mask", [(1, "train", False), (4, "train", True), (3, "eval", False),
                                           (12, "eval", False)])
def test_topk_parity(k, mode, mask):
    # k well below K: ranking all K codes meets near-ties (the peer ranks cdist's rounding, we rank
    # ||e||^2 - 2 <z, e>), which test_topk_agrees_with_the_plain_lookup_bit_for_bit allows for
    def build():
        model = VectorQuantize(dim=D, codebook_size=K, decay=0.8, learnable_codebook=True, ema_update=False)
        return model.eval() if mode == "eval" else model
    by_instance, by_class = instance_and_class(build, integrations.patch_vector_quantize, tokens(),
                                               topk_step(k, mask))
    for p in (by_instance, by_class):
        assert p.stats == {"fast": 5, "fallback": {}}, p.stats


@pytest.mark.skipif(not NEW_LAYOUT, reason="topk is a 1.27+ feature")
def test_topk_agrees_with_the_plain_lookup_bit_for_bit():
    torch.manual_seed(3)
    vq = VectorQuantize(dim=256, codebook_size=512).eval()
    x = torch.randn(1, 1024, 256)  # D = 256: near-ties to fp32 rounding occur
    with integrations.patch_vector_quantize(vq) as p:
        q1, i1, _ = vq(x)
        q2, i2, _ = vq(x, topk=1)
        q5, i5, _ = vq(x, topk=5)
    assert i2.shape == (1, 1024, 1) and i5.shape == (1, 1024, 5) and q5.shape == (1, 1024, 5, 256)
    assert torch.equal(i1, i2[..., 0]) and torch.equal(q1, q2[..., 0, :])
    assert torch.equal(i1, i5[..., 0]) and torch.equal(q1, q5[..., 0, :])
    d = torch.cdist(x[0].double(), vq.codebook.double())
    chosen = d.gather(1, i5[0])
    assert bool((chosen.diff(dim=1) >= -1e-5 * chosen[:, 1:]).all()), "not nearest first"
    assert p.stats == {"fast": 3, "fallback": {}}


@pytest.mark.skipif(not NEW_LAYOUT, reason="update_ema_indices and topk are 1.27+ features")
@pytest.mark.parametrize("seed", range(4))
def test_manual_ema_update_equals_the_forward_update_bit_for_bit(seed):
    """The peer's own test_topk_and_manual_ema_update (8 of 20 seeds failed when only the plain
    forward was ours): a plain training forward against a topk=1 forward without EMA update
    followed by update_ema_indices with its indices, at D = 256 where near-ties occur."""
    torch.manual_seed(seed)
    vq1 = VectorQuantize(dim=256, codebook_size=512)
    vq2 = VectorQuantize(dim=256, codebook_size=512)
    vq2.load_state_dict(vq1.state_dict())
    x = torch.randn(1, 1024, 256)
    mask = torch.randint(0, 2, (1, 1024)).bool()
    with integrations.patch_vector_quantize() as p:  # class level, as the peer-suite plugin
        _, indices1, _ = vq1.train()(x, mask=mask)
        _, indices2, _ = vq2.train()(x, mask=mask, topk=1, ema_update=False)
        vq2.update_ema_indices(x, indices2[..., 0], mask=mask)
    assert torch.equal(indices1, indices2[..., 0])
    for name in ("cluster_size", "embed_avg", "embed"):
        a, b = getattr(vq1._codebook, name), getattr(vq2._codebook, name)
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} entries differ"
    assert p.stats == {"fast": 3, "fallback": {}}, p.stats  # two forwards and the update


@pytest.mark.skipif(not NEW_LAYOUT, reason="update_ema_indices is a 1.27+ feature")
@pytest.mark.parametrize("heads", [1, 2])
def test_update_indices_parity(heads):
    """The peer's update from given indices (one-hot sums) against ours (index sums), masked,
    then a forward that expires dead codes: buffers within fp32 rounding of the sums' order."""
    torch.manual_seed(0)
    kw = dict(dim=D, codebook_size=K, decay=0.8, threshold_ema_dead_code=1)
    ref = VectorQuantize(heads=heads, separate_codebook_per_head=True, codebook_dim=8, **kw) if heads > 1 else \
        VectorQuantize(**kw)
    fast = copy.deepcopy(ref)
    x = torch.randn(3, 20, D)
    indices = torch.randint(0, K, (3, 20, heads) if heads > 1 else (3, 20))
    indices[1, :4] = -1  # the peer's marker of masked positions
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, :4] = False
    for model in (ref, fast):
        model.train()
    torch.manual_seed(7)  # dead codes are replaced by sampled rows
    ref.update_ema_indices(x, indices, mask=mask)
    torch.manual_seed(7)
    with integrations.patch_vector_quantize(fast) as p:
        fast.update_ema_indices(x, indices, mask=mask)
    assert p.stats == {"fast": 1, "fallback": {}}, p.stats
    for name, value in ref.state_dict().items():
        assert_close(fast.state_dict()[name], value, torch.float32, name=name)


@pytest.mark.skipif(not NEW_LAYOUT, reason="update_ema_indices is a 1.27+ feature")
def test_update_indices_outside_the_codebook_fall_back():
    vq = VectorQuantize(dim=D, codebook_size=K).train()
    x = torch.randn(2, 5, D)
    for bad in (torch.full((2, 5), K), torch.full((2, 5), -2), torch.zeros(2, 5, dtype=torch.int32)):
        with pytest.raises(RuntimeError) as expected:
            copy.deepcopy(vq).update_ema_indices(x, bad)
        with integrations.patch_vector_quantize(vq) as p:
            with pytest.raises(type(expected.value)):
                vq.update_ema_indices(x, bad)
        assert p.stats["fast"] == 0 and len(p.stats["fallback"]) == 1, p.stats


@pytest.mark.skipif(not NEW_LAYOUT, reason="beam search is a 1.27+ feature")
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_residual_vq_beam_search(mode):
    def build():
        model = ResidualVQ(dim=D, num_quantizers=3, codebook_size=K, decay=0.8, beam_size=2, eval_beam_size=3)
        return model.eval() if mode == "eval" else model

    def step(model, x):
        quantized, indices, losses = model(x)
        return quantized.square().mean() + losses.sum(), {"quantized": quantized, "indices": indices}
    by_instance, _ = instance_and_class(build, integrations.patch_vector_quantize, tokens(), step)
    # 3 top-k lookups per step, then (training) the peer's update_indices after the search (it
    # makes one call per step at 1.32)
    assert by_instance.stats == {"fast": 5 * (4 if mode == "train" else 3), "fallback": {}}, by_instance.stats


def test_codebook_transform_fn_falls_back():
    vq = VectorQuantize(dim=D, codebook_size=K)
    x = torch.randn(2, 9, D)

    def transform(embed):  # (h, c, d) -> (h, b, n, c, d): one codebook per row
        return embed[:, None, None].expand(1, 2, 9, K, D) * 1.0
    with integrations.patch_vector_quantize(vq) as p:
        vq(x, codebook_transform_fn=transform)
    assert p.stats["fast"] == 0 and any("codebook_transform_fn" in r for r in p.stats["fallback"])


def test_cosine_codes_off_the_sphere_fall_back():
    vq = VectorQuantize(dim=D, codebook_size=K, use_cosine_sim=True).eval()
    vq._codebook.embed.mul_(3.0)  # the peer ranks by raw dot product then: not the angle
    x = torch.randn(2, 9, D)
    expected = vq(x)
    with integrations.patch_vector_quantize(vq) as p:
        got = vq(x)
    assert torch.equal(got[1], expected[1]) and p.stats["fast"] == 0
    assert any("unit vectors" in r for r in p.stats["fallback"])


def test_near_ties_only():
    """At D=256 fp32 distances tie often enough: every differing row must be an fp64 near-tie,
    and where they differ pvkernels agrees with the fp64 argmin at least as often as the peer."""
    torch.manual_seed(1)
    vq = VectorQuantize(dim=256, codebook_size=512).eval()
    x = torch.randn(1, 2048, 256)
    _, peer_idx, _ = vq(x)
    with integrations.patch_vector_quantize(vq):
        _, ours, _ = vq(x)
    d64 = torch.cdist(x[0].double(), vq.codebook.double())
    rows = (ours[0] != peer_idx[0]).nonzero().flatten()
    assert len(rows) <= 8, f"{len(rows)} of 2048 rows differ"
    for i in rows.tolist():
        a, b = d64[i, ours[0, i]], d64[i, peer_idx[0, i]]
        assert abs(a - b) <= 1e-5 * b, f"row {i}: fp64 distances {float(a)} vs {float(b)} are not a near-tie"
    assert sum(int(ours[0, i] == d64[i].argmin()) for i in rows.tolist()) >= len(rows) / 2


def test_unpatch_restores_exactly_and_state_dict_is_unchanged():
    vq = VectorQuantize(dim=D, codebook_size=K)
    keys = list(vq.state_dict())
    cls_forward = VectorQuantize.forward
    p = integrations.patch_vector_quantize(vq)
    assert "forward" in vars(vq) and "pvkernels: vector_quantize" in repr(vq)
    assert list(vq.state_dict()) == keys
    p.unpatch()
    assert "forward" not in vars(vq) and "extra_repr" not in vars(vq) and "forward" not in vars(vq._codebook)
    assert "pvkernels" not in repr(vq)

    with integrations.patch_vector_quantize() as p:
        assert VectorQuantize.forward is not cls_forward and "pvkernels" in repr(VectorQuantize(dim=D, codebook_size=K))
    assert VectorQuantize.forward is cls_forward and not p.active
    codebook_cls = type(vq._codebook)
    assert "extra_repr" not in vars(codebook_cls)


def test_peer_version_errors(monkeypatch):
    fake_version(monkeypatch, "vector-quantize-pytorch", "1.99.0")
    with pytest.raises(PeerVersionError, match="1.99.0 is outside the tested versions"):
        integrations.patch_vector_quantize()
    monkeypatch.setenv("PVKERNELS_ALLOW_UNTESTED", "1")
    with pytest.warns(RuntimeWarning, match="patching anyway"):
        integrations.patch_vector_quantize().unpatch()


def test_structural_change_is_refused(monkeypatch):
    name = "track_cluster_size_and_embed_avg" if NEW_LAYOUT else "EuclideanCodebook"
    owner = peer.Codebook if NEW_LAYOUT else peer
    monkeypatch.delattr(owner, name)
    with pytest.raises(PeerVersionError, match=name):
        integrations.patch_vector_quantize()


def test_patch_by_name_and_bad_arguments():
    vq = VectorQuantize(dim=D, codebook_size=K)
    with integrations.patch("vector_quantize", vq) as p:
        vq(torch.randn(2, 3, D))
    assert p.stats["fast"] == 1
    with pytest.raises(ValueError, match="name must be one of"):
        integrations.patch("faiss")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        integrations.patch_vector_quantize("not a model")
