"""Hugging Face diffusers: the self-attention of its factorised video models on pvkernels' attention.

AnimateDiff's motion modules (``AnimateDiffTransformer3D``), ModelScope's ``TransformerTemporalModel``
(UNet3D), SVD's temporal blocks (``TemporalBasicTransformerBlock``) and Latte's spatial and temporal
blocks (``LatteTransformer3DModel``) attend with diffusers' ``Attention`` over (batch * pixels,
frames, channels) or (batch * frames, patches, channels) and ``AttnProcessor2_0``'s SDPA. The patch
sets a processor of ours on those layers (diffusers' own extension point) that computes what
``AttnProcessor2_0`` computes: the same norms, projections, output projection, dropout, residual and
rescale, the (batch, n, heads, head_dim) views of the projections handed in place to
``pvkernels.temporal_attention`` (n <= 32) or ``spatial_attention``, no permute copies, no 65535
batch limit. Other diffusers layers (the UNets' spatial transformers, SVD's spatial blocks) are
not touched.

Not computed here (AttnProcessor2_0 runs, the reason is counted): ``encoder_hidden_states``
(cross-attention), an attention mask, qk norms, kv_heads != heads, a ``scale`` other than
head_dim ** -0.5, float64, a head_dim past the fused kernels' limit (256 on the CPU, 128 on a
GPU: AnimateDiff's 1280-channel levels, 8 heads of 160, run fused on the CPU only), the
deprecated ``scale`` argument. Layers whose projections were fused (``fuse_qkv_projections()``
before the patch: ``FusedAttnProcessor2_0``) are computed from the fused projection's output in
place. Any other processor found on a layer, and any processor set after the patch
(``set_attn_processor``, ``set_default_attn_processor``, IP-adapter, xformers, fusing the projections
after the patch) is left to diffusers and its calls are counted. diffusers re-creates processors from
their class (``type(processor)()``, loading or unloading an IP adapter): ours then gives a processor
of the same patch. A patched model pickles (``torch.save(model)``) as the unpatched one: diffusers'
processors, and a counting hook of no patch.
"""
from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Optional, Union

import torch

from ._attention import attend, slower_than_sdpa, unsupported
from ._patching import _INSTALLED, Patch, attention_problems, check_peer, import_peer, missing, signature_problems

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

DISTRIBUTION = "diffusers"
# 0.32.2 (the first with diffusers.models.controlnets) and 0.42.1 in .ci/run; every minor release between
# passed tests/integrations/test_diffusers.py once (twelfth session: 0.33.1, 0.34.0, 0.35.2, 0.36.0 ... 0.42.0)
TESTED = (("0.32.2", "0.43"),)
# (module, class): the blocks whose attention layers are patched
BLOCKS = (
    ("diffusers.models.unets.unet_motion_model", "AnimateDiffTransformer3D"),
    ("diffusers.models.transformers.transformer_temporal", "TransformerTemporalModel"),
    ("diffusers.models.attention", "TemporalBasicTransformerBlock"),
    ("diffusers.models.transformers.latte_transformer_3d", "LatteTransformer3DModel"),
)
# the modules of the models that hold those blocks: their set_default_attn_processor() accepts only the
# processor classes in their CROSS_ATTENTION_PROCESSORS, to which a patch adds its own while active
MODELS = (
    "diffusers.models.unets.unet_motion_model",
    "diffusers.models.unets.unet_3d_condition",
    "diffusers.models.unets.unet_spatio_temporal_condition",
    "diffusers.models.unets.unet_i2vgen_xl",
    "diffusers.models.controlnets.controlnet_sparsectrl",
)
_FORWARD_PARAMS = ("hidden_states", "encoder_hidden_states", "attention_mask", "cross_attention_kwargs")
_PROCESSOR_PARAMS = ("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb", "args", "kwargs")
_ATTRIBUTES = ("heads", "inner_dim", "inner_kv_dim", "scale", "to_q", "to_k", "to_v", "to_out", "spatial_norm",
               "group_norm", "norm_q", "norm_k", "residual_connection", "rescale_output_factor", "processor")


def _peer():
    mod = import_peer("diffusers.models.attention_processor", DISTRIBUTION)
    blocks = []
    for module, name in BLOCKS:
        owner = import_peer(module, DISTRIBUTION)
        blocks.append((owner, name))
    return mod, blocks, [import_peer(module, DISTRIBUTION) for module in MODELS]


def _check(mod, blocks, models) -> None:
    problems = missing(mod, ("Attention", "AttnProcessor2_0", "FusedAttnProcessor2_0"),
                       "diffusers.models.attention_processor")
    for owner, name in blocks:
        problems += missing(owner, (name,), owner.__name__)
    for owner in models:
        problems += missing(owner, ("CROSS_ATTENTION_PROCESSORS",), owner.__name__)
    if hasattr(mod, "Attention"):
        problems += attention_problems(mod, _FORWARD_PARAMS, dict(query_dim=8, heads=2, dim_head=4),
                                       _ATTRIBUTES + ("set_processor",))
    for name in ("AttnProcessor2_0", "FusedAttnProcessor2_0"):
        if hasattr(mod, name):
            problems += signature_problems(getattr(mod, name).__call__, _PROCESSOR_PARAMS, f"{name}.__call__")
    if hasattr(mod, "AttnProcessor2_0"):
        try:
            default = type(mod.Attention(query_dim=8, heads=2, dim_head=4).processor)
            if default is not mod.AttnProcessor2_0:
                problems.append(f"Attention's default processor is {default.__name__}, not AttnProcessor2_0")
        except Exception:  # noqa: BLE001  reported by attention_problems
            pass
    check_peer(DISTRIBUTION, TESTED, problems)


def _reason(attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs, fused: bool) -> Optional[str]:
    """Why AttnProcessor2_0's call (FusedAttnProcessor2_0's if fused) is not computed on the fused
    kernels (None: it is)."""
    if args or kwargs.get("scale") is not None:
        return "the deprecated scale argument"
    if encoder_hidden_states is not None:
        return "cross-attention (encoder_hidden_states)"
    if attention_mask is not None:
        return "attention mask"
    if attn.norm_q is not None or attn.norm_k is not None:
        return "qk norm"
    if fused and not isinstance(getattr(attn, "to_qkv", None), torch.nn.Module):
        return "FusedAttnProcessor2_0 on a layer without fused projections (no to_qkv)"
    if hidden_states.dim() not in (3, 4):
        return f"hidden_states of {hidden_states.dim()} dims, not (batch, n, channels) or (batch, c, h, w)"
    if hidden_states.device.type not in ("cpu", "cuda"):
        return f"device {hidden_states.device.type}"
    heads, inner = attn.heads, attn.inner_dim
    if attn.inner_kv_dim != inner or inner % heads:
        return f"kv width {attn.inner_kv_dim} / q width {inner} / {heads} heads (not plain multi-head attention)"
    head_dim = inner // heads
    if attn.scale != head_dim ** -0.5:
        return f"scale {attn.scale} != head_dim ** -0.5"
    # autocast casts fp32 to fp16/bf16 (both fused) and leaves fp64 (not fused): x's dtype decides
    n = hidden_states.shape[1] if hidden_states.dim() == 3 else hidden_states.shape[2] * hidden_states.shape[3]
    return (unsupported(hidden_states, heads, head_dim, n, None)
            or slower_than_sdpa(hidden_states, n, head_dim, causal=False))


def _forward(attn, hidden_states: torch.Tensor, temb, fused: bool) -> torch.Tensor:
    """AttnProcessor2_0.__call__ (FusedAttnProcessor2_0's if fused) for self-attention without a
    mask, line for line, with the fused kernels reading (batch, n, heads, head_dim) views of the
    projections in place of "transpose to (batch, heads, n, head_dim), SDPA, transpose back and copy"."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if fused:  # one projection, (batch, n, 3 * inner): q, k, v are views of it
        qkv = attn.to_qkv(hidden_states)
        query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
    else:
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    q, k, v = (t.view(batch_size, -1, heads, head_dim) for t in (query, key, value))
    # SDPA's default scale is head_dim ** -0.5, the kernels' too (AttnProcessor2_0 passes none)
    out = attend(q, k, v, None, causal=False)
    hidden_states = out.view(batch_size, -1, heads * head_dim).to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class PvkernelsAttnProcessor:
    """The processor ``patch_diffusers`` sets on an ``Attention``: what ``original`` (diffusers'
    ``AttnProcessor2_0``, or ``FusedAttnProcessor2_0`` where the projections are fused) computes, on
    pvkernels' kernels where it can, else ``original`` itself (counted).

    Each patch makes its own subclass per processor it stands for (``patch``, ``original`` and
    ``fused`` are class attributes), so ``type(processor)()``, which diffusers calls to re-create a
    layer's processor, gives one of the same patch. The patch sets one instance of each on its
    layers (they hold no per-layer state, as AttnProcessor2_0 holds none); a deep copy of a patched
    model shares it, so the copy is patched by the same Patch. Once the patch is undone it is
    ``original``, uncounted. Pickled (``torch.save(model)``), it is ``original``: a patched model
    saves as the unpatched one.
    """

    patch: "DiffusersPatch"
    original: object
    fused: bool

    def __init__(self):
        if not hasattr(type(self), "patch"):
            raise TypeError("PvkernelsAttnProcessor is made by pvkernels.integrations.patch_diffusers(), "
                            "not directly (use diffusers' AttnProcessor2_0)")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        # the same parameters as AttnProcessor2_0.__call__: Attention.forward filters the
        # cross_attention_kwargs it passes by the processor's signature
        patch = self.patch
        if patch.active:
            why = _reason(attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs, self.fused)
            if why is None:
                patch.fast()
                return _forward(attn, hidden_states, temb, self.fused)
            patch.fallback(why)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return type(self.original), ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'active' if self.patch.active else 'undone'})"


class _ForeignCounter:
    """A forward pre-hook for a patched block's Attention: counts a call that another processor
    (found there, or set after the patch) will compute, unless it is the processor of another active
    ``patch_diffusers``, which counts the call itself (two patches at once: neither counts the
    other's calls as fallbacks, nor raises under ``strict``). A deep copy of the model shares it
    instead of copying the Patch; pickled, it is one of no patch, which counts nothing (the model
    loads unpatched)."""

    def __init__(self, patch: Optional["DiffusersPatch"] = None):
        self.patch = patch

    def __call__(self, attn, args) -> None:
        patch, processor = self.patch, attn.processor
        if patch is None or not patch.active or patch.owns(processor):
            return
        if isinstance(processor, PvkernelsAttnProcessor) and processor.patch.active:
            return  # that patch counts the call
        patch.fallback(f"processor {type(processor).__name__} (not ours: set by the user or a loader, "
                       "left to diffusers)")

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _ForeignCounter, ()


class DiffusersPatch(Patch):
    """A :class:`Patch` that also sets processors: ``install(block)`` puts ours on every
    ``Attention`` of the block whose processor is ``AttnProcessor2_0`` (``processor``) or
    ``FusedAttnProcessor2_0`` (``fused_processor``) and a counting hook on every one; ``unpatch()``
    removes the hooks and gives each layer whose processor is still one of ours the very processor
    object it had (a processor set after the patch is kept), or hands the layer to another active
    patch that found ours there."""

    def __init__(self, strict: bool, attention_cls: type, default_cls: type, fused_cls: type):
        super().__init__("diffusers", strict)
        self.attention_cls = attention_cls
        # diffusers' processor class -> ours, an instance of a subclass made for this patch
        self._ours = {}
        for cls, fused in ((default_cls, False), (fused_cls, True)):
            attrs = dict(patch=self, original=cls(), fused=fused, __module__=__name__,
                         __doc__=f"{cls.__name__} on pvkernels' kernels (PvkernelsAttnProcessor).")
            self._ours[cls] = type(f"Pvkernels{cls.__name__}", (PvkernelsAttnProcessor,), attrs)()
        self.processor, self.fused_processor = self._ours[default_cls], self._ours[fused_cls]
        self._count = _ForeignCounter(self)
        self._layers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Attention -> (previous, hook)

    def owns(self, processor) -> bool:
        """Whether ``processor`` is one of this patch's (set by it, or re-created from its class)."""
        return isinstance(processor, PvkernelsAttnProcessor) and processor.patch is self

    def install(self, block: torch.nn.Module) -> None:
        for attn in block.modules():
            # a deep copy of a patched layer holds our hook already (and our processor, shared)
            if (not isinstance(attn, self.attention_cls) or attn in self._layers
                    or self._count in attn._forward_pre_hooks.values()):
                continue
            previous = attn.processor
            hook = attn.register_forward_pre_hook(self._count)
            kind = type(previous)
            if isinstance(previous, PvkernelsAttnProcessor) and not previous.patch.active:
                kind = type(previous.original)  # ours of an undone patch (a deep copy taken while patched)
            if kind in self._ours:
                attn.set_processor(self._ours[kind])
            self._layers[attn] = (previous, hook)

    @property
    def layers(self) -> int:
        """Attention layers that run our processor now."""
        return sum(self.owns(attn.processor) for attn in self._layers.keys())

    def unpatch(self) -> None:
        for attn, (previous, hook) in list(self._layers.items()):
            hook.remove()
            if self.owns(attn.processor):
                attn.set_processor(self._heir(attn, previous))
        self._layers = weakref.WeakKeyDictionary()
        super().unpatch()

    def _heir(self, attn, previous):
        """What a layer of ours goes back to: ``previous``, or where another active patch found our
        processor on it (two patches at once), that patch's in place of ``previous``, which it then
        records as the layer's own."""
        for other in list(_INSTALLED):
            if isinstance(other, DiffusersPatch) and other is not self and other.active and attn in other._layers:
                found, hook = other._layers[attn]
                if found is attn.processor:
                    other._layers[attn] = (previous, hook)
                    return other._ours.get(type(previous), previous)
        return previous

    @property
    def active(self) -> bool:
        return bool(self._undo) or len(self._layers) > 0


def _components(model) -> list:
    """The modules ``model`` stands for: itself, or a diffusers pipeline's nn.Module components."""
    if isinstance(model, torch.nn.Module):
        return [model]
    pipeline = import_peer("diffusers.pipelines.pipeline_utils", DISTRIBUTION).DiffusionPipeline
    if not isinstance(model, pipeline):
        raise TypeError("pvkernels.integrations: model must be an nn.Module, a diffusers pipeline (DiffusionPipeline) "
                        f"or None, got {type(model).__name__}")
    return [c for c in model.components.values() if isinstance(c, torch.nn.Module)]


def patch_diffusers(model: Optional[Union[torch.nn.Module, "DiffusionPipeline"]] = None, *,
                    strict: bool = False) -> DiffusersPatch:
    """Puts pvkernels' attention into diffusers' factorised video models: the self-attention of
    AnimateDiff's motion modules, ModelScope's UNet3D temporal transformers, SVD's temporal blocks
    and Latte's spatial and temporal blocks, as an attention processor (``Attention.set_processor``).

    Args:
        model: a module (a ``UNetMotionModel``, ``UNet3DConditionModel``,
            ``UNetSpatioTemporalConditionModel``, ``LatteTransformer3DModel``, a pipeline's
            ``unet`` / ``transformer``, or one of the blocks) or a pipeline (``DiffusionPipeline``:
            its module components, e.g. ``AnimateDiffPipeline``'s unet): the blocks inside it now
            are patched, and on each forward give ours to the layers new to them. None patches the
            block classes: every instance, existing or built later, gets our processor on each
            forward for the layers it holds then, until ``unpatch()``.
        strict: raise a ValueError naming the reason instead of falling back.

    Returns:
        A :class:`DiffusersPatch` (a :class:`Patch`; ``.stats``, ``.layers``, ``unpatch()``).

    Example:
        >>> from diffusers import UNetMotionModel
        >>> unet = UNetMotionModel(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        ...                        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        ...                        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"))
        >>> video = torch.randn(1, 4, 16, 32, 32)                  # (batch, channels, frames, h, w)
        >>> text = torch.randn(1, 7, 32).repeat_interleave(16, 0)  # the pipeline repeats it per frame
        >>> with pvkernels.integrations.patch_diffusers(unet) as p:
        ...     out = unet(video, 10, text).sample
        >>> p.stats  # 11 motion modules x 2 self-attentions
        {'fast': 22, 'fallback': {}}
    """
    components = None if model is None else _components(model)
    mod, blocks, models = _peer()
    _check(mod, blocks, models)
    patch = DiffusersPatch(strict, mod.Attention, mod.AttnProcessor2_0, mod.FusedAttnProcessor2_0)
    classes = tuple(getattr(owner, name) for owner, name in blocks)
    if model is None:
        owners = classes
    else:  # each block once, where two components share it
        owners = list(dict.fromkeys(m for c in components for m in c.modules() if isinstance(m, classes)))
    if not owners:
        warnings.warn(f"pvkernels.integrations.patch_diffusers: {type(model).__name__} holds none of "
                      f"{', '.join(c.__name__ for c in classes)}: nothing patched", RuntimeWarning, stacklevel=2)
        return patch
    ours = tuple(type(p) for p in patch._ours.values())
    for owner in models:  # set_default_attn_processor() on a patched model: diffusers' default for all
        patch._set(owner, "CROSS_ATTENTION_PROCESSORS", owner.CROSS_ATTENTION_PROCESSORS + ours)

    def make(original):
        def forward(module, *args, **kwargs):
            # layers new to the block (FreeNoise swaps a motion module's transformer blocks) get ours
            # too, a processor set later stays. While torch.compile traces, a model's patch installs
            # nothing (its layers got ours when it was made; registering hooks would break the graph),
            # a class's patch does (a graph break: its blocks may meet torch.compile first)
            if patch.active and (model is None or not torch.compiler.is_compiling()):
                patch.install(module)
            return original(module, *args, **kwargs)
        return forward
    for owner in owners:
        if model is not None:
            patch.install(owner)
        patch.replace(owner, "forward", make)
        patch.mark(owner)
    return patch


__all__ = ["patch_diffusers", "PvkernelsAttnProcessor", "DiffusersPatch", "TESTED"]
