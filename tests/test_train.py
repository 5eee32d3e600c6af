"""The training CLI's pseudo videos (--aug/--order/--schedule), backend, recipe, exit codes, --help,
progress and what it says."""
import argparse
import io
import json
import os
import re
import sys

import pytest
import torch

import pvkernels
from pvkernels import schedules
from pvkernels_models import train
from pvkernels_models.train import Trainer, main, parse_args, pseudo_video_params

from .utils import assert_close

FAST = ["--image-size", "8", "--batch-size", "8", "--eval-samples", "16", "--timesteps", "5", "--no-progress",
        "--width", "16"]


def args_of(*argv):
    return parse_args(["--model", "video-diffusion", "--out", "x", *argv])


@pytest.mark.parametrize("argv, expected", [
    ([], schedules.linear_blur(4, 2.0, "high")),
    (["--order", "first"], schedules.linear_blur(4, 2.0, "first")),
    (["--schedule", "geometric", "--order", "first"], schedules.geometric_blur(4, 2.0, order="first")),
    (["--aug", "noise"], schedules.ddpm_noise(4, "linear", "high")),
    (["--aug", "noise", "--schedule", "cosine", "--order", "first"], schedules.ddpm_noise(4, "cosine", "first")),
    (["--aug", "blur+noise", "--schedule", "cosine", "--sigma-max", "1.5"],
     schedules.combine(schedules.linear_blur(4, 1.5), schedules.ddpm_noise(4, "cosine"))),
    (["--aug", "blur+noise", "--order", "first"],
     schedules.combine(schedules.linear_blur(4, 2.0, "first"), schedules.ddpm_noise(4, "linear", "first"))),
    (["--aug", "identity"], None),
])
def test_aug_order_schedule_give_the_schedules_parameters(argv, expected):
    assert pseudo_video_params(args_of("--frames", "4", *argv)) == expected


@pytest.mark.parametrize("argv, message", [
    (["--aug", "blur", "--schedule", "cosine"], "--aug blur takes --schedule linear or geometric, got cosine"),
    (["--aug", "noise", "--schedule", "geometric"], "--aug noise takes --schedule linear or cosine"),
    (["--aug", "blur+noise", "--schedule", "geometric"], "--aug blur+noise takes --schedule linear or cosine"),
    (["--aug", "identity", "--schedule", "linear"], "--aug identity takes no --schedule"),
    (["--model", "cvivit", "--aug", "noise"], "the tokenizers reconstruct in [0, 1]"),
    (["--model", "cvivit", "--codes-per-position", "4"], "--codes-per-position is a vqvae option"),
    (["--other-weight", "-1"], "--other-weight must be >= 0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--width", "12"], "--width must be a positive multiple of 8"),
    (["--eval-samples", "2"], "--eval-samples must be >= 3"),
    (["--backend", "cuda"], "invalid choice"),
])
def test_bad_combinations_exit_2_naming_the_flag(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # (a check that let one through would train one quick step)
        main(["--model", "video-diffusion", "--steps", "1", *FAST, *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def trainer(tmp_path, *argv):
    return Trainer(parse_args([*argv, "--out", str(tmp_path), *FAST]))


def test_pseudo_videos_are_on_the_models_scale_unclamped(tmp_path):
    images = torch.rand(64, 1, 8, 8)
    noise = trainer(tmp_path, "--model", "video-diffusion", "--frames", "4", "--aug", "noise")
    video = noise.make_input(images, 0)
    assert torch.equal(video[:, -1], 2 * images - 1)  # the image, on [-1, 1]
    assert video.min() < -1.5 and video.max() > 1.5  # Gaussian noise frames, not clamped
    assert abs(video[:, 0].mean()) < 0.1  # frame 0 is nearly pure noise around the mid grey, not black
    first = trainer(tmp_path / "f", "--model", "video-diffusion", "--frames", "4", "--aug", "noise", "--order", "first")
    assert not torch.equal(first.make_input(images, 0)[:, :-1], video[:, :-1])
    identity = trainer(tmp_path / "i", "--model", "video-diffusion", "--frames", "3", "--aug", "identity")
    assert torch.equal(identity.make_input(images, 0), (2 * images - 1).unsqueeze(1).expand(-1, 3, -1, -1, -1))
    blur = trainer(tmp_path / "b", "--model", "cvivit", "--frames", "3")  # the tokenizers' scale: [0, 1]
    assert torch.equal(blur.make_input(images, 0)[:, -1], images)
    assert blur.model.other_weight == 0.5 and identity.model.clip_frames == "all" and noise.model.clip_frames == "last"


def test_backend_reaches_every_op_and_the_environment_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("PVKERNELS_BACKEND", raising=False)
    seen = []
    real = pvkernels.pseudo_video
    monkeypatch.setattr(pvkernels, "pseudo_video", lambda *a, **kw: seen.append(kw["backend"]) or real(*a, **kw))
    for model in ("cvivit", "video-diffusion", "vqvae"):
        t = trainer(tmp_path / model, "--model", model, "--frames", "3", "--backend", "reference")
        backends = {m.backend for m in t.model.modules() if hasattr(m, "backend")}
        assert backends == {"reference"}, (model, backends)
    assert main(["--model", "cvivit", "--frames", "2", "--steps", "1", "--backend", "reference",
                 "--out", str(tmp_path / "run"), *FAST]) == 0
    assert "PVKERNELS_BACKEND" not in os.environ and seen and set(seen) == {"reference"}


def test_an_error_while_training_is_raised_not_exit_2(tmp_path, monkeypatch):
    def boom(self, x):
        raise ValueError("a bug in a training step")
    monkeypatch.setattr(Trainer, "train_step", boom)
    with pytest.raises(ValueError, match="a bug in a training step"):
        main(["--model", "ddpm", "--steps", "1", "--out", str(tmp_path), *FAST])
    assert main(["--model", "ddpm", "--steps", "1", "--resume", "--out", str(tmp_path / "none"), *FAST]) == 2


def test_recipe_warmup_clipping_ema_and_separate_generators(tmp_path, monkeypatch):
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, c: clipped.append(c) or real_clip(p, c))
    t = trainer(tmp_path, "--model", "ddpm", "--steps", "3", "--warmup", "4", "--lr", "1e-3", "--grad-clip", "0.5",
                "--ema-decay", "0.9")
    lrs = []
    for _ in range(3):
        before = t.ema.out[2].weight.clone()
        t.train_step(t.make_input(t.images[:8], t.step))
        lrs.append(t.opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4]) and clipped == [0.5] * 3
    decay = min(0.9, (1 + 2) / (10 + 2))  # the ramp at the third step
    assert_close(t.ema.out[2].weight, before + (1 - decay) * (t.model.out[2].weight - before))
    # a seed gives DDPM and its video counterpart the same data order and the same shared init
    image, video = (trainer(tmp_path / m, "--model", m, "--frames", "3", "--aug", "noise", "--steps", "2",
                            "--seed", "5") for m in ("ddpm", "video-diffusion"))
    assert all(torch.equal(v, video.model.state_dict()[k]) for k, v in image.model.state_dict().items())
    image.train(), video.train()
    assert torch.equal(image.data_gen.get_state(), video.data_gen.get_state())
    assert not torch.equal(image.noise_gen.get_state(), video.noise_gen.get_state())


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def terminal(monkeypatch) -> Terminal:
    """Makes stderr a terminal from here on in the test (a fixture cannot: pytest's capture resets sys.stderr)."""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv("COLUMNS", "200")  # no status cut to the terminal's width
    return term


@pytest.fixture
def quick_classifier(monkeypatch):
    """A fresh process's caches, and the offline-metric classifier fitted in 3 steps (not 300)."""
    real = train.train_classifier
    monkeypatch.setattr(train, "train_classifier", lambda *a, **kw: real(*a, **kw, steps=3))
    monkeypatch.setattr(train, "_CLASSIFIERS", {})
    monkeypatch.setattr(train, "_INCEPTIONS", {})


def statuses(err: str) -> list:
    """Every state the progress lines went through, in order."""
    return [s.rstrip() for s in err.replace("\n", "\r").split("\r") if s.strip()]


def screen(err: str) -> list:
    """The lines a terminal shows at the end (a carriage return goes back to overwrite)."""
    return [line.split("\r")[-1].rstrip() for line in err.split("\n")]


PROGRESS = [a for a in FAST if a != "--no-progress"]


def test_progress_runs_through_the_evaluation_on_a_terminal(tmp_path, monkeypatch, quick_classifier):
    stderr = terminal(monkeypatch)
    assert main(["--model", "ddpm", "--steps", "2", "--out", str(tmp_path), *PROGRESS]) == 0
    err = stderr.getvalue()
    train_line, note, eval_line, rest = screen(err)  # training, the FID note on a line of its own, evaluation
    assert re.fullmatch(r"\[#{30}\] step 2/2 loss [0-9.]+", train_line) and rest == ""
    assert note.startswith("pvkernels-train: FID (InceptionV3) unavailable")
    assert re.fullmatch(r"\[#{30}\] eval \(EMA\): done in [0-9.]+ s", eval_line)
    shown = statuses(err)
    for stage in ("eval (EMA): sampling 16 images, step 5/5", "eval (EMA): fitting the offline metrics' "
                  "classifier (once per process), step 3/3", "eval (EMA): offline FID and KID", "drawing samples.png"):
        assert any(s.endswith(stage) for s in shown), (stage, shown)


@pytest.mark.parametrize("tty", [False, True], ids=["not a terminal", "--no-progress"])
def test_no_progress_off_a_terminal_or_with_no_progress(tmp_path, monkeypatch, capsys, tty):
    monkeypatch.setattr(train, "_INCEPTIONS", {None: None})  # (the FID note said already)
    argv = ["--model", "vqvae", "--steps", "2", "--out", str(tmp_path), *PROGRESS]
    if tty:
        terminal(monkeypatch)
        argv.append("--no-progress")
    assert main(argv) == 0
    assert (sys.stderr.getvalue() if tty else capsys.readouterr().err) == ""


@pytest.mark.parametrize("model", ["vqvae", "cvivit", "ddpm", "video-diffusion", "video-diffusion-ar"])
def test_a_backend_that_cannot_run_here_exits_2_with_the_reason_for_every_model(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (conftest sets it on a CPU machine)
    monkeypatch.setattr(pvkernels, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend, reason in (("triton", "the Triton kernels need a CUDA GPU and torch sees none"),
                            ("cpp", None)):
        if backend == "cpp":  # on a GPU machine the model trains on CUDA, where the C++ kernels cannot
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            reason = "the C++ kernels take CPU tensors"
        with pytest.raises(SystemExit) as exc:
            main(["--model", model, "--steps", "1", "--backend", backend, "--out", str(out), *FAST])
        assert exc.value.code == 2 and f"--backend {backend}: {reason}" in capsys.readouterr().err
    monkeypatch.setattr(pvkernels, "triton_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--model", model, "--backend", "triton", "--out", str(out), *FAST])
    assert "--backend triton: triton is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_video_diffusion_ar_is_the_autoregressive_model_with_the_joint_models_start(tmp_path):
    """--model video-diffusion-ar: VideoDiffusion(generation="autoregressive"), causal in time, with
    the joint model's initial weights and first pseudo videos for the same seed (later ones differ:
    its loss draws a t per frame from the same noise stream)."""
    made = {}
    for model in ("video-diffusion", "video-diffusion-ar"):
        made[model] = Trainer(parse_args(["--model", model, "--frames", "3", "--aug", "noise", "--out",
                                          str(tmp_path / model), *FAST]))
    joint, ar = made["video-diffusion"], made["video-diffusion-ar"]
    assert ar.model.autoregressive and not joint.model.autoregressive
    assert ar.model.generation == "autoregressive" and ar.model.clip_frames == "last"
    assert [m.attn.causal for m in ar.model.temporal.values()] == [True] * 3
    assert all(torch.equal(v, ar.model.state_dict()[k]) for k, v in joint.model.state_dict().items())
    images = torch.rand(4, 1, 8, 8)
    assert torch.equal(joint.make_input(images, 0), ar.make_input(images, 0))
    assert train.NAMES["video-diffusion-ar"].startswith("VideoDiffusion-AR")


def test_tokenizers_report_the_reconstruction_fid_of_the_last_frame(tmp_path, quick_classifier, monkeypatch):
    """The paper's tokenizer metric beside PSNR: the offline FID of the last frames of the
    reconstructions against every image; a perfect reconstruction scores the originals' own FID.
    (CViViT: VQVAE's images take the same path, as one-frame videos' last frames.)"""
    trainer = Trainer(parse_args(["--model", "cvivit", "--frames", "3", "--steps", "1", "--out", str(tmp_path), *FAST]))
    record = trainer.evaluate()
    assert {"psnr_last_frame", "offline_fid", "offline_kid", "offline_fid_originals"} <= set(record)
    assert record["offline_fid"] > record["offline_fid_originals"] >= 0
    assert "reconstructions of 16 images" in record["offline_note"] and "fid_inception" not in record
    exact = trainer.ema.forward  # the EMA weights are evaluated: make them reconstruct exactly
    trainer.ema.forward = lambda x: (x, *exact(x)[1:])
    perfect = trainer.evaluate()
    assert perfect["psnr_last_frame"] == 100  # (clamped: +inf)
    assert perfect["offline_fid"] == pytest.approx(perfect["offline_fid_originals"], rel=1e-9)
    assert perfect["offline_fid_originals"] == record["offline_fid_originals"]
    # with InceptionV3's weights, its FID of the same last frames against the originals (the real
    # network's FID is tested in test_metrics; a stand-in here, 299x299 Inception is slow on a CPU)
    seen = []
    inception = torch.nn.Identity()
    monkeypatch.setattr(train, "_inception", lambda *a, **kw: inception)
    monkeypatch.setattr(train, "fid", lambda real, fake, net: seen.append((real, fake, net)) or 12.5)
    record = trainer.evaluate()
    real, fake, net = seen[0]
    assert record["fid_inception"] == 12.5 and net is inception and real.shape == fake.shape == (16, 1, 8, 8)
    assert torch.equal(fake, real) and "16 reconstructions" in record["fid_note"]  # (still the exact ones)


def test_a_failed_run_leaves_no_out_folder(tmp_path, capsys):
    for bad in (["--data", "cifar10", "--data-dir", str(tmp_path / "none")], ["--resume"],
                ["--inception-weights", str(tmp_path / "none.pth")]):
        assert main(["--model", "ddpm", "--steps", "1", "--out", str(tmp_path / "run"), *FAST, *bad]) == 2
        assert "pvkernels-train: error:" in capsys.readouterr().err and not (tmp_path / "run").exists(), bad


def help_blocks(text: str) -> dict:
    """--help's text per option: {"--steps": "--steps STEPS optimiser steps ... (default: 200)"}."""
    blocks, current = {}, None
    for line in text.splitlines():
        flag = re.match(r"\s{2}(-{1,2}[\w-]+)", line)
        if flag:
            current = flag.group(1)
            blocks[current] = ""
        if current is not None and line.startswith("  "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    blocks = help_blocks(capsys.readouterr().out)
    assert "(default: 200)" in blocks["--steps"] and "(default: 16)" in blocks["--image-size"]
    defaults = [a for a in train.build_parser()._actions if a.option_strings
                and a.default is not None and a.default is not False and a.default != argparse.SUPPRESS]
    assert len(defaults) == 23  # (--seed 0 and the 0 weights too)
    for action in defaults:
        assert f"(default: {action.default})" in blocks[action.option_strings[-1]], action.option_strings
    assert "(default: None)" not in str(blocks) and "(default: False)" not in str(blocks)


def test_kid_is_shown_with_its_scale(tmp_path, monkeypatch, quick_classifier, capsys):
    drawn = []
    monkeypatch.setattr(train, "image_grid", lambda path, title, sections: drawn.append(sections))
    assert main(["--model", "ddpm", "--steps", "1", "--out", str(tmp_path), *FAST]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["offline_note"].endswith("KID: the plain value, not x 1000")
    heading = drawn[0][-1][0]  # the samples' heading in samples.png
    assert re.fullmatch(r"samples: offline FID [0-9.]+, KID [0-9.e+-]+ \(the plain value, not x 1000\)", heading)


def test_a_status_wider_than_the_terminal_loses_its_middle(monkeypatch):
    stderr = terminal(monkeypatch)
    monkeypatch.setenv("COLUMNS", "40")
    progress = train.Progress(prefix="[1/4] video-diffusion: ", bar_width=10)
    progress.show(progress.bar(5, 300) + " fitting the classifier, step 5/300")
    progress.say("a note")
    progress.close("the last state of a run, whole: it is not rewritten")
    cut = "[1/4] video-diffusion:...er, step 5/300"
    last = "[1/4] video-diffusion: the last state of a run, whole: it is not rewritten"
    assert len(cut) == 39 and stderr.getvalue() == f"\r{cut}\r{' ' * 39}\ra note\n{cut}\r{last}\n"
