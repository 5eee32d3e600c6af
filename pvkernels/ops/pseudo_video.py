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

from .._backend import check_float, fused_slower, is_int, resolve_backend, triton, triton_interpret
from ._library import define_op
from ._triton import Launch, cdiv, run
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
# One kernel writes every frame. A program owns one output tile of one image plane and reads its
# input tile once, with the blur halo, reflect-mapped at the image edge. Each frame's separable
# blur is two small matrix products on that tile, Y = A_t X B_t: A_t (rows) and B_t (columns)
# hold the Gaussian taps with the reflect boundary folded in (an axis that fits one block, <= 64)
# or as a band over the reflect-mapped halo (longer axes). Scale and Philox noise are fused, and
# the first-order chain stays in registers when the whole plane is one tile.

if triton is not None:
    import triton.language as tl

    from .rng import philox_normal, philox_normal4

    @triton.jit
    def _reflect(i, n):
        # mirror without repeating the edge (valid because the radius is <= n - 1); the clamp only
        # keeps the loads of padded rows / columns in bounds
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= n, 2 * (n - 1) - i, i)
        return tl.minimum(tl.maximum(i, 0), n - 1)

    @triton.jit
    def _blur_tiled(src, a_t, b_t, row0, col0, pad_h, pad_w, n_rows, n_cols, src_stride_h, src_stride_w,
                    PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_H: tl.constexpr,
                    HALO_W: tl.constexpr, CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr):
        """A_t X B_t for one output tile of a plane too large to hold: the halo X is read in
        (CHUNK_H, CHUNK_W) blocks, each once, and both products accumulate over them."""
        y = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
        for c0 in range(0, HALO_W, CHUNK_W):
            cols = _reflect(col0 - pad_w + c0 + tl.arange(0, CHUNK_W), n_cols)
            v = tl.zeros([BLOCK_H, CHUNK_W], tl.float32)
            for r0 in range(0, HALO_H, CHUNK_H):
                rows = _reflect(row0 - pad_h + r0 + tl.arange(0, CHUNK_H), n_rows)
                x = tl.load(src + rows[:, None] * src_stride_h + cols[None, :] * src_stride_w).to(tl.float32)
                a = tl.load(a_t + tl.arange(0, BLOCK_H)[:, None] * HALO_H + r0 + tl.arange(0, CHUNK_H)[None, :])
                v = tl.dot(a, x, v, input_precision=PRECISION)
            bm = tl.load(b_t + (c0 + tl.arange(0, CHUNK_W))[:, None] * BLOCK_W + tl.arange(0, BLOCK_W)[None, :])
            y = tl.dot(v, bm, y, input_precision=PRECISION)
        return y

    @triton.jit(do_not_specialize=["seed", "frame_lo", "frame_hi", "n_frames", "n_channels", "pad_h", "pad_w",
                                   "write_last", "write_state", "has_noise"])
    def _pseudo_video_kernel(
        src_ptr, out_ptr, state_ptr, noise_ptr, a_ptr, b_ptr, radius_ptr, scale_ptr, std_ptr,
        src_stride_b, src_stride_c, src_stride_h, src_stride_w,
        noise_stride_b, noise_stride_t, noise_stride_c, noise_stride_h, noise_stride_w,
        seed: tl.int64, frame_lo, frame_hi, n_frames, n_channels, n_rows, n_cols, pad_h, pad_w,
        write_last, write_state, has_noise,
        FIRST_ORDER: tl.constexpr, RESIDENT: tl.constexpr, VEC4: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
        CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr,
    ):
        """Frames frame_hi - 1 down to frame_lo of one (BLOCK_H, BLOCK_W) tile of plane program_id(0).

        src is the clean image (or, for a first-order step of a tiled plane, the previous frame in
        fp32). RESIDENT: the tile is the whole plane, loaded once and kept in registers (a sigma-0
        frame is the tile itself; the first-order chain runs there too). VEC4 (W % 4 == 0): each
        Philox counter's four normals land in four adjacent pixels of one row. The flags are
        runtime arguments (uniform branches): one binary per tile shape and dtype.
        """
        plane = tl.program_id(0)
        b = (plane // n_channels).to(tl.int64)
        c = (plane % n_channels).to(tl.int64)
        row0 = tl.program_id(1) * BLOCK_H
        col0 = tl.program_id(2) * BLOCK_W
        rows = row0 + tl.arange(0, BLOCK_H)[:, None]
        cols = col0 + tl.arange(0, BLOCK_W)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        # int64 plane / frame bases (B * T * C * H * W passes 2**31), int32 offsets within a plane
        src = src_ptr + b * src_stride_b + c * src_stride_c
        plane_size = n_rows * n_cols
        pixel = rows * n_cols + cols
        center = rows * src_stride_h + cols * src_stride_w
        # RESIDENT: the halo is the block (HALO_H == BLOCK_H, HALO_W == BLOCK_W)
        a_off = tl.arange(0, BLOCK_H)[:, None] * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
        b_off = tl.arange(0, BLOCK_W)[:, None] * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
        if RESIDENT:
            x = tl.load(src + _reflect(rows, n_rows) * src_stride_h + _reflect(cols, n_cols) * src_stride_w)
        else:
            x = tl.load(src + center, mask=mask)
        if write_last:  # frame T-1 is x itself, bit for bit
            tl.store(out_ptr + ((b * n_frames + n_frames - 1) * n_channels + c) * plane_size + pixel,
                     x.to(out_ptr.dtype.element_ty), mask=mask)
        x = x.to(tl.float32)
        for i in range(frame_hi - frame_lo):
            t = frame_hi - 1 - i
            a_t = a_ptr + t * (BLOCK_H * HALO_H)
            b_t = b_ptr + t * (HALO_W * BLOCK_W)
            if tl.load(radius_ptr + t) > 0:
                if RESIDENT:
                    y = tl.dot(tl.dot(tl.load(a_t + a_off), x, input_precision=PRECISION), tl.load(b_t + b_off),
                               input_precision=PRECISION)
                else:
                    y = _blur_tiled(src, a_t, b_t, row0, col0, pad_h, pad_w, n_rows, n_cols, src_stride_h,
                                    src_stride_w, PRECISION, BLOCK_H, BLOCK_W, HALO_H, HALO_W, CHUNK_H, CHUNK_W)
            else:
                y = x
            y = y * tl.load(scale_ptr + t)
            std = tl.load(std_ptr + t)
            frame_base = ((b * n_frames + t) * n_channels + c) * plane_size
            if std != 0.0:
                if has_noise:
                    eps = tl.load(noise_ptr + (b * noise_stride_b + t.to(tl.int64) * noise_stride_t + c * noise_stride_c)
                                  + rows * noise_stride_h + cols * noise_stride_w, mask=mask).to(tl.float32)
                elif VEC4:
                    first = (frame_base + row0 * n_cols + col0) // 4
                    eps = philox_normal4(seed, first + tl.arange(0, BLOCK_H)[:, None] * (n_cols // 4)
                                         + tl.arange(0, BLOCK_W // 4)[None, :])
                else:
                    eps = philox_normal(seed, frame_base + pixel)
                y += std * eps
            tl.store(out_ptr + frame_base + pixel, y.to(out_ptr.dtype.element_ty), mask=mask)
            if write_state:
                tl.store(state_ptr + (b * n_channels + c) * plane_size + pixel, y, mask=mask)
            if FIRST_ORDER:
                x = y


# 3. launchers -------------------------------------------------------------------------------

_FULL = 32  # an axis up to this long is one block: taps folded with the reflect boundary
_TILE = 32  # longer axes: 32-pixel output tiles
_CHUNK = 16  # their halo read in 16-pixel chunks (32-pixel chunks: 255 registers and spills)


def _axis_plan(n: int, r_max: int) -> tuple:
    """(block, halo, pad, chunk) of one image axis."""
    if n <= _FULL:
        block = max(16, triton.next_power_of_2(n))
        return block, block, 0, min(block, _TILE)
    return _TILE, cdiv(_TILE + 2 * r_max, _CHUNK) * _CHUNK, r_max, _CHUNK


def _blur_matrix(sigma: float, truncate: float, H: int, W: int, n: int, block: int, halo: int, pad: int) -> list:
    """(block, halo) weights of axis length n: output i takes halo position j (reflect folded in
    when pad == 0, else a band over the reflect-mapped halo rows i .. i + 2 * pad)."""
    r = _radius(sigma, truncate, H, W)
    half = _gaussian_taps(sigma, r)
    m = [[0.0] * halo for _ in range(block)]
    for i in range(min(block, n) if pad == 0 else block):
        for k in range(-r, r + 1):
            if pad:
                m[i][i + pad + k] += half[abs(k)]
            else:
                j = abs(i + k)
                m[i][j if j < n else 2 * (n - 1) - j] += half[abs(k)]
    return m


_tables: dict = {}


def _frame_tables(blur_sigma, noise_std, signal_scale, truncate, H, W, device):
    """Per-frame blur matrices (rows, columns), radius, scale and std as device tensors, cached:
    one host-to-device copy per schedule and image size, not per call."""
    key = (tuple(blur_sigma), tuple(noise_std), tuple(signal_scale), truncate, H, W, str(device))
    if key not in _tables:
        frames = range(len(blur_sigma) - 1)
        radii = [_radius(blur_sigma[t], truncate, H, W) for t in frames]
        (bh, hh, ph, ch), (bw, hw, pw, cw) = _axis_plan(H, max(radii)), _axis_plan(W, max(radii))
        rows = [_blur_matrix(blur_sigma[t], truncate, H, W, H, bh, hh, ph) for t in frames]
        cols = [[list(c) for c in zip(*_blur_matrix(blur_sigma[t], truncate, H, W, W, bw, hw, pw))] for t in frames]
        as_dev = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        if len(_tables) > 64:
            _tables.clear()
        _tables[key] = (as_dev(rows, torch.float32), as_dev(cols, torch.float32), as_dev(radii, torch.int32),
                        as_dev(list(signal_scale[:-1]), torch.float32), as_dev(list(noise_std[:-1]), torch.float32),
                        dict(BLOCK_H=bh, HALO_H=hh, CHUNK_H=ch, BLOCK_W=bw, HALO_W=hw, CHUNK_W=cw), (ph, pw))
    return _tables[key]


def _pseudo_video_launches(x, out, noise, blur_sigma, noise_std, signal_scale, first_order, seed, truncate) -> list:
    B, C, H, W = x.shape
    T = len(blur_sigma)
    rows, cols, radii, scale, std, tiles, (ph, pw) = _frame_tables(blur_sigma, noise_std, signal_scale, truncate,
                                                                   H, W, x.device)
    resident = H <= _FULL and W <= _FULL
    grid = (B * C, cdiv(H, tiles["BLOCK_H"]), cdiv(W, tiles["BLOCK_W"]))
    # fp32 stand-ins for the pointers a launch does not use: one binary whatever the flags
    noise_args = (noise, *noise.stride()) if noise is not None else (scale, 0, 0, 0, 0, 0)
    interpret = triton_interpret()
    meta = dict(tiles, RESIDENT=resident, VEC4=W % 4 == 0, PRECISION="ieee" if interpret else "bf16x6",
                num_warps=8 if tiles["BLOCK_H"] * tiles["BLOCK_W"] >= 32 * 32 else 4, num_stages=1)

    def launch(src, state, frame_lo, frame_hi, chain, write_last, write_state):
        flags = (int(write_last), int(write_state), int(noise is not None))
        return Launch(_pseudo_video_kernel, grid,
                      (src, out, state, *noise_args[:1], rows, cols, radii, scale, std, *src.stride(),
                       *noise_args[1:], seed, frame_lo, frame_hi, T, C, H, W, ph, pw, *flags),
                      dict(meta, FIRST_ORDER=chain))

    if not first_order or resident:  # every frame in one launch
        return [launch(x, scale, 0, T - 1, first_order, True, False)]
    # a first-order chain over a tiled plane: one launch per step, the previous frame read in fp32
    # (from the output itself when it is fp32, else from two alternating fp32 planes)
    steps = []
    states = ([torch.empty((B, C, H, W), dtype=torch.float32, device=x.device) for _ in range(2)]
              if x.dtype != torch.float32 else None)
    for t in range(T - 2, -1, -1):
        if t == T - 2:
            src = x
        else:
            src = out[:, t + 1] if states is None else states[t % 2 ^ 1]
        dst = scale if states is None else states[t % 2]
        steps.append(launch(src, dst, t, t + 1, False, t == T - 2, states is not None and t > 0))
    return steps


def _pseudo_video_triton_impl(x, blur_sigma, noise_std, signal_scale, first_order, seed, noise, truncate):
    B, C, H, W = x.shape
    T = len(blur_sigma)
    out = torch.empty((B, T, C, H, W), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if T == 1:
        out[:, 0] = x
        return out
    run(_pseudo_video_launches(x, out, noise, blur_sigma, noise_std, signal_scale, first_order, seed, truncate))
    return out


def _pseudo_video_fake(x, blur_sigma, noise_std, signal_scale, first_order, seed, noise, truncate):
    B, C, H, W = x.shape
    return x.new_empty((B, len(blur_sigma), C, H, W))


# 4. the C++ and Triton ops ---------------------------------------------------------------
# torch.ops.pvkernels_cpp.pseudo_video (csrc/pseudo_video.cpp) and its Triton stand-in, one schema,
# as csrc/registration.cpp declares it (tests/test_schemas.py).

_SCHEMA = ("(Tensor x, float[] blur_sigma, float[] noise_std, float[] signal_scale, bool first_order, "
           "int seed, Tensor? noise, float truncate) -> Tensor")
_OPS = define_op("pseudo_video", _SCHEMA, _pseudo_video_triton_impl, _pseudo_video_fake)


# 5. public function ------------------------------------------------------------------------

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
    elif not is_int(seed) or not 0 <= operator.index(seed) < _SEED_LIMIT:
        raise ValueError(f"pseudo_video: seed must be an int in [0, 2**63) or None, got {seed!r}")
    else:
        seed = operator.index(seed)  # numpy ints are fine
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
    slower = fused_slower("pseudo_video", dtype=x.dtype, blur=any(sigma), noise=any(std))
    chosen = resolve_backend("pseudo_video", backend, x.device, x.dtype, slower=slower)
    if chosen == "cpp":
        return _OPS["cpp"](x, sigma, std, scale, first_order, seed, noise, truncate)
    if chosen == "triton":
        return _OPS["triton"](x, sigma, std, scale, first_order, seed, noise, truncate)
    return pseudo_video_reference(x, sigma, std, scale, first_order, seed, noise, truncate)
