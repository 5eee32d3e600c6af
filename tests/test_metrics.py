import json
import math

import numpy as np
import pytest
import torch

from pvkernels_models.metrics import fid, frechet_distance, inception_features, kernel_distance, psnr
from pvkernels_models import train
from pvkernels_models.pretrained import INCEPTION_ENV, INCEPTION_FILE, FIDInceptionV3, load_inception


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


def _kid_by_hand(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, from explicit pair loops (numpy)."""
    x, y = x.numpy(), y.numpy()
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kernel_distance_and_its_jackknife_error_by_hand():
    x, y = torch.randn(13, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64) * 1.3 + 0.2
    kid, se = kernel_distance(x, y)
    assert kid == pytest.approx(_kid_by_hand(x, y), rel=1e-10)
    loo = np.array([_kid_by_hand(x, torch.cat([y[:j], y[j + 1:]])) for j in range(len(y))])
    expected_se = np.sqrt((len(y) - 1) / len(y) * ((loo - loo.mean()) ** 2).sum())
    assert se == pytest.approx(expected_se, rel=1e-8)


def test_kernel_distance_tells_same_from_shifted():
    real = torch.randn(2000, 16)
    same, se_same = kernel_distance(real, torch.randn(300, 16))
    shifted, se_shifted = kernel_distance(real, torch.randn(300, 16) + 0.5)
    assert abs(same) < 3 * se_same and shifted > 10 * se_shifted
    with pytest.raises(ValueError, match="N >= 3 fake"):
        kernel_distance(real, real[:2])
    with pytest.raises(ValueError, match=r"\(M, D\) and \(N, D\)"):
        kernel_distance(real, torch.randn(5, 3))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random FIDInceptionV3 saved as its weights file (the real one is not shipped)."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():  # default init shrinks the features to ~1e-8 over 94 convs
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("hub") / INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_inception_is_pytorch_fids_layout(inception_file):
    path, model = inception_file
    # torchvision's inception_v3 has 27,161,264 parameters; pytorch-fid's has no AuxLogits
    # (3,326,696) and a 1008-way fc instead of 1000-way (8 * 2048 + 8 more)
    assert sum(p.numel() for p in model.parameters()) == 27161264 - 3326696 + 8 * 2049
    loaded = load_inception(path)  # strict=True
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in loaded.state_dict()


def test_inception_rejects_a_foreign_file(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a pytorch-fid InceptionV3 weight file"):
        load_inception(tmp_path / "x.pth")


def test_inception_features_of_tiny_grey_and_rgb_images(inception_file):
    model = inception_file[1]
    grey, rgb = inception_features(torch.rand(3, 1, 8, 8), model), inception_features(torch.rand(2, 3, 12, 12), model)
    assert grey.shape == (3, 2048) and rgb.shape == (2, 2048) and grey.isfinite().all()
    assert (grey[0] - grey[1]).abs().max() > 0
    with pytest.raises(ValueError, match="1 or 3"):
        model(torch.rand(2, 2, 8, 8))


def test_fid_of_a_set_with_itself_is_zero(inception_file, monkeypatch):
    path = inception_file[0]
    x = torch.rand(3, 1, 8, 8)
    monkeypatch.setenv(INCEPTION_ENV, str(path))  # found through the environment variable
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)  # fid > 0 for different sets: the CLI test below


def test_fid_without_weights_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no InceptionV3 weights .*{tmp_path}"):
        fid(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    with pytest.raises(FileNotFoundError, match="no file at /nonexistent"):
        fid(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), weights="/nonexistent")


def test_cli_reports_inception_fid_when_the_weights_exist(inception_file, tmp_path, monkeypatch, capsys):
    argv = ["--model", "ddpm", "--steps", "1", "--image-size", "8", "--batch-size", "4", "--eval-samples", "4",
            "--timesteps", "3", "--no-progress", "--out"]
    monkeypatch.setattr(train, "_INCEPTIONS", {})  # a fresh process's cache: the note is printed once
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    for out in ("a", "b"):
        assert train.main([*argv, str(tmp_path / out)]) == 0
        record = json.loads((tmp_path / out / "metrics.jsonl").read_text().splitlines()[-1])
        assert {"offline_fid", "offline_kid", "offline_kid_se"} <= set(record) and "fid_inception" not in record
    assert capsys.readouterr().err.count(f"FID (InceptionV3) unavailable: no {INCEPTION_FILE}") == 1
    assert train.main([*argv, str(tmp_path / "c"), "--inception-weights", str(inception_file[0])]) == 0
    record = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["fid_inception"] > 0 and "offline_fid" in record and "InceptionV3" in record["fid_note"]
    assert train.main([*argv, str(tmp_path / "d"), "--inception-weights", str(tmp_path / "none.pth")]) == 2
    assert "--inception-weights: no file at" in capsys.readouterr().err


def test_experiments_show_kid_with_its_scale(tmp_path, monkeypatch, capsys):
    """KID is the plain value (hundreds or more on the offline features, which reads as the x 1000
    of published KIDs): the table and the figures say so."""
    from pvkernels_models import experiments

    arms = experiments.grid("diffusion", experiments.BUDGETS["smoke"])
    values = {(a.key, "offline_kid"): [100.0 + 3 * i, 140.0 + i] for i, a in enumerate(arms)}
    results = experiments.Results(arms, values=values)
    rows = [r for _, r in results.arm_rows()]
    experiments.print_table(rows, [])
    assert "offline_kid: offline KID (the plain value, not x 1000)" in capsys.readouterr().out
    titles = []
    monkeypatch.setattr(experiments, "line_plot", lambda path, title, *rest: titles.append(title))
    experiments.draw(results, tmp_path)
    assert titles == ["diffusion: offline KID (the plain value, not x 1000), small-classifier features (lower is "
                      "better), mean +- std over 2 seeds"]
