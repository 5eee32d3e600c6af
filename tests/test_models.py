"""pvkernels_models: shapes, fitting a batch, the sampler, VideoDiffusion = DDPM per frame at init (joint)
and on the last frame (autoregressive), the autoregressive mask and sampler, the frame-weighted loss,
frames=1, resume, CLI, DDP, bad arguments."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pvkernels_models.diffusion import DDPM, VideoDiffusion
from pvkernels_models.tokenizers import CViViT, VQVAE
from pvkernels_models.train import main

from .utils import assert_close

FAST = ["--image-size", "8", "--batch-size", "8", "--eval-samples", "16", "--timesteps", "5", "--no-progress"]
GAN = ["--gan-weight", "0.5", "--gan-start", "1"]


def make(name, frames=3):
    return {"vqvae": lambda: VQVAE(1, width=16, dim=8, codebook_size=16),
            "cvivit": lambda: CViViT(1, 8, frames, patch=4, dim=16, depth=1, heads=2, codebook_size=16),
            "ddpm": lambda: DDPM(1, 8, width=16, timesteps=10),
            "video-diffusion": lambda: VideoDiffusion(1, 8, frames, width=16, heads=2, timesteps=10),
            "video-diffusion-ar": lambda: VideoDiffusion(1, 8, frames, width=16, heads=2, timesteps=10,
                                                         generation="autoregressive")}[name]()


def batch(name, frames=3):
    return torch.rand(4, frames, 1, 8, 8) if name != "vqvae" and name != "ddpm" else torch.rand(4, 1, 8, 8)


@pytest.mark.parametrize("name", ["vqvae", "cvivit", "ddpm", "video-diffusion", "video-diffusion-ar"])
def test_twenty_steps_fit_a_fixed_batch(name):
    """A convergence check: 20 Adam steps on one batch (same noise every step) cut the loss to
    well under its start, and the last steps are below the first ones throughout."""
    model, x = make(name), batch(name)
    if name not in ("vqvae", "cvivit"):
        x = 2 * x - 1  # the diffusion models' scale
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model.loss(x, generator=torch.Generator().manual_seed(0))
        assert loss.dim() == 0 and loss.isfinite()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert max(losses[-5:]) < min(losses[:5]), losses


@pytest.mark.parametrize("name", ["vqvae", "cvivit"])
def test_tokenizer_shapes(name):
    model, x = make(name), batch(name)
    recon, codes, vq_loss = model(x)
    assert recon.shape == x.shape and recon.dtype == x.dtype and vq_loss.dim() == 0
    assert codes.dtype == torch.int64


def test_vqvae_with_t_codes_per_position_has_cvivits_codes_per_image():
    T = 3
    vqvae, cvivit = VQVAE(1, width=16, dim=8, codebook_size=16, groups=T), make("cvivit", frames=T)
    recon, codes, _ = vqvae(torch.rand(4, 1, 8, 8))
    assert recon.shape == (4, 1, 8, 8) and codes.shape == (4, 2, 2, T)
    assert codes[0].numel() == cvivit(batch("cvivit", T))[1][0].numel()  # 2x2 positions x T = T frames x 4 patches
    assert 0 <= codes.min() and codes.max() < 16


def _exact_denoiser(model, x0):
    """The epsilon that makes the x0 prediction exactly x0 (an oracle network)."""
    def denoise(x_t, t):
        ab = model.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    return denoise


@pytest.mark.parametrize("clip", ["last", "all"])
def test_sampler_with_an_exact_denoiser_returns_the_data_clipped_per_frame(clip):
    model = VideoDiffusion(1, 8, 3, width=16, heads=2, timesteps=10, clip_frames=clip)
    x0 = 2 * torch.rand(5, 3, 1, 8, 8) - 1
    x0[:, 0] *= 3  # a noise frame beyond [-1, 1]: kept with clip="last", clipped with "all"
    model.denoise = _exact_denoiser(model, x0)
    video = model.sample_video(5, generator=torch.Generator().manual_seed(1))
    expected = x0.clone() if clip == "last" else x0.clamp(-1, 1)
    expected[:, -1] = x0[:, -1].clamp(-1, 1)
    assert_close(video, expected, atol=1e-5, rtol=1e-5)
    assert video[:, 0].abs().max() > 1.5 if clip == "last" else video.abs().max() <= 1
    assert_close(model.sample(5, generator=torch.Generator().manual_seed(1)), (expected[:, -1] + 1) / 2,
                 atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("step", [2, 4, 8])
def test_posterior_step_maps_q_t_to_q_t_minus_1(step):
    """x_t ~ q(x_t | x0) through one sampler step is distributed as q(x_{t-1} | x0)."""
    model = DDPM(1, 2, width=8, timesteps=20)
    x0 = torch.tensor([0.9, -0.9, 0.3, -0.5]).view(1, 1, 2, 2)
    n = 100000
    ab, ab_prev = model.alpha_bar[step], model.alpha_bar[step - 1]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(n, 1, 2, 2)
    x_prev = model.posterior_step(x_t, x0.expand(n, -1, -1, -1), step, torch.randn(n, 1, 2, 2))
    resid = (x_prev - ab_prev.sqrt() * x0) / (1 - ab_prev).sqrt()  # ~ N(0, 1) per pixel
    assert resid.mean(0).abs().max() < 0.02 and (resid.std(0) - 1).abs().max() < 0.02


def test_video_diffusion_at_init_is_ddpm_on_every_frame():
    torch.manual_seed(3)
    ddpm = DDPM(1, 8, width=16, timesteps=10)
    torch.manual_seed(3)
    video = VideoDiffusion(1, 8, 3, width=16, heads=2, timesteps=10, backend="reference")
    shared = ddpm.state_dict()
    assert all(torch.equal(v, video.state_dict()[k]) for k, v in shared.items())  # the same seed, the same init
    assert len(video.temporal) == 3 and video.frame_emb.shape == (3, 64)
    x, t = torch.randn(4, 3, 1, 8, 8), torch.randint(0, 10, (4,))
    per_frame = ddpm.denoise(x.flatten(0, 1), t.repeat_interleave(3)).view_as(x)
    assert torch.equal(video.denoise(x, t), per_frame)
    # the zero projections still learn: one step makes the frames interact
    opt = torch.optim.SGD(video.parameters(), lr=0.1)
    video.loss(x).backward()
    assert all(m.attn.proj.weight.grad.abs().max() > 0 for m in video.temporal.values())
    opt.step()
    x_other = x.clone()
    x_other[:, 0] = torch.randn(4, 1, 8, 8)  # change frame 0 only
    out, out_other = video.denoise(x, t), video.denoise(x_other, t)
    assert not torch.equal(out[:, -1], out_other[:, -1])  # the last frame now sees frame 0
    with pytest.raises(ValueError, match="expected 3 frames"):
        video.denoise(torch.randn(4, 2, 1, 8, 8), t)


def _trained_ar(backend="reference", frames=3, steps=3):
    """An autoregressive VideoDiffusion after a few steps (its temporal projections no longer zero)."""
    torch.manual_seed(5)
    model = VideoDiffusion(1, 8, frames, width=16, heads=2, timesteps=6, generation="autoregressive",
                           backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = 2 * torch.rand(4, frames, 1, 8, 8) - 1
    for _ in range(steps):
        opt.zero_grad()
        model.loss(x).backward()
        opt.step()
    assert all(m.attn.proj.weight.abs().max() > 0 for m in model.temporal.values())
    return model


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_autoregressive_video_diffusion_at_init_is_ddpm_on_the_last_frame(backend):
    """As the joint model is DDPM on every frame at init, the autoregressive one is DDPM on every
    noisy frame, each at its own t, whatever the context: the last frame's diffusion is DDPM's."""
    torch.manual_seed(3)
    ddpm = DDPM(1, 8, width=16, timesteps=10)
    torch.manual_seed(3)
    ar = VideoDiffusion(1, 8, 3, width=16, heads=2, timesteps=10, generation="autoregressive", backend=backend)
    assert all(torch.equal(v, ar.state_dict()[k]) for k, v in ddpm.state_dict().items())
    assert all(m.attn.causal for m in ar.temporal.values())
    x, t = torch.randn(4, 3, 1, 8, 8), torch.randint(0, 10, (4, 3))
    eps = ar.denoise_given(torch.randn(4, 2, 1, 8, 8), x, t)
    assert torch.equal(eps[:, -1], ddpm.denoise(x[:, -1], t[:, -1]))
    assert torch.equal(eps, ddpm.denoise(x.flatten(0, 1), t.flatten()).view_as(x))
    # with one frame it is DDPM outright: the same loss for the same draws, the same samples
    torch.manual_seed(3)
    one = VideoDiffusion(1, 8, 1, width=16, heads=2, timesteps=10, generation="autoregressive", backend=backend)
    x0 = 2 * torch.rand(4, 1, 8, 8) - 1
    assert torch.equal(one.loss(x0.unsqueeze(1), torch.Generator().manual_seed(1)),
                       ddpm.loss(x0, torch.Generator().manual_seed(1)))
    assert torch.equal(one.sample(4, torch.Generator().manual_seed(2)), ddpm.sample(4, torch.Generator().manual_seed(2)))
    with pytest.raises(RuntimeError, match="denoise_given"):
        ar.denoise(x, t[:, 0])
    with pytest.raises(ValueError, match="generation"):
        VideoDiffusion(1, 8, 3, width=16, generation="parallel")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_autoregressive_frame_i_sees_the_clean_frames_before_it_and_itself_only(backend):
    model = _trained_ar(backend)
    context, x, t = torch.randn(4, 2, 1, 8, 8), torch.randn(4, 3, 1, 8, 8), torch.randint(0, 6, (4, 3))
    with torch.no_grad():
        eps = model.denoise_given(context, x, t)
        for what, j in (("context", 0), ("context", 1), ("noisy", 0), ("noisy", 1), ("noisy", 2)):
            c, n = context.clone(), x.clone()
            (c if what == "context" else n)[:, j] += 1
            changed = (model.denoise_given(c, n, t) - eps).flatten(2).abs().amax(2).amax(0) > 1e-6  # per frame
            # noisy frame i depends on context frames < i and on noisy frame i alone
            expected = [i > j if what == "context" else i == j for i in range(3)]
            assert changed.tolist() == expected, (what, j, changed)
    # the gradient reaches the relative-position bias through the masked attention, finite
    model.zero_grad()
    model.loss(2 * torch.rand(4, 3, 1, 8, 8) - 1).backward()
    assert all(m.attn.rel_bias.grad.abs().max() > 0 for m in model.temporal.values())
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_autoregressive_sampler_is_the_teacher_forced_model_frame_by_frame():
    """The sampler (the context's attention qkv computed once per frame, reused at every step)
    draws what the teacher-forced pass implies, frame by frame: the same video as a plain sampler
    calling denoise_given with the frames generated so far as context."""
    model = _trained_ar()
    model.clip_frames = "all"  # (an unclipped frame of a barely trained model runs off to +-1000s)
    n, T, shape = 5, 3, (5, 1, 8, 8)
    gen = torch.Generator().manual_seed(7)
    frames = []
    with torch.no_grad():
        for k in range(T):
            context = torch.zeros(n, T - 1, 1, 8, 8)  # frames >= k: masked out, any value
            context[:, :k] = torch.stack(frames, 1) if k else context[:, :0]
            x = torch.randn(shape, generator=gen)
            for step in range(model.timesteps - 1, -1, -1):
                noisy = torch.zeros(n, T, 1, 8, 8)
                noisy[:, k] = x
                eps = model.denoise_given(context, noisy, torch.full((n, T), step))[:, k]
                ab = model.alpha_bar[step]
                x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
                x0 = x0.clamp(-1, 1)
                x = model.posterior_step(x, x0, step, torch.randn(shape, generator=gen) if step else None)
            frames.append(x)
    calls = []
    video = model.sample_video(n, torch.Generator().manual_seed(7), progress=lambda d, total: calls.append((d, total)))
    assert_close(video, torch.stack(frames, 1), atol=1e-5, rtol=1e-5)
    assert calls[-1] == (T * model.timesteps, T * model.timesteps) and len(calls) == T * model.timesteps


@pytest.mark.parametrize("name", ["cvivit", "video-diffusion"])
def test_video_loss_is_last_frame_plus_lambda_times_the_mean_of_the_others(name):
    sq = torch.rand(4, 3, 1, 8, 8)
    per_frame = sq.mean((0, 2, 3, 4))
    for lam in (None, 1.0, 0.0):
        model = (CViViT(1, 8, 3, patch=4, dim=16, depth=1, heads=2, codebook_size=16, other_weight=lam)
                 if name == "cvivit" else VideoDiffusion(1, 8, 3, width=16, heads=2, timesteps=10, other_weight=lam))
        expected = per_frame[-1] + (0.5 if lam is None else lam) * per_frame[:-1].mean()
        if name == "video-diffusion":
            assert torch.allclose(model.weigh(sq), expected)
        else:  # the reconstruction's squared error through CViViT.loss
            recon = torch.rand(4, 3, 1, 8, 8)
            model.forward = lambda v: (recon, None, torch.zeros(()))
            target = recon + sq.sqrt()
            assert torch.allclose(model.loss(target), expected, atol=1e-6)
    with pytest.raises(ValueError, match="other_weight"):
        VideoDiffusion(1, 8, 3, width=16, other_weight=-1.0)


def test_cvivit_with_one_frame_is_an_image_tokenizer():
    model = make("cvivit", frames=1)
    x = torch.rand(4, 1, 8, 8)
    recon, codes, _ = model(x.unsqueeze(1))
    assert recon.shape == (4, 1, 1, 8, 8) and codes.shape == (4, 1, 4)
    with pytest.raises(ValueError, match="frames"):
        model(torch.rand(4, 2, 1, 8, 8))


@pytest.mark.parametrize("model", ["vqvae", "cvivit", "ddpm", "video-diffusion", "video-diffusion-ar"])
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


@pytest.mark.parametrize("model, extra", [("cvivit", []), ("video-diffusion", []), ("video-diffusion-ar", []),
                                          ("vqvae", GAN), ("cvivit", GAN)])
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


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_of_a_complete_run_says_so_and_leaves_its_files(tmp_path, capsys):
    run = ["--model", "vqvae", "--out", str(tmp_path), *FAST]
    assert main([*run, "--steps", "2"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    before = snapshot(tmp_path)
    for steps in ("2", "1"):  # reached, and past
        assert main([*run, "--steps", steps, "--resume"]) == 0
        out, err = capsys.readouterr()
        assert f"{tmp_path} is complete: its checkpoint is at step 2 of --steps {steps}; nothing to do" in err
        assert json.loads(out) == evaluated  # its evaluation, as it was printed when it ended
        assert snapshot(tmp_path) == before  # no second evaluation in metrics.jsonl, nothing rewritten
    assert main([*run, "--steps", "3", "--resume"]) == 0  # a larger --steps trains on
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3


def test_resume_with_other_model_flags_exits_2_naming_them(tmp_path, capsys):
    run = ["--out", str(tmp_path), "--steps", "2", "--resume", *FAST]
    assert main(["--model", "cvivit", "--frames", "3", "--steps", "1", "--out", str(tmp_path), *FAST]) == 0
    before = snapshot(tmp_path)
    for flags, named in [(["--model", "cvivit", "--frames", "2"], "trained with --frames 3, not --frames 2"),
                         (["--model", "vqvae"],
                          "trained with --model cvivit, --frames 3, not --model vqvae, --frames 1"),
                         (["--model", "cvivit", "--frames", "3", "--image-size", "16"],
                          "trained with --image-size 8, not --image-size 16")]:
        assert main([*run, *flags]) == 2, flags  # (flags last: FAST has an --image-size)
        err = capsys.readouterr().err
        assert f"pvkernels-train: error: --resume: {tmp_path / 'checkpoint.pt'} holds a model {named}" in err, err
    assert snapshot(tmp_path) == before
    assert main(["--model", "cvivit", "--frames", "3", "--lr", "1e-4", *run]) == 0  # other flags may change


@pytest.mark.parametrize("make, error, message", [
    (lambda: VQVAE(0), ValueError, "VQVAE: channels must be >= 1, got 0"),
    (lambda: VQVAE(3, width=64.0), TypeError, "VQVAE: width must be an int, got 64.0"),
    (lambda: VQVAE(3, groups=0), ValueError, "VQVAE: groups must be >= 1, got 0"),
    (lambda: CViViT(depth=0), ValueError, "CViViT: depth must be >= 1, got 0"),
    (lambda: CViViT(frames=0), ValueError, "CViViT: frames must be >= 1, got 0"),
    (lambda: DDPM(width=True), TypeError, "DDPM: width must be an int, got True"),
    (lambda: DDPM(timesteps=0), ValueError, "DDPM: timesteps must be >= 1, got 0"),
    (lambda: VideoDiffusion(heads=0), ValueError, "VideoDiffusion: heads must be >= 1, got 0"),
    (lambda: VideoDiffusion(image_size=16.0), TypeError, "VideoDiffusion: image_size must be an int, got 16.0"),
], ids=["vqvae-channels", "vqvae-float-width", "vqvae-groups", "cvivit-depth", "cvivit-frames", "ddpm-bool-width",
        "ddpm-timesteps", "video-diffusion-heads", "video-diffusion-float-size"])
def test_models_check_their_sizes(make, error, message):
    # the wrappers' widths and counts are ints >= 1, each error naming the model and the argument
    with pytest.raises(error) as exc:
        make()
    assert str(exc.value) == message
