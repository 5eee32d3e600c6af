"""pseudo_video: every backend against the fp64 oracle, edge shapes, noise, bad input."""
import math

import pytest
import torch

import pvkernels
from pvkernels import schedules
from pvkernels._backend import triton
from pvkernels.ops.pseudo_video import pseudo_video_reference
from pvkernels.ops.rng import philox_normal_reference

from .utils import assert_close, dev

BACKENDS = ["reference", "cpp", "triton"]


def params(kind, T, order="high"):
    if kind == "blur":
        return schedules.linear_blur(T, 3.0, order)
    if kind == "noise":
        return schedules.ddpm_noise(T, "cosine", order)
    if kind == "both":
        return schedules.combine(schedules.linear_blur(T, 2.0, order), schedules.ddpm_noise(T, "linear", order))
    # scale only, with uneven per-frame values
    return {"signal_scale": [0.5 + 0.1 * t for t in range(T - 1)] + [1.0], "order": order}


def oracle(x, p, seed=None, noise=None, truncate=3.0):
    """The reference in fp64 with the same (validated) arguments."""
    T = len(next(v for k, v in p.items() if k != "order"))
    get = lambda k, d: p.get(k) or [d] * T  # noqa: E731
    return pseudo_video_reference(x.double().cpu(), get("blur_sigma", 0.0), get("noise_std", 0.0),
                                  get("signal_scale", 1.0), p["order"] == "first", seed,
                                  None if noise is None else noise.cpu(), truncate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["high", "first"])
@pytest.mark.parametrize("kind", ["blur", "noise", "both", "scale"])
def test_explicit_noise_matches_oracle(backend, order, kind):
    B, C, H, W, T = 3, 5, 17, 29, 7
    x = torch.randn(B, C, H, W, device=dev(backend))
    noise = torch.randn(B, T, C, H, W, device=dev(backend))
    p = params(kind, T, order)
    x_before, noise_before = x.clone(), noise.clone()
    out = pvkernels.pseudo_video(x, **p, noise=noise, backend=backend)
    assert torch.equal(x, x_before) and torch.equal(noise, noise_before), "inputs were modified"
    assert out.shape == (B, T, C, H, W) and out.dtype == x.dtype and out.is_contiguous()
    assert_close(out, oracle(x, p, noise=noise), torch.float32, name=f"{backend}/{order}/{kind}")
    assert torch.equal(out[:, -1], x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["high", "first"])
@pytest.mark.parametrize("T", [1, 2, 7, 18])
def test_seeded_matches_oracle(backend, order, T):
    x = torch.rand(2, 3, 9, 13, device=dev(backend))
    p = schedules.combine(schedules.linear_blur(T, 1.5, order), schedules.ddpm_noise(T, "linear", order))
    out = pvkernels.pseudo_video(x, **p, seed=1234, backend=backend)
    assert out.shape == (2, T, 3, 9, 13)
    assert_close(out, oracle(x, p, seed=1234), torch.float32, name=f"{backend}/{order}/T={T}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_seed(backend):
    # seeds use both key words
    x = torch.rand(1, 2, 6, 7, device=dev(backend))
    p = schedules.ddpm_noise(3)
    seed = 2**63 - 5
    assert_close(pvkernels.pseudo_video(x, **p, seed=seed, backend=backend), oracle(x, p, seed=seed),
                 torch.float32, name=backend)


if triton is not None:
    import triton.language as tl

    from pvkernels.ops.rng import philox_normal

    @triton.jit
    def _philox_stream_kernel(out_ptr, seed, first, count, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, philox_normal(seed, first + offs.to(tl.int64)), mask=offs < count)


def philox_stream(backend, seed, first, count):
    """Normals [first, first + count) of a backend's stream, as its pseudo_video draws them."""
    if backend == "cpp":
        return torch.ops.pvkernels_cpp.philox_normal(seed, first, count)
    out = torch.empty(count, device=dev(backend))
    _philox_stream_kernel[(triton.cdiv(count, 64),)](out, seed, first, count, BLOCK=64)
    return out


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("counter", [2**32, 2**34])
@pytest.mark.parametrize("seed", [7, 2**63 - 5])
def test_philox_stream_past_the_counter_low_word(backend, counter, seed):
    # a pseudo video reaches counter 2**32 (the counter's high word) past 2**34 elements: check
    # the streams directly, across the low word's wrap and from an index that is not a multiple of 4
    first = 4 * (counter - 37) + 3
    index = torch.arange(first, first + 300)
    expected = philox_normal_reference(seed, index)
    assert not torch.allclose(expected, philox_normal_reference(seed, index % 2**34))  # the high word counts
    assert_close(philox_stream(backend, seed, first, 300), expected, torch.float32, name=f"{backend} at {counter}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ["high", "first"])
def test_16bit_is_the_fp32_result_rounded_once(backend, dtype, order):
    # 16-bit images are read exactly, every frame is computed in fp32 (the first-order chain
    # carried in fp32) and rounded once: bit for bit the fp32 result of the same images, rounded
    x = torch.randn(3, 2, 17, 29, device=dev(backend)).to(dtype)
    p = schedules.combine(schedules.linear_blur(5, 2.0, order), schedules.ddpm_noise(5, "cosine", order))
    out = pvkernels.pseudo_video(x, **p, seed=3, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out[:, -1], x)  # bit for bit
    out32 = pvkernels.pseudo_video(x.float(), **p, seed=3, backend=backend)
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        # the interpreter's fp32 -> bf16 cast truncates (any rounding mode; numpy has no bf16);
        # on a GPU it rounds to nearest even
        out32 = (out32.view(torch.int32) & -65536).view(torch.float32)
    assert_close(out, out32.to(dtype), rtol=0, atol=0, name=f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(3, 40), (40, 2), (1, 9), (2, 2)])
def test_radius_clamped_on_small_images(backend, hw):
    H, W = hw
    x = torch.randn(2, 3, H, W, device=dev(backend))
    p = schedules.linear_blur(4, 5.0)  # radius 15 > min(H, W) - 1
    assert_close(pvkernels.pseudo_video(x, **p, backend=backend), oracle(x, p), torch.float32, name=str(hw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero(backend):
    x = torch.randn(0, 3, 8, 8, device=dev(backend))
    out = pvkernels.pseudo_video(x, **schedules.linear_blur(4, 1.0), backend=backend)
    assert out.shape == (0, 4, 3, 8, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_non_contiguous_input(backend, layout):
    base = torch.randn(3, 5, 17, 29, device=dev(backend))
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 10, 17, 58, device=dev(backend))[:, ::2, :, ::2]
    else:
        x = base.transpose(2, 3)
    assert not x.is_contiguous()
    T = 5
    noise = torch.randn(3, T, x.shape[1], x.shape[2], x.shape[3], device=dev(backend)).transpose(0, 1)
    noise = noise.contiguous().transpose(0, 1)  # non-contiguous noise too
    p = schedules.combine(schedules.linear_blur(T, 2.0), schedules.ddpm_noise(T))
    out = pvkernels.pseudo_video(x, **p, noise=noise, backend=backend)
    assert_close(out, oracle(x.contiguous(), p, noise=noise.contiguous()), torch.float32, name=layout)
    assert torch.equal(out[:, -1], x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducible_and_seed_sensitive(backend):
    x = torch.rand(2, 3, 8, 8, device=dev(backend))
    p = schedules.ddpm_noise(4)
    a = pvkernels.pseudo_video(x, **p, seed=11, backend=backend)
    assert torch.equal(a, pvkernels.pseudo_video(x, **p, seed=11, backend=backend))
    assert not torch.equal(a, pvkernels.pseudo_video(x, **p, seed=12, backend=backend))
    torch.manual_seed(5)
    b = pvkernels.pseudo_video(x, **p, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(b, pvkernels.pseudo_video(x, **p, backend=backend))  # seed=None follows torch


@pytest.mark.parametrize("order", ["high", "first"])
def test_cpp_independent_of_thread_count(order):
    # large enough (and with enough planes) for the kernel to split the work between threads
    x = torch.rand(8, 8, 64, 64)
    p = schedules.combine(schedules.linear_blur(6, 2.0, order), schedules.ddpm_noise(6, order=order))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(pvkernels.pseudo_video(x, **p, seed=9, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_noise_statistics_high(backend):
    x = torch.rand(64, 3, 32, 32)
    std = [0.5, 1.0, 2.0, 0.0]
    out = pvkernels.pseudo_video(x, noise_std=std, seed=21, backend=backend)
    eps = [(out[:, t] - x) / std[t] for t in range(3)]
    for e in eps:
        assert abs(e.mean().item()) < 0.01 and abs(e.std().item() - 1.0) < 0.01
        assert abs((e ** 4).mean().item() - 3.0) < 0.05  # Gaussian kurtosis
    for a in range(3):  # independent frames
        for b in range(a + 1, 3):
            assert abs(torch.corrcoef(torch.stack([eps[a].flatten(), eps[b].flatten()]))[0, 1].item()) < 0.01


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_noise_statistics_first_order_chain(backend):
    T = 5
    p = schedules.ddpm_noise(T, "linear", "first")
    x = torch.rand(64, 3, 32, 32)
    out = pvkernels.pseudo_video(x, **p, seed=4, backend=backend)
    high = schedules.ddpm_noise(T, "linear", "high")
    resid = [out[:, t] - high["signal_scale"][t] * x for t in range(T)]
    for t in range(T - 1):  # marginals match the high-order frames
        assert abs(resid[t].std().item() - high["noise_std"][t]) < 0.01 * max(high["noise_std"][t], 0.1)
    for t in range(T - 2):  # the chain's correlation: corr(v_t, v_{t+1}) = a_t * sd_{t+1} / sd_t
        expected = p["signal_scale"][t] * high["noise_std"][t + 1] / high["noise_std"][t]
        got = torch.corrcoef(torch.stack([resid[t].flatten(), resid[t + 1].flatten()]))[0, 1].item()
        assert abs(got - expected) < 0.01


def test_module_equals_functional():
    p = schedules.combine(schedules.linear_blur(6, 2.0), schedules.ddpm_noise(6))
    module = pvkernels.nn.PseudoVideo(**p)
    x = torch.rand(2, 3, 12, 12)
    assert torch.equal(module(x, seed=3), pvkernels.pseudo_video(x, **p, seed=3))
    assert module.frames == 6 and "frames=6" in repr(module)
    with pytest.raises(ValueError, match="identity"):
        pvkernels.nn.PseudoVideo(blur_sigma=[1.0, 1.0])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_torch_compile_fullgraph(backend):
    p = schedules.combine(schedules.linear_blur(4, 1.0), schedules.ddpm_noise(4))

    def f(x):
        return pvkernels.pseudo_video(x, **p, seed=5, backend=backend) * 2.0

    x = torch.rand(2, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager" if backend == "reference" else "inductor")
    assert_close(compiled(x), f(x), torch.float32)


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("PVKERNELS_BACKEND", "reference")
    from pvkernels._backend import resolve_backend
    assert resolve_backend("op", "auto", torch.device("cpu"), torch.float32) == "reference"
    assert resolve_backend("op", "cpp", torch.device("cpu"), torch.float32) == "cpp"  # explicit wins
    monkeypatch.setenv("PVKERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="PVKERNELS_BACKEND"):
        resolve_backend("op", "auto", torch.device("cpu"), torch.float32)


def test_auto_picks_cpp_on_cpu_and_reference_for_float64():
    from pvkernels._backend import resolve_backend
    assert resolve_backend("op", "auto", torch.device("cpu"), torch.float32) == "cpp"
    assert resolve_backend("op", "auto", torch.device("cpu"), torch.float64) == "reference"


def test_dispatch_limits_and_crossovers(monkeypatch):
    # the one dispatch of every op: a hard limit sends "auto" (and PVKERNELS_BACKEND=cpp) to the
    # reference and makes an explicit request raise; a crossover vetoes only "auto"
    from pvkernels._backend import resolve_backend
    cpu, f32 = torch.device("cpu"), torch.float32
    assert resolve_backend("op", "auto", cpu, f32, unsupported="Dh = 160 > 128") == "reference"
    with pytest.raises(ValueError, match="op: Dh = 160 > 128 is not supported by the cpp kernels"):
        resolve_backend("op", "cpp", cpu, f32, unsupported="Dh = 160 > 128")
    assert resolve_backend("op", "reference", cpu, f32, unsupported="Dh = 160 > 128") == "reference"
    asked = []
    slower = lambda backend: asked.append(backend) or True  # noqa: E731
    assert resolve_backend("op", "auto", cpu, f32, slower=slower) == "reference" and asked == ["cpp"]
    assert resolve_backend("op", "auto", cpu, f32, slower=lambda backend: False) == "cpp"
    assert resolve_backend("op", "cpp", cpu, f32, slower=slower) == "cpp" and asked == ["cpp"]
    # a limit per backend: a function of the backend asked or auto's fused one
    per_backend = lambda backend: "Dh = 160 > 128" if backend == "triton" else None  # noqa: E731
    assert resolve_backend("op", "auto", cpu, f32, unsupported=per_backend) == "cpp"
    assert resolve_backend("op", "cpp", cpu, f32, unsupported=per_backend) == "cpp"
    monkeypatch.setattr(pvkernels._backend, "triton_interpret", lambda: True)
    if pvkernels._backend.triton is not None:
        with pytest.raises(ValueError, match="op: Dh = 160 > 128 is not supported by the triton kernels"):
            resolve_backend("op", "triton", cpu, f32, unsupported=per_backend)
    monkeypatch.setenv("PVKERNELS_BACKEND", "cpp")
    assert resolve_backend("op", "auto", cpu, f32, unsupported="Dh = 160 > 128") == "reference"
    assert resolve_backend("op", "auto", cpu, f32, slower=slower) == "cpp"


@pytest.mark.parametrize("env", ["cpp", "triton"])
def test_env_backend_is_a_preference_that_falls_back_like_auto(monkeypatch, env):
    # PVKERNELS_BACKEND names the backend auto prefers: it runs wherever it can take the input
    # (crossovers aside), and elsewhere the choice is auto's, for every reason it cannot; an
    # explicit argument with the same input raises
    from pvkernels._backend import resolve_backend
    cpu, f32, f64 = torch.device("cpu"), torch.float32, torch.float64
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PVKERNELS_BACKEND", env)
    auto_choice = "cpp" if pvkernels.cpp_available() else "reference"
    assert resolve_backend("op", "auto", cpu, f64) == "reference"
    assert resolve_backend("op", "auto", cpu, f32, unsupported="Dh = 160 > 128") == "reference"
    assert resolve_backend("op", "auto", cpu, f32) == (auto_choice if env == "triton" else "cpp")
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("op", env, cpu, f64)
    with pytest.raises(ValueError, match="Dh = 160 > 128 is not supported" if env == "cpp" else "needs CUDA"):
        resolve_backend("op", env, cpu, f32, unsupported="Dh = 160 > 128")


def test_one_triton_import():
    from pvkernels import _backend
    from pvkernels.ops import attention, pseudo_video, rng, vq
    assert all(m.triton is _backend.triton for m in (attention, pseudo_video, rng, vq))
    assert pvkernels.triton_available() == (_backend.triton is not None)


GOOD = schedules.linear_blur(3, 1.0)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: pvkernels.pseudo_video(x[0], **GOOD), ValueError, "x must be 4-D"),
    (lambda x: pvkernels.pseudo_video(x.to(torch.int32), **GOOD), TypeError, "x must be float32, float16, bfloat16 or float64"),
    (lambda x: pvkernels.pseudo_video(x.tolist(), **GOOD), TypeError, "x must be a torch.Tensor"),
    (lambda x: pvkernels.pseudo_video(x), ValueError, "at least one of"),
    (lambda x: pvkernels.pseudo_video(x, blur_sigma=[]), ValueError, "T >= 1"),
    (lambda x: pvkernels.pseudo_video(x, blur_sigma=[1.0, 0.0], noise_std=[0.1, 0.0, 0.0]), ValueError,
     "noise_std has length 3"),
    (lambda x: pvkernels.pseudo_video(x, blur_sigma=[1.0, 0.5]), ValueError, "identity"),
    (lambda x: pvkernels.pseudo_video(x, signal_scale=[1.0, 0.5]), ValueError, "identity"),
    (lambda x: pvkernels.pseudo_video(x, blur_sigma=[-1.0, 0.0]), ValueError, "blur_sigma must be >= 0"),
    (lambda x: pvkernels.pseudo_video(x, noise_std=[-0.1, 0.0]), ValueError, "noise_std must be >= 0"),
    (lambda x: pvkernels.pseudo_video(x, blur_sigma=[math.nan, 0.0]), ValueError, "finite"),
    (lambda x: pvkernels.pseudo_video(x, blur_sigma=torch.zeros(2, 2)), ValueError, "1-D"),
    (lambda x: pvkernels.pseudo_video(x, blur_sigma="ab"), TypeError, "sequence of numbers"),
    (lambda x: pvkernels.pseudo_video(x, **GOOD, noise=torch.randn(2, 2, 3, 8, 8)), ValueError, "noise must have shape"),
    (lambda x: pvkernels.pseudo_video(x, noise_std=[1.0, 0.0], noise=torch.zeros(2, 2, 3, 8, 8, dtype=torch.int64)),
     TypeError, "noise must be floating"),
    (lambda x: pvkernels.pseudo_video(x, blur_sigma=[1.0, 0.0], order="second"), ValueError, "order"),
    (lambda x: pvkernels.pseudo_video(x, **GOOD, backend="gpu"), ValueError, "backend must be one of"),
    (lambda x: pvkernels.pseudo_video(x, **GOOD, seed=-1), ValueError, "seed must be an int .* got -1$"),
    (lambda x: pvkernels.pseudo_video(x, **GOOD, seed=1.5), ValueError, "seed must be an int .* got 1.5$"),
    (lambda x: pvkernels.pseudo_video(x, **GOOD, seed=True), ValueError, "got True$"),
    (lambda x: pvkernels.pseudo_video(x, **GOOD, truncate=0.0), ValueError, "truncate"),
    (lambda x: pvkernels.pseudo_video(x.double(), **GOOD, backend="cpp"), TypeError, "float64"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.rand(2, 3, 8, 8))


def test_cpp_op_checks_its_own_arguments():
    # the registered op is callable directly (e.g. from TorchScript); it validates too
    with pytest.raises(ValueError, match="identity"):
        torch.ops.pvkernels_cpp.pseudo_video(torch.rand(1, 1, 4, 4), [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], False, 0,
                                             None, 3.0)
