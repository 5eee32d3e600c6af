"""lucidrains' vector-quantize-pytorch ``LFQ`` on ``pvkernels.lfq_entropy``.

The peer's training forward builds the N x 2^d matrix of code probabilities for its entropy
auxiliary loss (``einsum`` against all 2^d codes, a softmax, two clamped entropies). The patched
forward is the peer's own forward with that one block swapped for the fused op (no N x 2^d
matrix); everything else (projections, soft clamp, orthogonal rotation, spherical l2norm, sign
quantisation, indices, straight-through activation, masks and the ``frac_per_sample_entropy``
subset drawn with the peer's own ``torch.randn(...).argsort``, ``maybe_distributed_mean`` of
avg_prob, softplus, commitment loss, loss breakdown, channel-first layouts) is the peer's code,
called as it calls it. ``ResidualLFQ`` and ``GroupedResidualLFQ`` hold LFQ instances and are
covered. (Under DDP the peer's ``maybe_distributed_mean`` all-reduces out of place and drops the
result, so avg_prob is each rank's own divided by the world size; the patch calls it as it is.)

A (batch, seq) ``mask`` makes the peer fold tokens and codebooks into one row axis before the
softmax, so its ``avg_prob`` is then the per-row probability matrix itself and its codebook
entropy equals the per-sample entropy; the patch computes exactly that (without the matrix).

Eval mode computes no entropy (the peer returns zeros): the original runs, counted neither as
fast nor as a fallback. Not computed here (the original runs, the reason is counted): autocast
(the peer's einsum then runs in 16 bits; not on CUDA with ``force_quantization_f32``, which is
computed here), fp32 matmuls allowed in TF32/bf16 (``set_float32_matmul_precision`` below
"highest"), ``force_quantization_f32=False`` with a non-fp32 input, a codebook buffer that is
not the 2^d sign codes of one magnitude, a tensor ``inv_temperature`` or (spherical) tensor
``codebook_scale``, more than 24 bits per codebook, a mask that is not a bool tensor of at most
2 dims, and a (batch, seq) mask under DDP (the peer all-reduces its N x 2^d matrix then).
"""
from __future__ import annotations

import inspect
import math
import weakref
from numbers import Real
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..ops.lfq import MAX_BITS, code_bits, lfq_entropy
from ._patching import Patch, check_peer, import_peer, missing, patch_modules, signature_problems

DISTRIBUTION = "vector-quantize-pytorch"
# LFQ.forward is the same from 1.25.0 to 1.32.0 but for the orthogonal rotation (1.28.1+), read
# with getattr; the tested ranges are those of the VectorQuantize patch
TESTED = (("1.25.0", "1.27"), ("1.30.0", "1.33"))
_FORWARD_PARAMS = ("x", "inv_temperature", "return_loss_breakdown", "mask")
_INIT_PARAMS = ("dim", "codebook_size", "entropy_loss_weight", "commitment_loss_weight", "diversity_gamma",
                "straight_through_activation", "num_codebooks", "keep_num_codebooks_dim", "codebook_scale",
                "frac_per_sample_entropy", "has_projections", "projection_has_bias", "soft_clamp_input_value",
                "cosine_sim_project_in", "cosine_sim_project_in_scale", "channel_first",
                "experimental_softplus_entropy_loss", "entropy_loss_offset", "spherical", "force_quantization_f32",
                "?orthogonal_rotation")
_HELPERS = ("LFQ", "Return", "LossBreakdown", "rearrange", "reduce", "pack_one", "unpack_one", "default", "exists",
            "identity", "entropy", "log", "maybe_distributed_mean", "is_distributed", "autocast", "nullcontext",
            "partial")
_ATTRIBUTES = ("dim", "codebook_dim", "num_codebooks", "keep_num_codebooks_dim", "channel_first", "activation",
               "maybe_l2norm", "frac_per_sample_entropy", "diversity_gamma", "entropy_loss_weight", "codebook_scale",
               "commitment_loss_weight", "soft_clamp_input_value", "entropy_loss_offset",
               "experimental_softplus_entropy_loss", "force_quantization_f32", "mask", "zero", "codebook",
               "project_in", "project_out", "spherical")


def _peer():
    return import_peer("vector_quantize_pytorch.lookup_free_quantization", DISTRIBUTION)


def _log_eps(mod) -> Optional[float]:
    """The clamp of the peer's ``log`` (``entropy`` calls it with its default)."""
    try:
        eps = inspect.signature(mod.log).parameters["eps"].default
    except (TypeError, ValueError, KeyError):
        return None
    return float(eps) if isinstance(eps, Real) and not isinstance(eps, bool) and eps > 0 else None


def problems(mod) -> list:
    """What changed in the peer's LFQ that the patched forward relies on."""
    found = missing(mod, _HELPERS, "vector_quantize_pytorch.lookup_free_quantization")
    if not hasattr(mod, "LFQ"):
        return found
    found += signature_problems(mod.LFQ.forward, _FORWARD_PARAMS, "LFQ.forward")
    found += signature_problems(mod.LFQ.__init__, _INIT_PARAMS, "LFQ.__init__")
    if hasattr(mod, "log") and _log_eps(mod) is None:
        found.append("lookup_free_quantization.log has no positive default eps")
    try:
        found += missing(mod.LFQ(dim=4, codebook_size=16), _ATTRIBUTES, "LFQ")
    except Exception as exc:  # noqa: BLE001  a changed constructor is a structural change
        found.append(f"LFQ(dim=4, codebook_size=16) failed: {exc}")
    return found


def check(mod) -> None:
    check_peer(DISTRIBUTION, TESTED, problems(mod))


# deciding ----------------------------------------------------------------------------------

# module -> (weak references to its codebook buffer and maybe_l2norm, the buffer's version, the
# rest of what the peer applies to it, the effective code magnitude or a reason): the codebook is
# checked once per state (weak references: an entry must not keep its module alive)
_CODES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ref(obj):
    """A weak reference where the object takes one (a builtin does not: it cannot hold the module)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _code_value(lfq) -> Union[float, str]:
    """The magnitude s of the codes the peer's entropy compares against, when they are exactly the
    2^d sign codes {-s, +s}^d (in the peer's bit order); else why not. Read from the buffer as the
    peer transforms it (``.float()`` when forced, ``maybe_l2norm``), so a half-precision buffer or
    the spherical normalisation give the very fp32 value the peer multiplies by."""
    buffer, norm, force = lfq.codebook, lfq.maybe_l2norm, bool(lfq.force_quantization_f32)
    key = (force, lfq.codebook_scale if isinstance(lfq.codebook_scale, Real) else None)
    cached = _CODES.get(lfq)
    if (cached is not None and cached[0]() is buffer and cached[1]() is norm and cached[2] == buffer._version
            and cached[3] == key):
        return cached[4]
    value = _inspect_codes(lfq, buffer, force)
    _CODES[lfq] = (_ref(buffer), _ref(norm), buffer._version, key, value)
    return value


def _inspect_codes(lfq, buffer: torch.Tensor, force: bool) -> Union[float, str]:
    d = lfq.codebook_dim
    if not isinstance(buffer, torch.Tensor) or tuple(buffer.shape) != (2 ** d, d):
        return f"codebook buffer of shape {tuple(getattr(buffer, 'shape', ()))}, not the (2^{d}, {d}) sign codes"
    with torch.no_grad():
        codes = lfq.maybe_l2norm(buffer.float() if force else buffer)
    if codes.dtype != torch.float32:
        return f"codebook of dtype {codes.dtype} without force_quantization_f32 (the peer's einsum is not fp32)"
    magnitude = codes.abs()
    value = float(magnitude.reshape(-1)[0])
    if not (math.isfinite(value) and value > 0) or not bool((magnitude == value).all()):
        return "codebook entries of unequal magnitude (not the sign codes {-s, +s}^d)"
    if not torch.equal(codes > 0, code_bits(d, codes.device) > 0):
        return "codebook rows that are not the 2^d sign codes in the peer's order"
    return value


def _lowered_matmul(device: str) -> Optional[str]:
    """fp32 matmuls allowed to run in TF32/bf16 (``torch.set_float32_matmul_precision("high")``):
    the peer's einsum of the inputs with the codes is then not fp32, its logits off by ~1e-3."""
    if device == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "TF32 matmuls on cuda (the peer's einsum is not fp32)"
    if device == "cpu":
        precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
        if precision not in ("none", "ieee"):
            return f"fp32 matmuls as {precision} on cpu (the peer's einsum is not fp32)"
    return None


def reason(mod, lfq, a) -> Optional[str]:
    """Why this training call is not computed exactly by the patched forward, or None."""
    x, mask, t = a["x"], a["mask"], a["inv_temperature"]
    force = bool(lfq.force_quantization_f32)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return f"input of type {getattr(x, 'dtype', type(x).__name__)}"
    device = x.device.type
    if torch.is_autocast_enabled(device) and not (force and device == "cuda"):
        return f"autocast on {device} (the peer's einsum and softmax run in 16 bits)"
    lowered = _lowered_matmul(device)
    if lowered is not None:
        return lowered
    if not force and x.dtype != torch.float32:
        return f"force_quantization_f32=False with a {x.dtype} input (the peer's softmax is not fp32)"
    if isinstance(t, bool) or not isinstance(t, Real):
        return f"inv_temperature of type {type(t).__name__} (a number is computed here)"
    if not math.isfinite(t):
        return f"inv_temperature {t!r}"
    scale = lfq.codebook_scale
    if lfq.maybe_l2norm is not mod.identity and (isinstance(scale, bool) or not isinstance(scale, Real)):
        return "spherical codebook_scale that is not a number (the codes' scale may carry a gradient)"
    if lfq.codebook_dim > MAX_BITS:
        return f"{lfq.codebook_dim} bits per codebook > {MAX_BITS}"
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            return "a mask that is not a bool tensor"
        if mask.dim() > 2:
            return f"a {mask.dim()}-D mask (the peer's entropy input is then not (tokens, d))"
        if mask.dim() == 2 and mod.is_distributed():
            return "a (batch, seq) mask under DDP (the peer all-reduces its N x 2^d probabilities)"
    value = _code_value(lfq)
    return value if isinstance(value, str) else None


# computing ---------------------------------------------------------------------------------

def _entropies(mod, lfq, rows: torch.Tensor, inv_temperature: float, code_value: float,
               eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per_sample_entropy, codebook_entropy) as the peer gets them from ``rows``, its entropy input
    (tokens..., codebooks, d), or (rows, d) when a (batch, seq) mask folded codebooks into rows."""
    if rows.dim() >= 3:
        per_sample_entropy, avg_prob = lfq_entropy(rows, inv_temperature, code_value, eps=eps)
        avg_prob = mod.maybe_distributed_mean(avg_prob)
        return per_sample_entropy, mod.entropy(avg_prob).mean()
    # the peer's reduce('... c d -> c d') keeps every row: avg_prob is the (rows, 2^d) probability
    # matrix, and its mean entropy is the per-sample entropy again
    per_sample_entropy, _ = lfq_entropy(rows.unsqueeze(-2), inv_temperature, code_value, eps=eps)
    return per_sample_entropy, per_sample_entropy.clone()


def fast_forward(mod, lfq, a, code_value: float, eps: float):
    """The peer's ``LFQ.forward`` in training, the entropy block on ``lfq_entropy``."""
    x, inv_temperature, return_loss_breakdown, mask = (a["x"], a["inv_temperature"], a["return_loss_breakdown"],
                                                       a["mask"])
    exists, rearrange = mod.exists, mod.rearrange

    is_img_or_video = x.ndim >= 4
    should_transpose = mod.default(lfq.channel_first, is_img_or_video)
    if should_transpose:
        x = rearrange(x, 'b d ... -> b ... d')
        x, ps = mod.pack_one(x, 'b * d')
    assert x.shape[-1] == lfq.dim, f'expected dimension of {lfq.dim} but received {x.shape[-1]}'
    x = lfq.project_in(x)
    if exists(lfq.soft_clamp_input_value):
        clamp_value = lfq.soft_clamp_input_value
        x = (x / clamp_value).tanh() * clamp_value
    x = rearrange(x, 'b n (c d) -> b n c d', c=lfq.num_codebooks)
    rotation = getattr(lfq, "orthogonal_rotation", False)
    if rotation:
        x = x @ lfq.orthogonal_rot
    x = lfq.maybe_l2norm(x)

    force_f32 = lfq.force_quantization_f32
    quantization_context = mod.partial(mod.autocast, 'cuda', enabled=False) if force_f32 else mod.nullcontext
    with quantization_context():
        if force_f32:
            orig_dtype = x.dtype
            x = x.float()
        original_input = x
        codebook_value = torch.ones_like(x) * lfq.codebook_scale
        quantized = torch.where(x > 0, codebook_value, -codebook_value)
        indices = mod.reduce((quantized > 0).int() * lfq.mask.int(), 'b n c d -> b n c', 'sum')
        quantized = lfq.maybe_l2norm(quantized)
        x = lfq.activation(x)
        x = x + (quantized - x).detach()

        # entropy aux loss: the peer's entropy input and random subset, then pvkernels
        input_for_entropy = original_input
        if exists(mask):
            input_for_entropy = original_input[mask]
        input_for_entropy = rearrange(input_for_entropy, 'b n ... -> (b n) ...')
        if lfq.frac_per_sample_entropy < 1.:
            num_tokens = input_for_entropy.size(0)
            num_sampled_tokens = int(num_tokens * lfq.frac_per_sample_entropy)
            rand_mask = torch.randn(num_tokens).argsort(dim=-1) < num_sampled_tokens
            input_for_entropy = input_for_entropy[rand_mask]
        per_sample_entropy, codebook_entropy = _entropies(mod, lfq, input_for_entropy, float(inv_temperature),
                                                          code_value, eps)
        entropy_aux_loss = per_sample_entropy - lfq.diversity_gamma * codebook_entropy

        if lfq.experimental_softplus_entropy_loss:
            entropy_aux_loss = F.softplus(entropy_aux_loss + lfq.entropy_loss_offset)
        if lfq.commitment_loss_weight > 0.:
            commit_loss = F.mse_loss(original_input, quantized.detach(), reduction='none')
            if exists(mask):
                commit_loss = commit_loss[mask]
            commit_loss = commit_loss.mean()
        else:
            commit_loss = lfq.zero
        if force_f32:
            x = x.type(orig_dtype)

    if rotation:
        x = x @ lfq.orthogonal_rot.t()
    x = rearrange(x, 'b n c d -> b n (c d)')
    x = lfq.project_out(x)
    if should_transpose:
        x = mod.unpack_one(x, ps, 'b * d')
        x = rearrange(x, 'b ... d -> b d ...')
        indices = mod.unpack_one(indices, ps, 'b * c')
    if not lfq.keep_num_codebooks_dim:
        indices = rearrange(indices, '... 1 -> ...')
    aux_loss = entropy_aux_loss * lfq.entropy_loss_weight + commit_loss * lfq.commitment_loss_weight
    ret = mod.Return(x, indices, aux_loss)
    if not return_loss_breakdown:
        return ret
    return ret, mod.LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)


def _make_forward(patch: Patch, mod):
    signature = inspect.signature(mod.LFQ.forward)
    eps = _log_eps(mod)

    def make(original):
        def forward(lfq, *args, **kwargs):
            if not lfq.training:  # no entropy to compute: the peer returns zeros
                return original(lfq, *args, **kwargs)
            bound = signature.bind(lfq, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            why = "the peer's log has no default eps" if eps is None else reason(mod, lfq, a)
            if why is not None:
                patch.fallback(why)
                return original(lfq, *args, **kwargs)
            patch.fast()
            return fast_forward(mod, lfq, a, _code_value(lfq), eps)
        return forward
    return make


def install(patch: Patch, mod, model: Optional[torch.nn.Module]) -> None:
    """Adds the LFQ replacement of ``model`` (None: the class) to ``patch``."""
    patch_modules(patch, model, mod.LFQ, {"forward": _make_forward(patch, mod)})


def present(mod, model: Optional[torch.nn.Module]) -> bool:
    """Whether ``model`` holds an LFQ (None, the class level, always patches it; a model that is
    not a module is left to ``patch_modules`` to refuse)."""
    if model is None:
        return True
    return isinstance(model, torch.nn.Module) and any(isinstance(m, mod.LFQ) for m in model.modules())
