"""lucidrains' vector-quantize-pytorch on ``pvkernels.vq_lookup`` (and its ``LFQ`` on
``pvkernels.lfq_entropy``: ``vector_quantize_lfq.py``).

The codebook's forward (``Codebook`` since 1.27; ``EuclideanCodebook`` / ``CosineSimCodebook``
before) builds the N x K distance matrix, an N x K one-hot of the argmax (of the ``topk``, for
beam search), a one-hot GEMM to gather the codes and another for the EMA sums. The patched forward
finds the nearest code (the k nearest, nearest first) with the fused lookup (no N x K matrix),
gathers the codes by index and accumulates the EMA counts and sums by index; the manual EMA
update from given indices (``update_indices`` / ``update_ema_indices``, which beam search and
``ema_update=False`` users call) accumulates by index too. So every lookup and every EMA sum of a
patched model is ours, and they agree with each other bit for bit (``topk=1`` is the plain
lookup; an update from the indices a forward returned equals that forward's own update).
Everything else (kmeans init, affine parameters, Laplace smoothing, dead-code expiry, rotation
trick, masks, heads, shared codebooks, DDP all-reduces, RNG use) is the peer's own code, called as
it would call it.

Not computed here (the original runs, the reason is counted): stochastic (Gumbel) or
straight-through-softmax sampling, ``topk`` above 64, ``codebook_transform_fn``, a loss that needs
the distance matrix (``indices=``, cross-entropy commitment, codebook diversity), a Codebook called
directly (its distances are part of what it returns), a cosine codebook whose codes are not unit
vectors, indices outside the codebook given to ``update_indices`` (the peer's error). Indices can
differ from the peer's on near-ties (two codes whose distances agree to fp32 rounding), and the
order of exactly tied codes in a top-k is by index (the peer's ``topk`` does not say); NaN inputs
poison only their own code's EMA sum, not every code's.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Optional

import torch

from ..ops.vq import MAX_TOPK, vq_lookup
from . import vector_quantize_lfq as lfq
from ._patching import Patch, check_peer, import_peer, missing, patch_modules, signature_problems

DISTRIBUTION = "vector-quantize-pytorch"
# half-open ranges; 1.27-1.29 (Codebook without track_cluster_size_and_embed_avg) are not supported
TESTED = (("1.25.0", "1.27"), ("1.30.0", "1.33"))
_VQ_PARAMS = ("x", "indices", "mask", "lens", "?topk", "sample_codebook_temp", "freeze_codebook",
              "return_loss_breakdown", "codebook_transform_fn", "ema_update_weight", "accum_ema_update", "?ema_update")
_CODEBOOK_PARAMS = ("x", "sample_codebook_temp", "mask", "freeze_codebook", "codebook_transform_fn",
                    "ema_update_weight", "accum_ema_update", "?ema_update", "?topk", "?update_usage")
# Codebook.update_indices (1.27+; alias update_ema_indices): the EMA update from given indices
_UPDATE_PARAMS = ("x", "embed_ind", "mask", "ema_update_weight", "accum_ema_update", "ema_update")
_UPDATE_METHODS = ("update_indices", "update_ema_indices")
_HELPERS = ("pack_one", "repeat", "rearrange", "gumbel_sample", "ema_inplace", "accum_grad_", "default")

# Set by a patched VectorQuantize.forward for the duration of the call: (its codebook, whether
# the distances it would return are unused). A codebook called any other way falls back.
_CALLER: contextvars.ContextVar = contextvars.ContextVar("pvkernels_vq_caller", default=None)


class _Assignments:
    """What the patched forward hands to ``update_codebook`` instead of the N x K one-hot: the
    (h, N) code index of every row; the patched ``track_cluster_size_and_embed_avg`` reads it."""

    def __init__(self, idx: torch.Tensor):
        self.idx = idx


def _peer():
    return import_peer("vector_quantize_pytorch.vector_quantize_pytorch", DISTRIBUTION)


def _layout(mod):
    """The codebook classes of this version and whether they are the 1.30+ ``Codebook``."""
    if hasattr(mod, "Codebook"):
        return (mod.Codebook,), True
    return tuple(getattr(mod, n) for n in ("EuclideanCodebook", "CosineSimCodebook") if hasattr(mod, n)), False


def _check(mod) -> None:
    problems = missing(mod, ("VectorQuantize",) + _HELPERS, "vector_quantize_pytorch")
    classes, new = _layout(mod)
    if not new and len(classes) != 2:
        problems += missing(mod, ("EuclideanCodebook", "CosineSimCodebook"), "vector_quantize_pytorch (no Codebook)")
    if new:
        problems += missing(mod.Codebook, ("update_codebook", "track_cluster_size_and_embed_avg", "init_embed_",
                                           "update_affine"), "Codebook")
    for cls in classes:
        problems += signature_problems(cls.forward, _CODEBOOK_PARAMS, f"{cls.__name__}.forward")
        for name in _update_methods(cls):
            problems += signature_problems(getattr(cls, name), _UPDATE_PARAMS, f"{cls.__name__}.{name}")
    if hasattr(mod, "VectorQuantize"):
        problems += signature_problems(mod.VectorQuantize.forward, _VQ_PARAMS, "VectorQuantize.forward")
    check_peer(DISTRIBUTION, TESTED, problems)


# deciding ----------------------------------------------------------------------------------

def _distances_needed(vq, a) -> Optional[str]:
    """Why this VectorQuantize call uses the distance matrix, or None."""
    if a.get("indices") is not None:
        return "indices= (cross-entropy against the distance matrix)"
    if vq.training and getattr(vq, "has_codebook_diversity_loss", False):
        return "codebook_diversity_loss_weight > 0 (softmax over the distance matrix)"
    cross_entropy = getattr(vq, "commitment_use_cross_entropy_loss", False)
    cross_entropy = cross_entropy and getattr(vq, "has_commitment_loss", False)
    if vq.training and cross_entropy:
        return "commitment_use_cross_entropy_loss (cross-entropy over the distance matrix)"
    return None


def _codebook_reason(mod, cb, a) -> Optional[str]:
    caller = _CALLER.get()
    if caller is None or caller[0] is not cb:
        return "Codebook called outside VectorQuantize (its distance matrix is part of what it returns)"
    if a.get("codebook_transform_fn") is not None:
        return "codebook_transform_fn (a transformed codebook per row)"
    if a.get("topk") is not None and int(a["topk"]) > MAX_TOPK:
        return f"topk > {MAX_TOPK} (the fused lookup keeps at most {MAX_TOPK} codes per row)"
    sample = cb.gumbel_sample
    if not (isinstance(sample, functools.partial) and sample.func is mod.gumbel_sample and not sample.args):
        return "a custom gumbel_sample function"
    temperature = a["sample_codebook_temp"]
    temperature = cb.sample_codebook_temp if temperature is None else temperature
    if cb.training and temperature > 0:
        if sample.keywords.get("stochastic", False):
            return "stochastic_sample_codes (Gumbel sampling)"
        if sample.keywords.get("straight_through", False):
            return "straight_through (gradient through a softmax of the distances)"
    x = a["x"]
    if not x.is_floating_point() or x.dtype == torch.float64:
        return f"input dtype {x.dtype} (the fused lookup computes in float32)"
    return None


# computing ---------------------------------------------------------------------------------

def _is_cosine(cb) -> bool:
    return bool(getattr(cb, "use_cosine_sim", False)) or type(cb).__name__ == "CosineSimCodebook"


def _lookup(flatten: torch.Tensor, embed: torch.Tensor, cosine: bool, topk: Optional[int] = None):
    """(h, N, d) rows against (h, K, d) codes, or one (1, K, d) codebook for every group, as the
    peer's batched cdist broadcasts it (beam search's 4-D residuals) -> (h, N) indices, (h, N, d)
    codes (differentiable in ``embed`` as the peer's one-hot product is); with ``topk``, (h, N, k)
    and (h, N, k, d), nearest first. ``topk=1`` is the plain lookup, so it agrees with a call
    without topk."""
    metric = "cosine" if cosine else "l2"
    k = 1 if topk is None else int(topk)
    pairs = [vq_lookup(flatten[i], embed[i if embed.shape[0] > 1 else 0], metric, k=k)
             for i in range(flatten.shape[0])]
    idx, codes = (pairs[0][0].unsqueeze(0), pairs[0][1].unsqueeze(0)) if len(pairs) == 1 else \
        (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
    if topk is not None and k == 1:
        idx, codes = idx.unsqueeze(-1), codes.unsqueeze(-2)
    return idx, codes


def _counts_and_sums(flatten: torch.Tensor, idx: torch.Tensor, mask: Optional[torch.Tensor], K: int):
    """Per-code assignment counts (h, K) and vector sums (h, K, d), masked rows excluded: what the
    peer gets from ``onehot.sum(1)`` and ``einsum('h n d, h n c -> h c d', flatten, onehot)``."""
    h, N, d = flatten.shape
    weight = torch.ones(h, N, dtype=flatten.dtype, device=flatten.device) if mask is None else mask.to(flatten.dtype)
    counts = torch.zeros(h, K, dtype=flatten.dtype, device=flatten.device).scatter_add_(1, idx, weight)
    rows = flatten if mask is None else flatten * weight.unsqueeze(-1)
    offsets = idx + torch.arange(h, device=idx.device).unsqueeze(1) * K
    sums = torch.zeros(h * K, d, dtype=flatten.dtype, device=flatten.device)
    sums.index_add_(0, offsets.reshape(-1), rows.reshape(-1, d))
    return counts, sums.view(h, K, d)


def _fast_codebook_forward(mod, new_layout: bool, cb, a):
    """The peer's codebook forward on the fused lookup: (quantize, embed_ind, None), or why not (a str)."""
    x, mask, training = a["x"], a["mask"], cb.training
    needs_codebook_dim = x.ndim < 4
    x = x.float()
    if needs_codebook_dim:
        x = mod.rearrange(x, "... -> 1 ...")
    flatten, unpack_one = mod.pack_one(x, "h * d")
    if mask is not None:
        mask = mod.repeat(mask, "b n -> c (b h n)", c=flatten.shape[0],
                          h=flatten.shape[-2] // (mask.shape[0] * mask.shape[1]))
    cb.init_embed_(flatten, mask=mask)
    affine = getattr(cb, "affine_param", False)
    if affine:
        cb.update_affine(flatten, cb.embed, mask=mask)
    embed = (cb.embed if cb.learnable_codebook else cb.embed.detach()).to(x.dtype)
    if getattr(cb, "vq_bridge", None) is not None:
        embed = cb.vq_bridge(embed)
    if affine:
        codebook_std = cb.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = cb.batch_variance.clamp(min=1e-5).sqrt()
        embed = (embed - cb.codebook_mean) * (batch_std / codebook_std) + cb.batch_mean
    cosine = _is_cosine(cb)
    if cosine and float((embed.detach().norm(dim=-1) - 1.0).abs().amax()) > 1e-4:
        # the peer ranks by the raw dot product; only for unit codes is that the angle
        # init_embed_ above is idempotent: the original can run from the start
        return "cosine codebook whose codes are not unit vectors (the peer ranks by raw dot product)"
    if embed.shape[0] not in (1, flatten.shape[0]):
        return f"{flatten.shape[0]} row groups against {embed.shape[0]} codebooks (the peer's cdist refuses)"
    topk = a.get("topk")
    idx, quantize = _lookup(flatten, embed, cosine, topk)
    embed_ind = unpack_one(idx, "h *" if topk is None else "h * k")
    quantize = unpack_one(quantize, "h * d" if topk is None else "h * k d")

    if new_layout:  # a top-k call updates nothing: beam search updates from the chosen indices after
        if training and a["update_usage"] and not a["freeze_codebook"] and topk is None:
            cb.update_codebook(flatten, _Assignments(idx), mask=mask, ema_update_weight=a["ema_update_weight"],
                               accum_ema_update=a["accum_ema_update"], ema_update=a["ema_update"])
    elif training and cb.ema_update and not a["freeze_codebook"]:
        _update_old_layout(mod, cb, x, flatten, idx, mask, a, affine)

    if needs_codebook_dim:
        quantize, embed_ind = (mod.rearrange(t, "1 ... -> ...") for t in (quantize, embed_ind))
    return quantize, embed_ind, None  # the distances: the calling VectorQuantize does not read them


def _update_old_layout(mod, cb, x, flatten, idx, mask, a, affine) -> None:
    """EuclideanCodebook/CosineSimCodebook (<= 1.26): their inline EMA update, by index."""
    if affine:
        codebook_std = cb.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = cb.batch_variance.clamp(min=1e-5).sqrt()
        flatten = (flatten - cb.batch_mean) * (codebook_std / batch_std) + cb.codebook_mean
    counts, embed_sum = _counts_and_sums(flatten, idx, mask, cb.codebook_size)
    cb.all_reduce_fn(counts)
    embed_sum = embed_sum.contiguous()
    cb.all_reduce_fn(embed_sum)
    weight = a["ema_update_weight"]
    if callable(weight):
        weight = weight(embed_sum, counts)
    if a["accum_ema_update"]:
        mod.accum_grad_(cb.cluster_size, counts)
        mod.accum_grad_(cb.embed_avg, embed_sum)
        return
    mod.ema_inplace(cb.cluster_size, counts, cb.decay, weight)
    mod.ema_inplace(cb.embed_avg, embed_sum, cb.decay, weight)
    if not cb.manual_ema_update:
        cb.update_ema()
        cb.expire_codes_(x)


def _make_track(mod):
    """Codebook.track_cluster_size_and_embed_avg (1.30+) for ``_Assignments``; a real one-hot
    (the peer's own ``update_indices``, or an unpatched path) goes to the original."""
    def make(original):
        def track(cb, flatten, embed_onehot, mask=None, ema_update_weight=None, accum_ema_update=False):
            if not isinstance(embed_onehot, _Assignments):
                return original(cb, flatten, embed_onehot, mask, ema_update_weight, accum_ema_update)
            if cb.affine_param:
                codebook_std = cb.codebook_variance.clamp(min=1e-5).sqrt()
                batch_std = cb.batch_variance.clamp(min=1e-5).sqrt()
                flatten = (flatten - cb.batch_mean) * (codebook_std / batch_std) + cb.codebook_mean
            cluster_size, embed_sum = _counts_and_sums(flatten, embed_onehot.idx, mask, cb.codebook_size)
            cb.all_reduce_fn(cluster_size)
            embed_sum = embed_sum.contiguous()
            cb.all_reduce_fn(embed_sum)
            if callable(ema_update_weight):
                ema_update_weight = ema_update_weight(embed_sum, cluster_size)
            if accum_ema_update:
                mod.accum_grad_(cb.cluster_size, cluster_size)
                mod.accum_grad_(cb.embed_avg, embed_sum)
            else:
                mod.ema_inplace(cb.cluster_size, cluster_size, cb.decay, ema_update_weight)
                mod.ema_inplace(cb.embed_avg, embed_sum, cb.decay, ema_update_weight)
        return track
    return make


def _update_methods(cls) -> tuple:
    """The manual EMA update methods ``cls`` defines (1.27+; none before)."""
    return tuple(name for name in _UPDATE_METHODS if callable(getattr(cls, name, None)))


def _make_update_indices(patch: Patch, mod, cls, name: str):
    """Codebook.update_indices (and its alias update_ema_indices): the peer's lines with the code
    indices handed on as ``_Assignments`` instead of a one-hot, so the patched
    ``track_cluster_size_and_embed_avg`` sums by index, as the patched forward's own update does."""
    signature = inspect.signature(getattr(cls, name))

    def make(original):
        def update_indices(cb, *args, **kwargs):
            bound = signature.bind(cb, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            x, embed_ind, mask = a["x"], a["embed_ind"], a["mask"]
            needs_codebook_dim = x.ndim < 4
            x = x.float()
            if needs_codebook_dim:
                x = mod.rearrange(x, "... -> 1 ...")
                embed_ind = mod.rearrange(embed_ind, "... -> 1 ...")
            flatten, _ = mod.pack_one(x, "h * d")
            embed_ind, _ = mod.pack_one(embed_ind, "h *")
            embed_ind = embed_ind.masked_fill(embed_ind == -1, 0)  # masked positions, left out by the mask
            if embed_ind.dtype != torch.int64:
                why = f"indices of dtype {embed_ind.dtype} (the peer's one_hot takes int64 only)"
            elif embed_ind.numel() and not (0 <= int(embed_ind.min()) and int(embed_ind.max()) < cb.codebook_size):
                why = "indices outside the codebook (the peer's one_hot raises)"
            else:
                why = None
            if why is not None:
                patch.fallback(why)
                return original(cb, *args, **kwargs)
            patch.fast()
            if mask is not None:
                mask = mod.repeat(mask, "b n -> c (b h n)", c=flatten.shape[0],
                                  h=flatten.shape[-2] // (mask.shape[0] * mask.shape[1]))
            cb.update_codebook(flatten, _Assignments(embed_ind), mask=mask,
                               ema_update_weight=a["ema_update_weight"], accum_ema_update=a["accum_ema_update"],
                               ema_update=a["ema_update"])
        return update_indices
    return make


def _make_codebook_forward(patch: Patch, mod, new_layout: bool, cls):
    signature = inspect.signature(cls.forward)

    def make(original):
        def forward(cb, *args, **kwargs):
            caller = _CALLER.get()
            if caller is not None and caller[0] is cb and not caller[1]:
                return original(cb, *args, **kwargs)  # the VectorQuantize call already counted why
            bound = signature.bind(cb, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            why = _codebook_reason(mod, cb, a)
            if why is None:
                out = _fast_codebook_forward(mod, new_layout, cb, a)
                if not isinstance(out, str):
                    patch.fast()
                    return out
                why = out
            patch.fallback(why)
            return original(cb, *args, **kwargs)
        return forward
    return make


def _make_vq_forward(patch: Patch, mod):
    signature = inspect.signature(mod.VectorQuantize.forward)

    def make(original):
        def forward(vq, *args, **kwargs):
            bound = signature.bind(vq, *args, **kwargs)
            bound.apply_defaults()
            why = _distances_needed(vq, bound.arguments)
            if why is not None:
                patch.fallback(why)
            token = _CALLER.set((vq._codebook, why is None))
            try:
                return original(vq, *args, **kwargs)
            finally:
                _CALLER.reset(token)
        return forward
    return make


def patch_vector_quantize(model: Optional[torch.nn.Module] = None, *, strict: bool = False) -> Patch:
    """Puts ``pvkernels.vq_lookup`` into vector-quantize-pytorch's codebooks and
    ``pvkernels.lfq_entropy`` into its ``LFQ`` (so ``ResidualLFQ``, ``GroupedResidualLFQ``).

    Args:
        model: a module containing ``VectorQuantize`` or ``LFQ`` layers (ResidualVQ, ResidualLFQ,
            a VQ-VAE, ...): only its modules are patched (forward bound on the instances). None
            patches the classes: every instance, existing and future, until ``unpatch()``.
        strict: raise a ValueError naming the reason instead of falling back to the original.

    Returns:
        A :class:`Patch` (``.unpatch()``, context manager, ``.stats``).

    Example:
        >>> from vector_quantize_pytorch import VectorQuantize
        >>> vq = VectorQuantize(dim=64, codebook_size=8192, decay=0.8)
        >>> with pvkernels.integrations.patch_vector_quantize(vq) as p:
        ...     quantized, indices, loss = vq(torch.randn(16, 1024, 64))
        >>> p.stats
        {'fast': 1, 'fallback': {}}
    """
    mod = _peer()
    check(mod, model)
    patch = Patch("vector_quantize", strict)
    install(patch, mod, model)
    return patch


def check(mod, model: Optional[torch.nn.Module]) -> None:
    """The version and structure checks of what ``install(patch, mod, model)`` would patch: the
    VectorQuantize layout always, LFQ where it is patched (class level, or an LFQ in ``model``)."""
    _check(mod)
    lfq_mod = lfq._peer()
    if lfq.present(lfq_mod, model):
        lfq.check(lfq_mod)


def present(mod, model: Optional[torch.nn.Module]) -> bool:
    """Whether ``model`` holds a layer this patch replaces (None, the class level: always)."""
    if model is None or lfq.present(lfq._peer(), model):
        return True
    return isinstance(model, torch.nn.Module) and any(isinstance(m, mod.VectorQuantize) for m in model.modules())


def install(patch: Patch, mod, model: Optional[torch.nn.Module]) -> None:
    """Adds the codebook, VectorQuantize and LFQ replacements of ``model`` (None: the classes) to
    ``patch``."""
    lfq_mod = lfq._peer()
    if lfq.present(lfq_mod, model):
        lfq.install(patch, lfq_mod, model)
    classes, new_layout = _layout(mod)
    for cls in classes:
        makers = {"forward": _make_codebook_forward(patch, mod, new_layout, cls)}
        if new_layout:
            makers["track_cluster_size_and_embed_avg"] = _make_track(mod)
            makers.update({name: _make_update_indices(patch, mod, cls, name) for name in _update_methods(cls)})
        patch_modules(patch, model, cls, makers)
    patch_modules(patch, model, mod.VectorQuantize, {"forward": _make_vq_forward(patch, mod)})

__all__ = ["patch_vector_quantize", "TESTED"]
