"""schedules: identities, lengths, and first-order steps that reproduce the high-order marginals."""
import math

import pytest
import torch

import pvkernels
from pvkernels import schedules

from .utils import assert_close

ALL = [
    lambda T, o: schedules.linear_blur(T, 2.5, o),
    lambda T, o: schedules.geometric_blur(T, 3.0, 0.4, o),
    lambda T, o: schedules.ddpm_noise(T, "linear", o),
    lambda T, o: schedules.ddpm_noise(T, "cosine", o),
    lambda T, o: schedules.combine(schedules.linear_blur(T, 2.0, o), schedules.ddpm_noise(T, "cosine", o)),
]


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("order", ["high", "first"])
@pytest.mark.parametrize("T", [1, 2, 7, 18])
def test_shapes_and_identity_last_entry(make, order, T):
    s = make(T, order)
    assert s["order"] == order
    assert len(s["blur_sigma"]) == len(s["noise_std"]) == len(s["signal_scale"]) == T
    assert (s["blur_sigma"][-1], s["noise_std"][-1], s["signal_scale"][-1]) == (0.0, 0.0, 1.0)
    assert all(v >= 0 and math.isfinite(v) for v in s["blur_sigma"] + s["noise_std"])
    pvkernels.pseudo_video(torch.rand(1, 1, 4, 4), **s, seed=0)  # accepted as is


def test_high_order_levels():
    s = schedules.linear_blur(5, 2.0)
    assert s["blur_sigma"] == [2.0, 1.5, 1.0, 0.5, 0.0]
    g = schedules.geometric_blur(4, 4.0, 1.0)["blur_sigma"]
    assert g[0] == pytest.approx(4.0) and g[2] == pytest.approx(1.0) and g[1] == pytest.approx(2.0)
    n = schedules.ddpm_noise(6, "cosine")
    for a, b in zip(n["signal_scale"], n["noise_std"]):
        assert a * a + b * b == pytest.approx(1.0)  # variance preserving
    assert n["noise_std"][0] > 0.99  # frame 0 is (almost) pure noise


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_first_order_noise_steps_compose_to_high_order(schedule):
    high = schedules.ddpm_noise(9, schedule, "high")
    first = schedules.ddpm_noise(9, schedule, "first")
    scale, var = 1.0, 0.0
    for t in range(7, -1, -1):  # walk the chain back from the clean frame
        scale, var = first["signal_scale"][t] * scale, first["signal_scale"][t] ** 2 * var + first["noise_std"][t] ** 2
        assert scale == pytest.approx(high["signal_scale"][t], rel=1e-9, abs=1e-12)
        assert math.sqrt(var) == pytest.approx(high["noise_std"][t], rel=1e-9)


@pytest.mark.parametrize("make", [lambda T, o: schedules.linear_blur(T, 6.0, o),
                                  lambda T, o: schedules.geometric_blur(T, 6.0, 2.0, o)])
def test_first_order_blur_matches_high_order_in_the_interior(make):
    # G(a) G(b) = G(sqrt(a^2 + b^2)) holds for the continuous Gaussian: the sampled kernels
    # follow it closely once every step has sigma >= ~2; compare the interior, away from the
    # boundary, with a generous truncate.
    x = torch.rand(2, 1, 128, 128, dtype=torch.float64)
    T = 4
    assert min(make(T, "first")["blur_sigma"][:-1]) >= 2.0
    high = pvkernels.pseudo_video(x, **make(T, "high"), truncate=6.0, backend="reference")
    first = pvkernels.pseudo_video(x, **make(T, "first"), truncate=6.0, backend="reference")
    inner = (slice(None), slice(None), slice(None), slice(48, 80), slice(48, 80))
    assert_close(first[inner], high[inner], torch.float32, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: schedules.linear_blur(0, 1.0), "frames"),
    (lambda: schedules.linear_blur(3, -1.0), "sigma_max"),
    (lambda: schedules.linear_blur(3, 1.0, "second"), "order"),
    (lambda: schedules.geometric_blur(3, 1.0, 2.0), "sigma_min"),
    (lambda: schedules.ddpm_noise(3, "quadratic"), "schedule"),
    (lambda: schedules.ddpm_noise(8, num_steps=4), r"num_steps must be an int >= frames - 1 \(7"),
    (lambda: schedules.ddpm_noise(3, num_steps=100.0), "num_steps must be an int"),
    (lambda: schedules.ddpm_noise(3, beta_end=2.0), r"need 0 < beta_start <= beta_end < 1, got 0.0001, 2.0"),
    (lambda: schedules.ddpm_noise(3, beta_start=-1e-4), "need 0 < beta_start"),
    (lambda: schedules.ddpm_noise(3, beta_start=0.03), "need 0 < beta_start"),
    (lambda: schedules.ddpm_noise(3, beta_end=float("nan")), "need 0 < beta_start"),
    (lambda: schedules.combine(schedules.linear_blur(3, 1.0), schedules.ddpm_noise(4)), "same number"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
