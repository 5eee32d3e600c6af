"""Pseudo-video construction: batched multi-frame Gaussian blur / noise / scale chains.

Fuses, per image plane, the separable reflect-padded Gaussian blur, the signal scale and the
seeded Gaussian noise of every frame into one pass that writes (B, T, C, H, W) directly
(replacing a Python loop of pad + conv2d + randn per frame). Orders "high" (every frame from
the clean image) and "first" (a Markov chain walked back from the clean frame). Math in fp32.
Limits: the blur radius is clamped to min(H, W) - 1; no gradient (it is a data transform);
the Triton path runs the two blur passes as two launches through an fp32 scratch (T-1 frames
for order "high", one frame per step for "first"); the C++ path needs only per-thread planes.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._backend import check_float, cpp_available, cpp_slower, resolve_backend, triton
from .rng import philox_normal_reference

Params = Union[Sequence[float], torch.Tensor, None]
_SEED_LIMIT = 2**63


# 1. reference -------------------------------------------------------------------------------

def _radius(sigma: float, truncate: float, height: int, width: int) -> int:
    if sigma <= 0.0:
        return 0
    return int(min(math.ceil(truncate * sigma), min(height, width) - 1))


def _gaussian_taps(sigma: float, radius: int) -> list:
    """Half kernel g[0..radius] of the normalised Gaussian (float64 math); g[i] weighs +-i.

    Plain Python so that torch.compile sees constants (same formula as csrc/pseudo_video.cpp).
    """
    g = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(radius + 1)] if radius > 0 else [1.0]
    total = 2.0 * math.fsum(g) - g[0]
    return [v / total for v in g]


def _blur_reference(planes: torch.Tensor, sigma: float, truncate: float) -> torch.Tensor:
    """G(sigma) on (N, 1, H, W) planes: vertical then horizontal pass, reflect boundary."""
    H, W = planes.shape[-2:]
    r = _radius(sigma, truncate, H, W)
    if r == 0:
        return planes
    half = _gaussian_taps(sigma, r)
    g = torch.tensor(half[:0:-1] + half, dtype=planes.dtype, device=planes.device)
    planes = F.conv2d(F.pad(planes, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))
    return F.conv2d(F.pad(planes, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))


def pseudo_video_reference(x: torch.Tensor, blur_sigma: Sequence[float], noise_std: Sequence[float],
                           signal_scale: Sequence[float], first_order: bool, seed: int,
                           noise: Optional[torch.Tensor], truncate: float) -> torch.Tensor:
    """Plain PyTorch oracle (validated arguments). Math in float32, float64 for float64 x.

    Memory traffic: reads B*C*H*W, writes T times that (plus per-frame temporaries).
    """
    B, C, H, W = x.shape
    T = len(blur_sigma)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty((B, T, C, H, W), dtype=x.dtype, device=x.device)
    out[:, T - 1] = x  # bit for bit
    clean = x.to(compute).reshape(B * C, 1, H, W)
    state = clean
    for t in range(T - 2, -1, -1):
        v = _blur_reference(state if first_order else clean, blur_sigma[t], truncate) * signal_scale[t]
        if noise_std[t] != 0.0:
            if noise is not None:
                eps = noise[:, t].to(compute).reshape(B * C, 1, H, W)
            else:
                index = (torch.arange(B, device=x.device).view(B, 1) * (T * C * H * W) + t * C * H * W
                         + torch.arange(C * H * W, device=x.device).view(1, -1))
                eps = philox_normal_reference(seed, index).to(compute).view(B * C, 1, H, W)
            v = v + noise_std[t] * eps
        out[:, t] = v.view(B, C, H, W)
        state = v
    return out


# 2. triton kernels --------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    from .rng import philox_normal

    @triton.jit
    def _reflect(i, n):
        # mirror without repeating the edge; valid because radius <= n - 1
        i = tl.where(i < 0, -i, i)
        return tl.where(i >= n, 2 * (n - 1) - i, i)

    @triton.jit
    def _pseudo_video_vblur_kernel(
        src_ptr, tmp_ptr, radius_ptr, taps_ptr,
        src_stride_b, src_stride_c, src_stride_h, src_stride_w,
        first_frame, n_channels, n_rows, n_cols, n_planes, taps_stride,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        """Vertical pass of frame `first_frame + item // n_planes`, plane `item % n_planes`, into fp32 scratch."""
        item = tl.program_id(0)
        frame = first_frame + item // n_planes
        plane = item % n_planes
        b = plane // n_channels
        c = plane % n_channels
        rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        # int64 offsets: B * C * H * W can pass 2**31
        base = src_ptr + b.to(tl.int64) * src_stride_b + c.to(tl.int64) * src_stride_c
        col_off = cols.to(tl.int64) * src_stride_w
        radius = tl.load(radius_ptr + frame)
        taps = taps_ptr + frame * taps_stride
        acc = tl.load(taps) * tl.load(base + rows.to(tl.int64) * src_stride_h + col_off, mask=mask).to(tl.float32)
        for i in range(1, radius + 1):
            above = _reflect(rows - i, n_rows).to(tl.int64) * src_stride_h
            below = _reflect(rows + i, n_rows).to(tl.int64) * src_stride_h
            pair = (tl.load(base + above + col_off, mask=mask).to(tl.float32)
                    + tl.load(base + below + col_off, mask=mask).to(tl.float32))
            acc += tl.load(taps + i) * pair
        out = tmp_ptr + item.to(tl.int64) * n_rows * n_cols + rows * n_cols + cols
        tl.store(out, acc, mask=mask)

    @triton.jit
    def _pseudo_video_hblur_kernel(
        tmp_ptr, out_ptr, state_ptr, noise_ptr, radius_ptr, taps_ptr, scale_ptr, std_ptr,
        noise_stride_b, noise_stride_t, noise_stride_c, noise_stride_h, noise_stride_w,
        seed, first_frame, n_frames, n_channels, n_rows, n_cols, n_planes, taps_stride,
        HAS_NOISE: tl.constexpr, WRITE_STATE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        """Horizontal pass + scale + noise of one frame tile; writes the output frame."""
        item = tl.program_id(0)
        frame = first_frame + item // n_planes
        plane = item % n_planes
        b = plane // n_channels
        c = plane % n_channels
        rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        src = tmp_ptr + item.to(tl.int64) * n_rows * n_cols + rows * n_cols
        radius = tl.load(radius_ptr + frame)
        taps = taps_ptr + frame * taps_stride
        acc = tl.load(taps) * tl.load(src + cols, mask=mask)
        for i in range(1, radius + 1):
            pair = (tl.load(src + _reflect(cols - i, n_cols), mask=mask)
                    + tl.load(src + _reflect(cols + i, n_cols), mask=mask))
            acc += tl.load(taps + i) * pair
        acc = acc * tl.load(scale_ptr + frame)
        std = tl.load(std_ptr + frame)
        plane_size = n_rows * n_cols
        index = ((b.to(tl.int64) * n_frames + frame) * n_channels + c) * plane_size + rows * n_cols + cols
        if std != 0.0:
            if HAS_NOISE:
                eps = tl.load(noise_ptr + b.to(tl.int64) * noise_stride_b + frame.to(tl.int64) * noise_stride_t
                              + c.to(tl.int64) * noise_stride_c + rows.to(tl.int64) * noise_stride_h
                              + cols.to(tl.int64) * noise_stride_w, mask=mask).to(tl.float32)
            else:
                eps = philox_normal(seed, index)
            acc += std * eps
        tl.store(out_ptr + index, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_STATE:
            tl.store(state_ptr + plane.to(tl.int64) * plane_size + rows * n_cols + cols, acc, mask=mask)


# 3. launchers -------------------------------------------------------------------------------

def _frame_tables(blur_sigma, noise_std, signal_scale, truncate, H, W, device):
    """Per-frame radius, padded half-kernel taps, scale and std as device tensors (one copy each)."""
    frames = range(len(blur_sigma) - 1)
    radii = [_radius(blur_sigma[t], truncate, H, W) for t in frames]
    width = max(radii) + 1
    taps = [_gaussian_taps(blur_sigma[t], radii[t]) for t in frames]
    taps = [g + [0.0] * (width - len(g)) for g in taps]
    as_dev = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    return (as_dev(radii, torch.int32), as_dev(taps, torch.float32), width,
            as_dev(list(signal_scale[:-1]), torch.float32), as_dev(list(noise_std[:-1]), torch.float32))


def _pseudo_video_triton_impl(x, blur_sigma, noise_std, signal_scale, first_order, seed, noise, truncate):
    B, C, H, W = x.shape
    T = len(blur_sigma)
    out = torch.empty((B, T, C, H, W), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    out[:, T - 1] = x
    if T == 1:
        return out
    P = B * C
    BLOCK_W = min(triton.next_power_of_2(W), 128)
    BLOCK_H = max(1, min(triton.next_power_of_2(H), 4096 // BLOCK_W))
    noise_arg = noise if noise is not None else out
    noise_strides = noise.stride() if noise is not None else (0,) * 5
    # the chain is carried in fp32, in a fresh buffer (never x itself: it is overwritten)
    state = torch.empty((B, C, H, W), dtype=torch.float32, device=x.device).copy_(x) if first_order else out

    radii, taps, width, scale, std = _frame_tables(blur_sigma, noise_std, signal_scale, truncate, H, W, x.device)

    def run(src, first_frame, n_frames):
        tmp = torch.empty((n_frames * P, H, W), dtype=torch.float32, device=x.device)
        grid = (n_frames * P, triton.cdiv(H, BLOCK_H), triton.cdiv(W, BLOCK_W))
        _pseudo_video_vblur_kernel[grid](src, tmp, radii, taps, *src.stride(), first_frame, C, H, W, P, width,
                                         BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
        _pseudo_video_hblur_kernel[grid](tmp, out, state, noise_arg, radii, taps, scale, std, *noise_strides,
                                         seed, first_frame, T, C, H, W, P, width,
                                         HAS_NOISE=noise is not None, WRITE_STATE=first_order,
                                         BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)

    if first_order:  # one step at a time; the fp32 state is read by vblur and rewritten by hblur
        for t in range(T - 2, -1, -1):
            run(state, t, 1)
    else:  # every corrupted frame in one launch pair (fp32 scratch of T-1 frames)
        run(x, 0, T - 1)
    return out


def _pseudo_video_fake(x, blur_sigma, noise_std, signal_scale, first_order, seed, noise, truncate):
    B, C, H, W = x.shape
    return x.new_empty((B, len(blur_sigma), C, H, W))


if triton is not None:
    _SCHEMA = ("(Tensor x, float[] blur_sigma, float[] noise_std, float[] signal_scale, bool first_order, "
               "int seed, Tensor? noise, float truncate) -> Tensor")  # as in csrc/registration.cpp
    _pseudo_video_triton = torch.library.custom_op("pvkernels::pseudo_video_triton", _pseudo_video_triton_impl,
                                                   mutates_args=(), schema=_SCHEMA)
    _pseudo_video_triton.register_fake(_pseudo_video_fake)


# 4. C++ ------------------------------------------------------------------------------------
# torch.ops.pvkernels_cpp.pseudo_video (csrc/pseudo_video.cpp), same schema and fake kernel.

if cpp_available():
    torch.library.register_fake("pvkernels_cpp::pseudo_video")(_pseudo_video_fake)


# 6. public function ------------------------------------------------------------------------

def _as_list(name: str, value: Params) -> Optional[list]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"pseudo_video: {name} must be a 1-D tensor or a sequence, got {value.dim()}-D")
        value = value.detach().cpu().tolist()
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"pseudo_video: {name} must be a sequence of numbers, got {type(value).__name__}") from None
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"pseudo_video: {name} must be finite, got {values}")
    return values


def _check_args(x, blur_sigma, noise_std, signal_scale, order, seed, noise, truncate):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pseudo_video: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"pseudo_video: x must be 4-D (B, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    check_float("pseudo_video", "x", x)
    if order not in ("high", "first"):
        raise ValueError(f"pseudo_video: order must be 'high' or 'first', got {order!r}")
    given = {name: _as_list(name, value) for name, value in
             (("blur_sigma", blur_sigma), ("noise_std", noise_std), ("signal_scale", signal_scale))}
    lengths = {name: len(v) for name, v in given.items() if v is not None}
    if not lengths:
        raise ValueError("pseudo_video: give at least one of blur_sigma, noise_std, signal_scale "
                         "(one entry per frame); see pvkernels.schedules")
    T = next(iter(lengths.values()))
    for name, n in lengths.items():
        if n != T:
            raise ValueError(f"pseudo_video: {name} has length {n}, expected T = {T} like the other "
                             f"per-frame parameters ({lengths})")
    if T == 0:
        raise ValueError("pseudo_video: the per-frame parameters are empty, need T >= 1 frames")
    defaults = {"blur_sigma": 0.0, "noise_std": 0.0, "signal_scale": 1.0}
    sigma, std, scale = (given[n] if given[n] is not None else [d] * T for n, d in defaults.items())
    if min(sigma) < 0:
        raise ValueError(f"pseudo_video: blur_sigma must be >= 0, got {sigma}")
    if min(std) < 0:
        raise ValueError(f"pseudo_video: noise_std must be >= 0, got {std}")
    if (sigma[-1], std[-1], scale[-1]) != (0.0, 0.0, 1.0):
        raise ValueError("pseudo_video: the last frame is the clean image, so entry T-1 must be the identity "
                         f"(blur_sigma 0, noise_std 0, signal_scale 1), got ({sigma[-1]}, {std[-1]}, {scale[-1]})")
    if not isinstance(truncate, (int, float)) or isinstance(truncate, bool) or not (0 < truncate < math.inf):
        raise ValueError(f"pseudo_video: truncate must be a positive finite number, got {truncate!r}")
    if noise is not None:
        B, C, H, W = x.shape
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"pseudo_video: noise must be a torch.Tensor or None, got {type(noise).__name__}")
        if tuple(noise.shape) != (B, T, C, H, W):
            raise ValueError(f"pseudo_video: noise must have shape (B, T, C, H, W) = {(B, T, C, H, W)}, "
                             f"got {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"pseudo_video: noise must be floating point, got {noise.dtype}")
        if noise.device != x.device:
            raise ValueError(f"pseudo_video: noise is on {noise.device} but x is on {x.device}")
    if seed is None:
        seed = int(torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64))  # follows torch.manual_seed
    else:
        try:
            seed = operator.index(seed) if not isinstance(seed, bool) else -1  # numpy ints are fine
        except TypeError:
            seed = -1
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"pseudo_video: seed must be an int in [0, 2**63) or None, got {seed!r}")
    return sigma, std, scale, seed, float(truncate)


def pseudo_video(x: torch.Tensor, blur_sigma: Params = None, noise_std: Params = None,
                 signal_scale: Params = None, order: str = "high", seed: Optional[int] = None,
                 noise: Optional[torch.Tensor] = None, truncate: float = 3.0,
                 backend: str = "auto") -> torch.Tensor:
    """Builds the pseudo video whose last frame is ``x`` and whose earlier frames corrupt it.

    ``order="high"``: ``v[:, t] = signal_scale[t] * G(blur_sigma[t]) x + noise_std[t] * eps_t``.
    ``order="first"``: ``v[:, T-1] = x`` and, for t = T-2 ... 0,
    ``v[:, t] = signal_scale[t] * G(blur_sigma[t]) v[:, t+1] + noise_std[t] * eps_t`` (the chain
    is carried in fp32). ``G(s)`` is the separable normalised Gaussian of radius
    ``min(ceil(truncate * s), min(H, W) - 1)`` with reflect boundary; ``G(0)`` is the identity.

    Args:
        x: images, floating point (fp32/fp16/bf16; fp64 with the reference backend).
        blur_sigma: per-frame blur sigma (length T; None means 0). Entry T-1 must be 0.
        noise_std: per-frame noise std (None means 0). Entry T-1 must be 0.
        signal_scale: per-frame signal scale (None means 1). Entry T-1 must be 1.
        order: "high" or "first".
        seed: key of the counter-based noise (same seed, same device -> same video, whatever the
            thread count). None draws one from torch's default generator. Under
            ``torch.compile(fullgraph=True)`` pass it explicitly (and the parameters as lists).
        noise: optional (B, T, C, H, W) tensor used as eps instead of the generator.
        truncate: blur radius in sigmas.
        backend: "auto", "triton", "cpp" or "reference" (env ``PVKERNELS_BACKEND`` overrides auto).

    Returns:
        The pseudo video, same dtype as ``x``, contiguous; frame T-1 equals ``x`` bit for bit.

    Shape:
        x: (B, C, H, W) -> (B, T, C, H, W).

    Example:
        >>> import pvkernels
        >>> x = torch.rand(8, 3, 32, 32)
        >>> video = pvkernels.pseudo_video(x, **pvkernels.schedules.linear_blur(frames=6, sigma_max=2.0))
        >>> video.shape
        torch.Size([8, 6, 3, 32, 32])
    """
    sigma, std, scale, seed, truncate = _check_args(x, blur_sigma, noise_std, signal_scale, order, seed, noise,
                                                    truncate)
    if noise is not None and not any(std):
        noise = None  # no frame reads it
    first_order = order == "first"
    slower = cpp_slower("pseudo_video", dtype=x.dtype, blur=any(sigma), noise=any(std))
    chosen = resolve_backend("pseudo_video", backend, x.device, x.dtype, slower=slower)
    if chosen == "cpp":
        return torch.ops.pvkernels_cpp.pseudo_video(x, sigma, std, scale, first_order, seed, noise, truncate)
    if chosen == "triton":
        return _pseudo_video_triton(x, sigma, std, scale, first_order, seed, noise, truncate)
    return pseudo_video_reference(x, sigma, std, scale, first_order, seed, noise, truncate)
