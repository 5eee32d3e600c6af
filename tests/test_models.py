"""pvkernels_models: shapes, a learning step, frames=1, resume, CLI, DDP, bad arguments."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pvkernels_models.diffusion import DDPM, VideoDiffusion
from pvkernels_models.tokenizers import CViViT, VQVAE
from pvkernels_models.train import main

FAST = ["--image-size", "8", "--batch-size", "8", "--eval-samples", "16", "--timesteps", "5", "--no-progress"]
GAN = ["--gan-weight", "0.5", "--gan-start", "1"]


def make(name, frames=3):
    return {"vqvae": lambda: VQVAE(1, width=16, dim=8, codebook_size=16),
            "cvivit": lambda: CViViT(1, 8, frames, patch=4, dim=16, depth=1, heads=2, codebook_size=16),
            "ddpm": lambda: DDPM(1, 8, width=16, timesteps=10),
            "video-diffusion": lambda: VideoDiffusion(1, 8, frames, width=16, heads=2, timesteps=10)}[name]()


def batch(name, frames=3):
    return torch.rand(4, frames, 1, 8, 8) if name in ("cvivit", "video-diffusion") else torch.rand(4, 1, 8, 8)


@pytest.mark.parametrize("name", ["vqvae", "cvivit", "ddpm", "video-diffusion"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(name):
    model, x = make(name), batch(name)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(2):
        loss = model.loss(x, generator=torch.Generator().manual_seed(0))  # same noise both times
        assert loss.dim() == 0 and loss.isfinite()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


@pytest.mark.parametrize("name", ["vqvae", "cvivit"])
def test_tokenizer_shapes(name):
    model, x = make(name), batch(name)
    recon, codes, vq_loss = model(x)
    assert recon.shape == x.shape and recon.dtype == x.dtype and vq_loss.dim() == 0
    assert codes.dtype == torch.int64


@pytest.mark.parametrize("name", ["ddpm", "video-diffusion"])
def test_diffusion_samples_are_images(name):
    model = make(name)
    images = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and 0 <= images.min() and images.max() <= 1


def test_cvivit_with_one_frame_is_an_image_tokenizer():
    model = make("cvivit", frames=1)
    x = torch.rand(4, 1, 8, 8)
    recon, codes, _ = model(x.unsqueeze(1))
    assert recon.shape == (4, 1, 1, 8, 8) and codes.shape == (4, 1, 4)
    with pytest.raises(ValueError, match="frames"):
        model(torch.rand(4, 2, 1, 8, 8))


@pytest.mark.parametrize("model", ["vqvae", "cvivit", "ddpm", "video-diffusion"])
def test_cli_smoke(tmp_path, model, capsys):
    assert main(["--model", model, "--frames", "3", "--steps", "2", "--out", str(tmp_path), *FAST]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["eval"] and lines[-2]["step"] == 2
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "samples.png").is_file()
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("model", ["vqvae", "cvivit"])
def test_cli_gan(tmp_path, model):
    assert main(["--model", model, "--frames", "3", "--steps", "3", "--log-every", "1", "--out", str(tmp_path),
                 *GAN, *FAST]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "g_loss" not in lines[0]  # step 1 is before --gan-start 1 ends: no GAN yet
    assert {"g_loss", "d_loss", "gan_weight"} <= set(lines[1]) and lines[1]["gan_weight"] > 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert "disc" in state and "opt_d" in state


@pytest.mark.parametrize("model, extra", [("cvivit", []), ("video-diffusion", []), ("vqvae", GAN), ("cvivit", GAN)])
def test_resume_continues_bit_for_bit(tmp_path, model, extra):
    common = ["--model", model, "--frames", "3", *extra, "--out"]
    main([*common, str(tmp_path / "straight"), "--steps", "4", *FAST])
    main([*common, str(tmp_path / "resumed"), "--steps", "2", *FAST])
    main([*common, str(tmp_path / "resumed"), "--steps", "4", "--resume", *FAST])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for part in ["model", "disc"] if extra else ["model"]:
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    if extra:  # the discriminator's Adam moments too
        for i, s in a["opt_d"]["state"].items():
            assert torch.equal(s["exp_avg_sq"], b["opt_d"]["state"][i]["exp_avg_sq"]), i


@pytest.mark.parametrize("argv, message", [
    (["--model", "gan", "--out", "x"], "invalid choice"),
    (["--model", "cvivit", "--frames", "0", "--out", "x"], "--frames must be >= 1"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    code = main(["--model", "vqvae", "--data", "cifar10", "--data-dir", str(tmp_path / "none"), "--out",
                 str(tmp_path), *FAST])
    assert code == 2 and "CIFAR-10 python batches not found" in capsys.readouterr().err


@pytest.mark.parametrize("script, extra", [(["-m", "pvkernels_models.train"], []),
                                           (["tests/ddp_sync.py"], ["--gan-weight", "0.5"])], ids=["cli", "gan-sync"])
def test_ddp_two_gloo_processes(tmp_path, script, extra):
    """The CLI under torchrun; and with the GAN on, the model and the discriminator (each rank
    sees other data) end identical on both ranks (tests/ddp_sync.py checks)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script, "--model", "cvivit", "--frames", "3", "--steps", "2", "--out", str(tmp_path), *extra, *FAST]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoint.pt").is_file()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
