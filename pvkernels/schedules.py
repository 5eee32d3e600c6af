"""Per-frame parameters of the standard pseudo videos, ready for ``pseudo_video(x, **s)``.

Each helper returns a dict with ``blur_sigma``, ``noise_std``, ``signal_scale`` (lists of
length ``frames``, entry ``frames - 1`` the identity) and ``order``. For ``order="high"`` the
lists are the frames' own corruption levels. For ``order="first"`` they are the per-step
parameters of the chain, chosen so that frame t's marginal equals the high-order frame t where
that holds exactly: pure noise (Gaussian scale/variance composition), pure blur (the Gaussian
semigroup G(a) G(b) = G(sqrt(a^2 + b^2)): exact for the continuous Gaussian, so up to the
truncation, the boundary and the sampling of small sigmas -- steps below ~1 pixel are only
roughly Gaussian once sampled).
"""
from __future__ import annotations

import math

from ._backend import is_int

__all__ = ["linear_blur", "geometric_blur", "ddpm_noise", "combine"]


def _check(frames: int, order: str) -> None:
    if not is_int(frames) or frames < 1:
        raise ValueError(f"schedules: frames must be an int >= 1, got {frames!r}")
    if order not in ("high", "first"):
        raise ValueError(f"schedules: order must be 'high' or 'first', got {order!r}")


def _blur(levels: list, order: str) -> dict:
    levels = list(levels) + [0.0]
    if order == "first":  # step t turns frame t+1 (sigma levels[t+1]) into frame t
        levels = [math.sqrt(max(levels[t] ** 2 - levels[t + 1] ** 2, 0.0)) for t in range(len(levels) - 1)] + [0.0]
    n = len(levels)
    return {"blur_sigma": levels, "noise_std": [0.0] * n, "signal_scale": [1.0] * n, "order": order}


def linear_blur(frames: int, sigma_max: float, order: str = "high") -> dict:
    """Frame t is blurred with sigma_max * (T-1-t) / (T-1): frame 0 the most, T-1 not at all."""
    _check(frames, order)
    if not sigma_max >= 0:
        raise ValueError(f"schedules: sigma_max must be >= 0, got {sigma_max!r}")
    T = frames
    return _blur([sigma_max * (T - 1 - t) / (T - 1) for t in range(T - 1)], order)


def geometric_blur(frames: int, sigma_max: float, sigma_min: float = 0.5, order: str = "high") -> dict:
    """Blur levels spaced geometrically from sigma_max (frame 0) to sigma_min (frame T-2)."""
    _check(frames, order)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"schedules: need 0 < sigma_min <= sigma_max, got {sigma_min!r}, {sigma_max!r}")
    T = frames
    if T <= 2:
        return _blur([sigma_max] * (T - 1), order)
    ratio = sigma_max / sigma_min
    return _blur([sigma_min * ratio ** ((T - 2 - t) / (T - 2)) for t in range(T - 1)], order)


def _alpha_bar(u: float, schedule: str, num_steps: int, beta_start: float, beta_end: float) -> float:
    """Cumulative signal fraction of the DDPM schedule at fraction u in [0, 1] of the process."""
    if schedule == "cosine":
        s = 0.008
        f = lambda v: math.cos((v + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return max(f(u) / f(0.0), 0.0)
    steps = round(u * num_steps)
    out = 1.0
    for k in range(steps):
        out *= 1.0 - (beta_start + (beta_end - beta_start) * k / max(num_steps - 1, 1))
    return out


def ddpm_noise(frames: int, schedule: str = "linear", order: str = "high", num_steps: int = 1000,
               beta_start: float = 1e-4, beta_end: float = 0.02) -> dict:
    """DDPM noise levels: frame t sits at fraction (T-1-t)/(T-1) of the diffusion process.

    High order: ``signal_scale = sqrt(abar)``, ``noise_std = sqrt(1 - abar)``. First order: steps
    ``a_t = sqrt(abar_t / abar_{t+1})``, ``b_t = sqrt(1 - abar_t / abar_{t+1})``, whose chain has
    exactly the same marginals. The linear schedule takes ``num_steps >= frames - 1`` (each frame
    its own step) and ``0 < beta_start <= beta_end < 1``.
    """
    _check(frames, order)
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"schedules: schedule must be 'linear' or 'cosine', got {schedule!r}")
    if schedule == "linear":  # (the cosine schedule is continuous: no steps, no betas)
        if not is_int(num_steps) or num_steps < max(frames - 1, 1):
            raise ValueError(f"schedules: num_steps must be an int >= frames - 1 ({max(frames - 1, 1)}: a step "
                             f"of its own for each frame), got {num_steps!r}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"schedules: need 0 < beta_start <= beta_end < 1, got {beta_start!r}, {beta_end!r}")
    T = frames
    abar = [_alpha_bar((T - 1 - t) / (T - 1), schedule, num_steps, beta_start, beta_end) for t in range(T - 1)]
    abar.append(1.0)
    if order == "high":
        scale = [math.sqrt(a) for a in abar]
        std = [math.sqrt(1.0 - a) for a in abar]
    else:
        ratio = [abar[t] / abar[t + 1] for t in range(T - 1)]
        scale = [math.sqrt(r) for r in ratio] + [1.0]
        std = [math.sqrt(max(1.0 - r, 0.0)) for r in ratio] + [0.0]
    return {"blur_sigma": [0.0] * T, "noise_std": std, "signal_scale": scale, "order": order}


def combine(blur: dict, noise: dict) -> dict:
    """Blur levels of ``blur`` with the noise/scale of ``noise`` (same frames and order).

    For ``order="first"`` the marginals of the combination are not those of the high-order
    video (later steps blur the noise added by earlier ones); it is still a valid chain.
    """
    if len(blur["blur_sigma"]) != len(noise["noise_std"]) or blur["order"] != noise["order"]:
        raise ValueError("schedules.combine: both schedules need the same number of frames and order")
    return {"blur_sigma": blur["blur_sigma"], "noise_std": noise["noise_std"],
            "signal_scale": noise["signal_scale"], "order": blur["order"]}
