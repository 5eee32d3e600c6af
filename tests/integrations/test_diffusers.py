"""pvkernels.integrations.patch_diffusers against Hugging Face diffusers itself: tiny random-weight
models of each factorised video family, built from configs (nothing is downloaded)."""
from __future__ import annotations

import copy
import functools
import importlib
import io
import types

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]' installs 0.42.1)")
import diffusers  # noqa: E402
from diffusers.loaders.ip_adapter import IPAdapterMixin  # noqa: E402
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin  # noqa: E402
from diffusers.models import attention_processor as ap  # noqa: E402
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D  # noqa: E402

from pvkernels import _backend, integrations  # noqa: E402
from pvkernels.integrations import PeerVersionError  # noqa: E402
from pvkernels.integrations import diffusers as patching  # noqa: E402

from ..utils import assert_close  # noqa: E402
from .parity import fake_version, instance_and_class, patched_copy, replica  # noqa: E402

FRAMES, SIZE, BATCH = 5, 8, 2
CROSS = "cross-attention (encoder_hidden_states)"


# the four families, tiny; per forward: (self-attention calls on the kernels, cross-attention calls) --

def motion_unet():
    """AnimateDiff: UNetMotionModel, a motion module (two self-attentions over frames) after every
    down, mid and up block; its spatial transformers are not ours."""
    return diffusers.UNetMotionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), num_attention_heads=2,
        motion_num_attention_heads=2, motion_max_seq_length=8, sample_size=SIZE, in_channels=4, out_channels=4)


def unet3d():
    """ModelScope: UNet3DConditionModel, TransformerTemporalModel at the input and in every block."""
    return diffusers.UNet3DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=4, sample_size=SIZE, in_channels=4, out_channels=4)


def svd_unet():
    """Stable Video Diffusion: UNetSpatioTemporalConditionModel (its resnets want 32 groups); a
    temporal block (self-attention over frames, cross-attention to the image embedding) per transformer."""
    return diffusers.UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), num_attention_heads=(2, 4),
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, sample_size=SIZE, in_channels=4,
        out_channels=4, num_frames=FRAMES)


def latte():
    """Latte: spatial blocks (self-attention over 8 x 8 = 64 patches: the spatial kernel, then
    cross-attention to the caption) alternating with temporal blocks."""
    return diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=8, sample_size=16, patch_size=2, norm_type="ada_norm_single", caption_channels=6,
        video_length=FRAMES)


def sparsectrl():
    """SparseCtrl: SparseControlNetModel, AnimateDiff's down blocks (a motion module after each)
    on the control frames. diffusers starts its output convolutions at zero: random here, so that
    the motion modules' outputs and gradients reach the loss from the first step."""
    model = diffusers.SparseControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), attention_head_dim=4,
        motion_num_attention_heads=2, motion_max_seq_length=8, conditioning_embedding_out_channels=(4, 8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.normal_(0, 0.3)
    return model


def i2vgen():
    """I2VGen-XL: I2VGenXLUNet, ModelScope's blocks (TransformerTemporalModel) with image conditioning."""
    return diffusers.I2VGenXLUNet(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        sample_size=SIZE)


def _timesteps():
    return torch.tensor([3, 41])


def motion_step(model, x):
    # the AnimateDiff pipeline repeats the prompt embedding per frame
    text = torch.randn(BATCH, 7, 8).repeat_interleave(FRAMES, dim=0)
    out = model(x, _timesteps(), text).sample
    return out.square().mean(), {"out": out}


def unet3d_step(model, x):
    out = model(x, _timesteps(), torch.randn(BATCH, 7, 8)).sample
    return out.square().mean(), {"out": out}


def svd_step(model, x):
    out = model(x.transpose(1, 2), _timesteps(), torch.randn(BATCH, 1, 8), added_time_ids=torch.randn(BATCH, 3)).sample
    return out.square().mean(), {"out": out}


def sparsectrl_step(model, x):
    text = torch.randn(BATCH, 7, 8).repeat_interleave(FRAMES, dim=0)
    cond, mask = torch.randn_like(x), (torch.rand(BATCH, 1, FRAMES, 1, 1) < 0.5).float().expand(-1, -1, -1, SIZE, SIZE)
    down, mid = model(x, _timesteps(), text, controlnet_cond=cond, conditioning_mask=mask, return_dict=False)
    return sum(d.square().mean() for d in down) + mid.square().mean(), {"mid": mid, "down0": down[0]}


def i2vgen_step(model, x):
    out = model(x, _timesteps(), fps=torch.tensor([8, 12]), image_latents=torch.randn_like(x),
                image_embeddings=torch.randn(BATCH, 8), encoder_hidden_states=torch.randn(BATCH, 7, 8)).sample
    return out.square().mean(), {"out": out}


def latte_step(model, x):
    out = model(x, timestep=_timesteps(), encoder_hidden_states=torch.randn(BATCH, 7, 6)).sample
    return out.square().mean(), {"out": out}


FAMILIES = {
    # 7 motion modules x (attn1, attn2), both self-attention
    "animatediff": (motion_unet, SIZE, motion_step, 14, 0),
    # transformer_in + 4 temporal transformers, x (attn1, attn2)
    "modelscope": (unet3d, SIZE, unet3d_step, 10, 0),
    # 4 spatio-temporal transformers x (temporal attn1; temporal attn2 is cross-attention)
    "svd": (svd_unet, SIZE, svd_step, 4, 4),
    # 2 x (spatial attn1, temporal attn1; spatial attn2 is cross-attention)
    "latte": (latte, 16, latte_step, 4, 2),
    # 2 motion modules x attn1
    "sparsectrl": (sparsectrl, SIZE, sparsectrl_step, 2, 0),
    # as ModelScope
    "i2vgen": (i2vgen, SIZE, i2vgen_step, 10, 0),
}


def videos(size):
    return lambda gen: torch.randn(BATCH, 4, FRAMES, size, size, generator=gen)


def expect(p, calls: int, fast: int, cross: int) -> None:
    """The fast path on every self-attention and no fallback but the cross-attention."""
    assert p.stats == {"fast": calls * fast, "fallback": {CROSS: calls * cross} if cross else {}}, p.stats


# training parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_parity(family):
    """Outputs, the gradient of the input and of every parameter at each of 3 SGD steps and every
    final parameter, patched by instance (a deep copy) and by class (a fresh model), vs unpatched."""
    build, size, step, fast, cross = FAMILIES[family]
    by_instance, by_class = instance_and_class(build, integrations.patch_diffusers, videos(size), step, steps=3)
    for p in (by_instance, by_class):
        expect(p, 3, fast, cross)


@pytest.mark.parametrize("family", ["animatediff", "latte"])
def test_gradient_checkpointing(family):
    """Training parity with diffusers' gradient checkpointing on (``enable_gradient_checkpointing()``:
    the blocks run again in the backward, on the kernels too)."""
    build, size, step, fast, cross = FAMILIES[family]

    def checkpointed():
        model = build()
        model.enable_gradient_checkpointing()
        return model
    by_instance, by_class = instance_and_class(checkpointed, integrations.patch_diffusers, videos(size), step, steps=2)
    for p in (by_instance, by_class):
        assert set(p.stats["fallback"]) == ({CROSS} if cross else set()), p.stats
        # more calls than the 2 steps' forwards where the blocks ran again in the backward (Latte's;
        # UNetMotionModel's motion modules in diffusers 0.42.1, not in 0.32.2)
        assert p.stats["fast"] > 2 * fast if family == "latte" else p.stats["fast"] >= 2 * fast, p.stats


# the processor against AttnProcessor2_0, option by option ----------------------------------

def motion_module(attn=None):
    torch.manual_seed(0)
    block = AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2,
                                     positional_embeddings="sinusoidal", num_positional_embeddings=8)
    if attn is not None:
        block.transformer_blocks[0].attn1 = attn
    return block


@pytest.mark.parametrize("n", [7, 40])  # the temporal (n <= 32) and the spatial kernel
def test_every_option_of_attn_processor_2_0(n):
    """Biases, dropout in training (the same RNG draws), group norm, residual, rescale factor;
    4-D (batch, c, h, w) input with spatial norm and temb, then 3-D input: values and gradients."""
    torch.manual_seed(0)
    attn = ap.Attention(query_dim=32, heads=2, dim_head=4, bias=True, dropout=0.1, norm_num_groups=2,
                        residual_connection=True, rescale_output_factor=1.7, spatial_norm_dim=3)
    block = motion_module(attn)
    twin = copy.deepcopy(block)
    layers = [m.transformer_blocks[0].attn1.train() for m in (block, twin)]
    with integrations.patch_diffusers(twin) as p:
        assert p.layers == 2 and layers[1].processor is p.processor
        for x, kw in ((torch.randn(2, 32, 5, n // 5), {"temb": torch.randn(2, 3, 2, 2)}), (torch.randn(3, n, 32), {})):
            if x.dim() == 3:  # spatial norm takes (b, c, h, w)
                layers[0].spatial_norm = layers[1].spatial_norm = None
            results = []
            for layer in layers:
                x_ = x.clone().requires_grad_(True)
                torch.manual_seed(7)
                out = layer(x_, **kw)
                results.append((out, torch.autograd.grad(out.square().sum(), [x_] + list(layer.parameters()))))
            (expected, ref_grads), (got, grads) = results
            assert_close(got, expected, rtol=1e-4, atol=1e-5, name="out")
            # the key bias's gradient is 0 but for rounding (softmax is shift-invariant): its
            # tolerance is scaled by the largest parameter gradient
            largest = max(float(e.abs().max()) for e in ref_grads[1:])
            for i, (a, e) in enumerate(zip(grads, ref_grads)):
                assert_close(a, e, rtol=1e-4, atol=1e-5 * max(float(e.abs().max()), largest * (i > 0)),
                             name=f"grad {i}")
    assert p.stats == {"fast": 2, "fallback": {}}


def test_calls_it_does_not_compute_fall_back():
    block = motion_module()
    block.transformer_blocks[0].attn2 = ap.Attention(query_dim=320, heads=2, dim_head=272)  # past cpp's 256
    twin, twin64 = copy.deepcopy(block), copy.deepcopy(block).double()
    attn1, attn2 = (block.transformer_blocks[0].attn1, twin.transformer_blocks[0].attn1), (
        block.transformer_blocks[0].attn2, twin.transformer_blocks[0].attn2)
    x = torch.randn(3, 6, 8)
    cases = [(attn1, x, dict(encoder_hidden_states=torch.randn(3, 4, 8)), CROSS),
             (attn1, x, dict(attention_mask=torch.randn(3, 1, 6)), "attention mask"),
             (attn2, torch.randn(2, 5, 320), {}, "dim_head 272 > 256")]
    with integrations.patch_diffusers(twin) as p:
        for (ref, patched), x_, kw, reason in cases:
            assert_close(patched(x_, **kw), ref(x_, **kw), rtol=1e-6, atol=1e-7)
            assert p.stats["fallback"].get(reason) == 1, p.stats
        # Attention.forward drops a scale keyword; the processor called directly warns and ignores it
        with pytest.warns(FutureWarning, match="scale"):
            got = attn1[1].processor(attn1[1], x, scale=0.5)
        assert_close(got, attn1[0](x), rtol=1e-6, atol=1e-7)
        assert p.stats["fallback"].get("the deprecated scale argument") == 1, p.stats
    assert p.stats["fast"] == 0
    # a scale other than head_dim ** -0.5 (AttnProcessor2_0 of 0.42 ignores it; a later one may not)
    unscaled = motion_module(ap.Attention(query_dim=8, heads=2, dim_head=4, scale_qk=False,
                                          processor=ap.AttnProcessor2_0()))
    with integrations.patch_diffusers(unscaled) as p:
        unscaled.transformer_blocks[0].attn1(x)
    assert p.stats == {"fast": 0, "fallback": {"scale 1.0 != head_dim ** -0.5": 1}}, p.stats
    with integrations.patch_diffusers(twin64) as p:
        twin64.transformer_blocks[0].attn1(x.double())
    assert p.stats == {"fast": 0, "fallback": {"dtype torch.float64 (the fused attention takes float32/float16/"
                                                "bfloat16)": 1}}, p.stats
    with integrations.patch_diffusers(block, strict=True), pytest.raises(ValueError, match="cross-attention"):
        block.transformer_blocks[0].attn1(x, encoder_hidden_states=x)


def test_processors_set_by_the_user_are_left_and_counted():
    torch.manual_seed(0)
    model = motion_unet()
    reference = copy.deepcopy(model)
    first = model.down_blocks[0].motion_modules[0].transformer_blocks[0].attn1
    first.set_processor(ap.AttnProcessor())  # the classic processor, set before the patch
    ip = ap.IPAdapterAttnProcessor2_0(hidden_size=8, cross_attention_dim=8, num_tokens=(4,))
    ip_layer = model.down_blocks[0].motion_modules[0].transformer_blocks[0].attn2
    ip_layer.set_processor(ip)  # an IP-adapter processor (a module with weights)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p = integrations.patch_diffusers(model)
    assert type(first.processor) is ap.AttnProcessor and ip_layer.processor is ip and p.layers == 12
    assert model.state_dict().keys() == state.keys()
    ip_layer.set_processor(ap.AttnProcessor2_0())  # the user takes the IP adapter off again: diffusers' own
    x = videos(SIZE)(torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    got = motion_step(model, x)[1]["out"]
    torch.manual_seed(1)
    expected = motion_step(reference, x)[1]["out"]
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    left = {r: n for r, n in p.stats["fallback"].items() if r.startswith("processor")}
    assert p.stats["fast"] == 12 and sorted(left.values()) == [1, 1] and len(p.stats["fallback"]) == 2, p.stats

    # model.set_attn_processor after the patch: the user's processors run, counted; unpatch keeps them
    model.set_attn_processor(ap.AttnProcessor())
    torch.manual_seed(1)
    got = motion_step(model, x)[1]["out"]
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert p.stats["fast"] == 12 and p.layers == 0
    p.unpatch()
    assert all(type(proc) is ap.AttnProcessor for proc in model.attn_processors.values())
    model.set_default_attn_processor()  # diffusers' own methods still work


@pytest.mark.parametrize("first, second", [("class", "class"), ("model", "model"), ("class", "model"),
                                           ("model", "class")])
@pytest.mark.parametrize("undo", ["last first", "first first"])
def test_two_patches_at_once(first, second, undo):
    # e.g. a library patching inside a user's patch: every call runs on the kernels, counted once, by the
    # patch whose processor the layer holds, the other's strict never raises; the patch left after one is
    # undone keeps the layers on the kernels, and either order gives diffusers' processors back
    torch.manual_seed(0)
    model = motion_unet()
    reference = copy.deepcopy(model)
    x = videos(SIZE)(torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    expected = motion_step(reference, x)[1]["out"]
    patches = [integrations.patch_diffusers(None if how == "class" else model, strict=True) for how in (first, second)]
    try:
        check_two_patches(model, x, expected, patches, undo)
    finally:  # no class left patched for the next test
        for p in patches:
            p.unpatch()
    assert all(type(proc) is ap.AttnProcessor2_0 for proc in attn_processors(model).values())
    assert not any(m._forward_pre_hooks for m in model.modules())
    torch.manual_seed(1)
    assert_close(motion_step(model, x)[1]["out"], expected, rtol=1e-4, atol=1e-5)
    assert sum(p.stats["fast"] for p in patches) == 2 * FAMILIES["animatediff"][3]
    assert "pvkernels" not in repr(model) + repr(motion_unet())  # the classes are diffusers' own again


def check_two_patches(model, x, expected, patches, undo):
    torch.manual_seed(1)
    got = motion_step(model, x)[1]["out"]
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    calls = FAMILIES["animatediff"][3]
    assert sum(p.stats["fast"] for p in patches) == calls, [p.stats for p in patches]
    assert all(p.stats["fallback"] == {} for p in patches), [p.stats for p in patches]
    gone, stays = patches[::-1] if undo == "last first" else patches
    gone.unpatch()
    torch.manual_seed(1)
    assert_close(motion_step(model, x)[1]["out"], expected, rtol=1e-4, atol=1e-5)
    assert stays.stats == {"fast": 2 * calls - gone.stats["fast"], "fallback": {}}, stays.stats  # still ours


def ip_adapter_state_dict(model, clip_dim: int = 6) -> dict:
    """A random IP adapter for ``model`` in the layout diffusers' loader reads: the image projection,
    and a key and a value projection for each spatial cross-attention (not the motion modules')."""
    cross = model.config.cross_attention_dim
    gen = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.1
    image_proj = {"proj.weight": rand(4 * cross, clip_dim), "proj.bias": rand(4 * cross),
                  "norm.weight": 1 + rand(cross), "norm.bias": rand(cross)}
    layers, key_id = {}, 1
    for name, attn in model.named_modules():
        if isinstance(attn, ap.Attention) and name.endswith("attn2") and "motion_modules" not in name:
            hidden = attn.to_q.in_features
            layers[f"{key_id}.to_k_ip.weight"], layers[f"{key_id}.to_v_ip.weight"] = rand(hidden, cross), rand(hidden, cross)
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


def test_loading_and_unloading_an_ip_adapter():
    """diffusers' loader re-creates the motion modules' processors from their class (and unloading
    re-creates every processor but the IP adapter's): ours come back as processors of the same patch,
    the motion modules stay on the kernels, the outputs stay diffusers' own."""
    torch.manual_seed(0)
    model = motion_unet()
    reference = copy.deepcopy(model)
    x = videos(SIZE)(torch.Generator().manual_seed(0))
    image = torch.randn(BATCH, 1, 6)
    adapter = ip_adapter_state_dict(model)

    def run(m, **kw):
        torch.manual_seed(1)
        text = torch.randn(BATCH, 7, 8).repeat_interleave(FRAMES, dim=0)
        return m(x, _timesteps(), text, **kw).sample
    p = integrations.patch_diffusers(model)
    for m in (model, reference):
        m._load_ip_adapter_weights([adapter], low_cpu_mem_usage=False)
    kinds = {type(proc) for proc in model.attn_processors.values()}
    assert kinds == {ap.AttnProcessor2_0, ap.IPAdapterAttnProcessor2_0, type(p.processor)} and p.layers == 14
    assert_close(run(model, added_cond_kwargs={"image_embeds": [image]}),
                 run(reference, added_cond_kwargs={"image_embeds": [image]}), rtol=1e-4, atol=1e-5)
    assert p.stats == {"fast": 14, "fallback": {}}, p.stats
    for m in (model, reference):
        IPAdapterMixin.unload_ip_adapter(types.SimpleNamespace(unet=m))  # the pipeline's method, on the unet
    assert p.layers == 14 and ap.IPAdapterAttnProcessor2_0 not in {type(v) for v in model.attn_processors.values()}
    assert_close(run(model), run(reference), rtol=1e-4, atol=1e-5)
    assert p.stats == {"fast": 28, "fallback": {}}, p.stats
    p.unpatch()
    assert all(type(proc) is ap.AttnProcessor2_0 for proc in model.attn_processors.values())
    with pytest.raises(TypeError, match="made by pvkernels.integrations.patch_diffusers"):
        patching.PvkernelsAttnProcessor()


def fused(build):
    """``build()`` with its projections fused (``fuse_qkv_projections``: FusedAttnProcessor2_0)."""
    def fused_build():
        model = build()
        model.fuse_qkv_projections()
        return model
    return fused_build


@pytest.mark.parametrize("family", ["animatediff", "modelscope"])
def test_fused_projections(family):
    """Projections fused before the patch: q, k, v are views of to_qkv's output, trained in parity;
    fused after the patch: diffusers' FusedAttnProcessor2_0 runs, counted, and unfusing gives ours back."""
    build, size, step, fast, cross = FAMILIES[family]
    by_instance, by_class = instance_and_class(fused(build), integrations.patch_diffusers, videos(size), step,
                                               steps=2)
    for p in (by_instance, by_class):
        expect(p, 2, fast, cross)
        assert p.fused_processor.fused and not p.processor.fused
    model = build()
    with integrations.patch_diffusers(model) as p:
        model.fuse_qkv_projections()
        step(model, videos(size)(torch.Generator().manual_seed(0)))
        assert p.stats["fast"] == 0 and list(p.stats["fallback"].values()) == [fast], p.stats
        model.unfuse_qkv_projections()
        step(model, videos(size)(torch.Generator().manual_seed(0)))
        assert p.stats["fast"] == fast


def test_set_default_attn_processor_on_a_patched_model():
    """diffusers' own default for every layer (its check knows our processors while patched); the
    module constants it reads come back as they were."""
    modules = [importlib.import_module(m) for m in patching.MODELS]
    constants = [m.CROSS_ATTENTION_PROCESSORS for m in modules]
    for build in (motion_unet, unet3d, svd_unet, i2vgen, sparsectrl):
        model = build()
        with integrations.patch_diffusers(model) as p:
            assert p.layers > 0
            model.set_default_attn_processor()
            assert p.layers == 0 and all(type(v) is ap.AttnProcessor for v in model.attn_processors.values())
    assert all(m.CROSS_ATTENTION_PROCESSORS is c for m, c in zip(modules, constants))


def test_free_noise_after_a_models_patch():
    """AnimateDiff's FreeNoise (the pipeline's enable_free_noise) swaps every motion module's
    transformer blocks for new ones: a model's patched blocks give their new layers ours on the
    next forward, which attends over the context windows."""
    torch.manual_seed(0)
    model = motion_unet()
    reference = copy.deepcopy(model)
    p = integrations.patch_diffusers(model)
    pipe = types.SimpleNamespace(_free_noise_context_length=4, _free_noise_context_stride=1,
                                 _free_noise_weighting_scheme="pyramid", device=torch.device("cpu"),
                                 dtype=torch.float32)
    for m in (model, reference):
        for block in (*m.down_blocks, m.mid_block, *m.up_blocks):
            if getattr(block, "motion_modules", None) is not None:
                AnimateDiffFreeNoiseMixin._enable_free_noise_in_block(pipe, block)
    assert type(model.down_blocks[0].motion_modules[0].transformer_blocks[0]).__name__ == "FreeNoiseTransformerBlock"
    x = videos(SIZE)(torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    got = motion_step(model, x)[1]["out"]
    torch.manual_seed(1)
    assert_close(got, motion_step(reference, x)[1]["out"], rtol=1e-4, atol=1e-5)
    # 5 frames in windows of 4 (stride 1): two windows per self-attention
    assert p.layers == 14 and p.stats == {"fast": 28, "fallback": {}}, p.stats
    p.unpatch()
    assert not any(m._forward_pre_hooks or "forward" in vars(m) for m in model.modules())


def test_a_crossover_leaves_the_call_to_diffusers(monkeypatch):
    """Where backend="auto" takes the reference because the fused kernel measured slower there
    (pvkernels._backend.CROSSOVERS), diffusers' own SDPA runs the call, counted (the reference
    would add permute copies); PVKERNELS_BACKEND=cpp asks for the kernel anyway."""
    row = ("spatial_attention", "*", "*", (("n", ">", 32), ("head_dim", ">=", 4)))  # Latte's: 2 heads of 4
    monkeypatch.setattr(_backend, "CROSSOVERS", _backend.CROSSOVERS + (row,))
    torch.manual_seed(0)
    model = latte()
    reference = copy.deepcopy(model)
    x = videos(16)(torch.Generator().manual_seed(0))
    slower = "spatial_attention over n = 64, head dim 4, in float32: the cpp kernel measured slower than SDPA there"
    with integrations.patch_diffusers(model) as p:
        torch.manual_seed(3)
        got = latte_step(model, x)[1]["out"]
        monkeypatch.setenv("PVKERNELS_BACKEND", "cpp")
        latte_step(model, x)
    fallback = {reason.split(" (")[0]: count for reason, count in p.stats["fallback"].items()}
    assert p.stats["fast"] == 2 + 4 and fallback == {CROSS.split(" (")[0]: 4, slower: 2}, p.stats
    torch.manual_seed(3)
    assert_close(got, latte_step(reference, x)[1]["out"], rtol=1e-4, atol=1e-5)


def test_a_deep_copy_of_a_patched_model():
    """A deep copy of a patched model (an EMA twin) runs its own weights, on the kernels and in the
    fallback, counted by the same patch once per call; its layers are not the patch's to restore."""
    torch.manual_seed(0)
    model = latte()
    reference = copy.deepcopy(model)
    x = videos(16)(torch.Generator().manual_seed(0))
    with integrations.patch_diffusers(model) as p:
        twin = patched_copy(model, reference)
        torch.manual_seed(3)
        got = latte_step(twin, x)[1]["out"]
        expect(p, 1, 4, 2)
        assert p.layers == 6 and "[pvkernels: diffusers]" in repr(twin)
    torch.manual_seed(3)
    assert_close(got, latte_step(reference, x)[1]["out"], rtol=1e-4, atol=1e-5)


def test_a_data_parallel_replica_of_a_patched_model(monkeypatch):
    """nn.DataParallel's replica of a patched model (torch's replicate) runs its own weights, on
    the kernels and in the fallback, counted by the same patch, as the model itself does after it."""
    torch.manual_seed(0)
    model = latte()
    reference = copy.deepcopy(model)
    x = videos(16)(torch.Generator().manual_seed(0))
    with integrations.patch_diffusers(model) as p:
        twin = replica(model, reference, monkeypatch)
        torch.manual_seed(3)
        got = latte_step(twin, x)[1]["out"]
        expect(p, 1, 4, 2)
        latte_step(model, x)
        expect(p, 2, 4, 2)
    assert all("_replicate_for_data_parallel" not in vars(m) for m in model.modules())
    torch.manual_seed(3)
    assert_close(got, latte_step(reference, x)[1]["out"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [motion_unet, fused(motion_unet)], ids=["separate", "fused"])
def test_a_patched_model_saves_unpatched(build):
    """``torch.save(model)`` of a patched model (pickle, as for whole-model checkpoints) writes the
    unpatched model: diffusers' own processors (a user's stays), no counting; the patched model is
    unchanged by it. A class-level patch pickles its models the same way."""
    torch.manual_seed(0)
    model = build()
    x = videos(SIZE)(torch.Generator().manual_seed(0))
    mine = ap.AttnProcessor()
    model.down_blocks[0].motion_modules[0].transformer_blocks[0].attn1.set_processor(mine)
    kinds = {name: type(q) for name, q in attn_processors(model).items()}

    def reload(m):
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    with integrations.patch_diffusers(model) as p:
        saved = reload(model)
        torch.manual_seed(3)
        expected = motion_step(model, x)[1]["out"]
        stats = copy.deepcopy(p.stats)
        torch.manual_seed(3)
        got = motion_step(saved, x)[1]["out"]
        assert p.stats == stats and p.layers == 13
        assert copy.copy(p.processor) is p.processor
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert {name: type(q) for name, q in attn_processors(saved).items()} == kinds
    with integrations.patch_diffusers() as by_class:
        motion_step(model, x)
        saved = reload(model)
        assert by_class.stats["fast"] == 13 and by_class.layers == 13
    assert {name: type(q) for name, q in attn_processors(saved).items()} == kinds
    motion_step(saved, x)
    assert by_class.stats["fast"] == 13


def test_a_forward_set_on_the_instance_before_the_patch():
    """A forward another library set on the block itself (accelerate's hooks set a partial) still
    runs under the patch, and is the block's forward again after it."""
    block = motion_module()
    calls = []

    def hooked(module, *args, **kwargs):
        calls.append(module)
        return type(module).forward(module, *args, **kwargs)
    block.forward = hook = functools.partial(hooked, block)
    x = torch.randn(6, 8, 3, 2)
    expected = block(x, num_frames=2)
    with integrations.patch_diffusers(block) as p:
        got = block(x, num_frames=2)
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert calls == [block, block] and p.stats == {"fast": 2, "fallback": {}}, p.stats
    assert vars(block)["forward"] is hook


def attn_processors(model):
    return {name: m.processor for name, m in model.named_modules() if isinstance(m, ap.Attention)}


class Pipeline(diffusers.DiffusionPipeline):
    """A pipeline of two video models and a scheduler (AnimateDiff's or Latte's pipelines also need
    transformers' text encoders, which the test environment lacks)."""

    def __init__(self, unet, transformer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler)


def test_a_pipeline():
    """``patch_diffusers(pipe)``: the blocks of every nn.Module component, as one model's patch."""
    torch.manual_seed(0)
    pipe = Pipeline(motion_unet(), latte(), diffusers.DDIMScheduler())
    reference = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.transformer)
    gen = torch.Generator().manual_seed(0)
    x, x_latte = videos(SIZE)(gen), videos(16)(gen)

    def run(unet, transformer):
        torch.manual_seed(1)
        with torch.no_grad():
            return motion_step(unet, x)[1]["out"], latte_step(transformer, x_latte)[1]["out"]
    expected = run(*reference)
    with integrations.patch("diffusers", pipe) as p:
        assert p.modules == 7 + 1 and "[pvkernels: diffusers]" in repr(pipe.unet) + repr(pipe.transformer)
        got = run(pipe.unet, pipe.transformer)
    expect(p, 1, 14 + 4, 2)
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert "pvkernels" not in repr(pipe.unet) + repr(pipe.transformer)
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules())

    with pytest.warns(RuntimeWarning, match="Pipeline holds none of"):
        p = integrations.patch_diffusers(Pipeline(None, None, diffusers.DDIMScheduler()))
    assert p.modules == 0 and not p.active


def test_unpatch_print_and_class_level():
    torch.manual_seed(0)
    model = latte()
    processors = attn_processors(model)
    before = {name: (dict(vars(m)), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    forward = diffusers.LatteTransformer3DModel.forward
    with integrations.patch_diffusers(model) as p:
        # every Attention of the blocks: the cross-attention ones fall back call by call
        assert "[pvkernels: diffusers]" in repr(model) and p.modules == 1 and p.layers == 6
        assert all(proc is p.processor for proc in attn_processors(model).values())
    assert "pvkernels" not in repr(model)
    assert all(attn_processors(model)[k] is v for k, v in processors.items())
    after = {name: (dict(vars(m)), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name, (attrs, hooks) in before.items():
        assert after[name][0].keys() == attrs.keys() and not after[name][1] and not hooks, name
        assert all(after[name][0][k] is v for k, v in attrs.items() if k not in ("_parameters", "_buffers",
                                                                                  "_modules")), name

    # class level, by name: an instance built before the patch is patched on its first forward
    x = videos(16)(torch.Generator().manual_seed(0))
    with integrations.patch("diffusers") as p:
        assert diffusers.LatteTransformer3DModel.forward is not forward
        latte_step(model, x)
        assert p.layers == 6 and "[pvkernels: diffusers]" in repr(model)
        # a layer swapped in later (as FreeNoise swaps blocks) is patched on the next forward
        old = model.temporal_transformer_blocks[0].attn1
        new = model.temporal_transformer_blocks[0].attn1 = ap.Attention(query_dim=8, heads=2, dim_head=4)
        new.load_state_dict(old.state_dict())
        latte_step(model, x)
        assert new.processor is p.processor
        model.temporal_transformer_blocks[0].attn1 = old
    expect(p, 2, 4, 2)
    assert diffusers.LatteTransformer3DModel.forward is forward
    assert all(attn_processors(model)[k] is v for k, v in processors.items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_bf16_autocast():
    """A motion UNet under bf16 autocast (projections in bf16; the kernels multiply in fp32 where
    SDPA rounds to bf16): the output and the input gradient, patched and unpatched, against the
    fp32 run; the patched error is within 2x diffusers' own (DESIGN.md's measurement protocol)."""
    torch.manual_seed(0)
    model = motion_unet()
    twin = copy.deepcopy(model)
    x = videos(SIZE)(torch.Generator().manual_seed(0))

    def run(m, autocast):
        x_ = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(1)
            loss, outputs = motion_step(m, x_)
        loss.backward()
        return outputs["out"].detach().float(), x_.grad
    exact = run(model, False)
    unpatched = run(model, True)
    with integrations.patch_diffusers(twin) as p:
        patched = run(twin, True)
    assert p.stats == {"fast": 14, "fallback": {}}
    for name, e, u, f in zip(("out", "input grad"), exact, unpatched, patched):
        for norm in (lambda t: float(t.abs().max()), lambda t: float(t.square().mean().sqrt())):
            ours, theirs = norm(f - e), norm(u - e)
            assert 0 < ours <= 2 * theirs, f"{name}: bf16 error {ours:.3g}, diffusers' own {theirs:.3g}"


def test_more_than_65535_sequences_through_a_motion_module():
    """257 x 256 latent pixels: 65792 sequences of 3 frames (the batch at which SDPA's CUDA
    kernels fail), a few channels so that it runs in seconds on the CPU."""
    block = motion_module()
    twin = copy.deepcopy(block)
    x = torch.randn(3, 8, 257, 256)  # (batch * frames, channels, h, w)
    grad = torch.randn_like(x)

    def run(m):
        x_ = x.clone().requires_grad_(True)
        out = m(x_, num_frames=3)
        out.backward(grad)
        return out, x_.grad
    expected, g_expected = run(block)
    with integrations.patch_diffusers(twin) as p:
        got, g_got = run(twin)
    assert p.stats == {"fast": 2, "fallback": {}}
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert_close(g_got, g_expected, rtol=1e-4, atol=1e-5 * float(g_expected.abs().max()))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])  # triton: a GPU or the interpreter
def test_motion_module_on_every_backend(backend, fused, monkeypatch):
    """Values and the input's gradient; fused: q, k, v strided views of to_qkv's output."""
    monkeypatch.setenv("PVKERNELS_BACKEND", backend)
    block = motion_module()
    if fused:
        for attn in block.modules():
            if isinstance(attn, ap.Attention):
                attn.fuse_projections()
                attn.set_processor(ap.FusedAttnProcessor2_0())
    twin = copy.deepcopy(block)
    x = torch.randn(2 * 3, 8, 3, 2, requires_grad=True)
    expected = block(x, num_frames=2)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    with integrations.patch_diffusers(twin) as p:
        got = twin(x, num_frames=2)
        (g_got,) = torch.autograd.grad(got.square().sum(), x)
    assert p.stats == {"fast": 2, "fallback": {}}
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert_close(g_got, g_expected, rtol=1e-4, atol=1e-5 * float(g_expected.abs().max()))


def test_torch_compile_fullgraph():
    """The processor traces without a graph break; the stats count every compiled call."""
    block = motion_module()
    twin = copy.deepcopy(block)
    x = torch.randn(6, 8, 3, 2, requires_grad=True)
    expected = block(x, num_frames=2)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    with integrations.patch_diffusers(twin) as p:
        compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
        for _ in range(2):
            got = compiled(x, num_frames=2)
            (g_got,) = torch.autograd.grad(got.square().sum(), x)
    assert p.stats == {"fast": 4, "fallback": {}}
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert_close(g_got, g_expected, rtol=1e-4, atol=1e-5 * float(g_expected.abs().max()))


def test_version_structure_and_models_without_blocks(monkeypatch):
    with pytest.warns(RuntimeWarning, match="nothing patched"):
        p = integrations.patch_diffusers(torch.nn.Linear(2, 2))
    assert p.modules == 0 and p.layers == 0 and not p.active  # nothing of diffusers' touched
    with pytest.raises(TypeError, match="model must be an nn.Module, a diffusers pipeline"):
        integrations.patch_diffusers("unet")
    fake_version(monkeypatch, "diffusers", "0.31.0")
    with pytest.raises(PeerVersionError, match="diffusers 0.31.0 is outside the tested versions"):
        integrations.patch_diffusers()
    monkeypatch.undo()

    call = ap.AttnProcessor2_0.__call__

    def with_new_parameter(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                           rotary_emb=None, *args, **kwargs):
        return call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
    monkeypatch.setattr(ap.AttnProcessor2_0, "__call__", with_new_parameter)
    with pytest.raises(PeerVersionError, match="new parameter 'rotary_emb'"):
        integrations.patch_diffusers()
    monkeypatch.undo()

    monkeypatch.delattr(importlib.import_module("diffusers.models.attention"), "TemporalBasicTransformerBlock")
    with pytest.raises(PeerVersionError, match="TemporalBasicTransformerBlock is gone"):
        integrations.patch_diffusers()
