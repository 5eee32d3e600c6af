import math

import numpy as np
import pytest
import torch

from pvkernels_models.metrics import frechet_distance, psnr


def test_psnr_known_values():
    x = torch.rand(3, 1, 8, 8)
    y = x + 0.1
    assert torch.allclose(psnr(x, y), torch.full((3,), 20.0, dtype=torch.float64), atol=1e-5)
    assert math.isinf(psnr(x, x)[0].item())
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:2])


@pytest.mark.parametrize("n, m, d", [(50, 80, 3), (200, 120, 16)])
def test_frechet_distance_against_scipy(n, m, d):
    linalg = pytest.importorskip("scipy.linalg")
    a = torch.randn(n, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    b = torch.randn(m, d, dtype=torch.float64) * 2.0 + 0.5
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-7)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="feature sizes"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
