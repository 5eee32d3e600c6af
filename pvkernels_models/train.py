"""Training CLI for the image models and their pseudo-video counterparts.

    python -m pvkernels_models.train --model cvivit --frames 4 --aug blur --steps 200 --out runs/cvivit

Writes DIR/metrics.jsonl (JSON lines), DIR/checkpoint.pt (atomically), DIR/samples.png (labelled).
``--resume`` continues bit for bit from DIR/checkpoint.pt, with the flags that shape its model
(``MODEL_FLAGS``: another --model, --frames, ... exits 2 naming them); a run that has reached
--steps is complete and left as it is (exit 0). Under ``torchrun`` it trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 writes the files. On a terminal a
progress line on stderr follows the training and the evaluation (sampling, the metrics).

One recipe for every model: Adam with a linear learning-rate warm-up, gradient-norm clipping,
an EMA of the weights that is what gets evaluated, and two generators per run: one for the
data order, one for the noise (diffusion t and epsilon, pseudo-video seeds), so a seed gives
an image model and its video counterpart the same data in the same order. The diffusion
models work on the [-1, 1] scale, and pseudo videos are built there, unclamped (noise frames
decay to the mid grey, not to black); the tokenizers work on [0, 1] (sigmoid outputs), so they
take blur (or identity) pseudo videos only.

The tokenizers take two optional loss terms on the last frame (the image): a PatchGAN hinge
loss (``--gan-weight``, from ``--gan-start``) and an LPIPS perceptual loss
(``--perceptual-weight``, needs torchvision's VGG16 weights file). The last frames of diffusion
samples and of tokenizer reconstructions (the paper's reconstruction FID; the tokenizers' PSNR
beside it) are scored with the offline FID and KID (on a small digits classifier's features,
against every image of the data set; KID as computed, not x 1000) and, when pytorch-fid's weights
file is found, with FID on InceptionV3 features.
Exit status 2 means bad arguments (or files they name that are missing); an error while
training is raised as itself.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import pvkernels
from pvkernels import schedules

from .data import DownloadError, load_dataset, sample_batch
from .diffusion import DDPM, VideoDiffusion
from .figures import image_grid, video_rows
from .losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, last_frame, load_lpips
from .metrics import (KID_SCALE, fid, find_inception_weights, frechet_distance, offline_scores, psnr,
                      train_classifier)
from .pretrained import INCEPTION_FILE, load_inception
from .tokenizers import CViViT, VQVAE

MODELS = ("vqvae", "cvivit", "ddpm", "video-diffusion", "video-diffusion-ar")
VIDEO_MODELS = ("cvivit", "video-diffusion", "video-diffusion-ar")
TOKENIZERS = ("vqvae", "cvivit")
AUGS = ("blur", "noise", "blur+noise", "identity")
# --schedule per --aug (the first is the default); for blur+noise it names the noise's, the blur is linear
SCHEDULES = {"blur": ("linear", "geometric"), "noise": ("linear", "cosine"), "blur+noise": ("linear", "cosine"),
             "identity": ()}
NAMES = {"vqvae": "VQVAE (image)", "cvivit": "CViViT (pseudo video)", "ddpm": "DDPM (image)",
         "video-diffusion": "VideoDiffusion (pseudo video)",
         "video-diffusion-ar": "VideoDiffusion-AR (pseudo video, autoregressive)"}

# the flags that decide the model's parameters (their shapes; --data its channels): --resume keeps them
MODEL_FLAGS = ("model", "frames", "image_size", "width", "timesteps", "codes_per_position", "data")


class Progress:
    """One status line on stderr, rewritten in place: the training bar, then each stage of the
    evaluation. Off when ``enabled`` is False or stderr is not a terminal (a log file gets no
    carriage returns).

    Args:
        enabled: False turns it off (``--no-progress``, ranks other than 0).
        prefix: put before every status (the demo's "[2/4] cvivit, seed 0: ").
        one_line: keep the training and the evaluation of a run on one line; the caller ends it
            with :meth:`close` (the demo: one line per run).
        bar_width: characters of the bar (``bar``).
    """

    def __init__(self, enabled: bool = True, prefix: str = "", one_line: bool = False, bar_width: int = 30):
        self.stream = sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled and isatty is not None and isatty())
        self.prefix, self.one_line, self.bar_width = prefix, one_line, bar_width
        self._shown, self._last, self._line = 0, 0.0, ""

    def show(self, text: str, force: bool = False, cut: bool = True) -> None:
        """Replaces the line by prefix + text (at most every 0.1 s unless forced: a small model's
        steps are faster than a terminal wants redrawing), cut to the terminal's width in the
        middle (a wrapped line cannot be rewritten: a carriage return goes back to its last row only)."""
        if not (force and self.enabled or self.due()):
            return
        line = self.prefix + text
        width = shutil.get_terminal_size().columns - 1
        if cut and len(line) > width:  # the middle goes: the end holds the counts ("step 37/100")
            line = line[: max(width - 17, 0)] + "..." + line[-14:]
        self.stream.write("\r" + line.ljust(self._shown))  # blanks what a longer line left
        self.stream.flush()
        self._shown, self._last, self._line = len(line), time.perf_counter(), line

    def due(self) -> bool:
        """Whether a status would be drawn now (on, and 0.1 s since the last)."""
        return self.enabled and time.perf_counter() - self._last >= 0.1

    def bar(self, done: int, total: int) -> str:
        """``[#####     ]``: done of total."""
        return f"[{'#' * int(self.bar_width * done / max(total, 1)):<{self.bar_width}}]"

    def end(self) -> None:
        """Ends the line (a new status starts a new one), unless ``one_line``."""
        if not self.one_line:
            self.close()

    def say(self, text: str) -> None:
        """Prints ``text`` to stderr on a line of its own (always: it is not progress), and the
        status line again under it."""
        drawn = self.enabled and self._shown
        if drawn:
            self.stream.write("\r" + " " * self._shown + "\r")
        print(text, file=self.stream, flush=True)
        if drawn:
            self.stream.write(self._line)
            self.stream.flush()

    def close(self, text: str | None = None) -> None:
        """Shows ``text`` (if given; whole, as it is not rewritten) and ends the line."""
        if text is not None:
            self.show(text, force=True, cut=False)
        if self.enabled and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, where it has one: a default of None (the flag's help
    says what happens) or of an off switch says nothing and is left out."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pvkernels-train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", choices=MODELS, required=True,
                   help="what to train; video-diffusion generates the frames jointly (one t), video-diffusion-ar "
                        "autoregressively (frame t by its own diffusion given frames < t)")
    p.add_argument("--frames", type=int, default=4, help="pseudo-video length (video models)")
    p.add_argument("--aug", choices=AUGS, default="blur",
                   help="pseudo-video frames: blur, noise (DDPM), blur+noise, or identity (T copies: the control)")
    p.add_argument("--order", choices=("first", "high"), default="high",
                   help="first: a Markov chain from the image; high: every frame from the image (same marginals)")
    p.add_argument("--schedule", choices=("linear", "geometric", "cosine"), default=None,
                   help="blur: linear|geometric; noise: linear|cosine (DDPM); blur+noise: the noise's "
                        "linear|cosine (blur linear); default linear")
    p.add_argument("--sigma-max", type=float, default=2.0, help="strongest blur (frame 0)")
    p.add_argument("--other-weight", type=float, default=None, metavar="LAMBDA",
                   help="video models: loss = L_last + LAMBDA * mean(L_other frames); default 1/(T-1)")
    p.add_argument("--codes-per-position", type=int, default=1,
                   help="vqvae: codes per latent position (T of them match CViViT's codes per image)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (the total, also with --resume)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (per process under torchrun)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate after the warm-up")
    p.add_argument("--warmup", type=int, default=50, help="steps of linear learning-rate warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA of the weights, evaluated (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order and noise")
    p.add_argument("--backend", choices=pvkernels.BACKENDS, default="auto", help="of every pvkernels op")
    p.add_argument("--data", default="digits", help="digits | cifar10 | folder:PATH")
    p.add_argument("--data-dir", default=None, help="where the CIFAR-10 python batches are")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR-10 into --data-dir first if it is not there (needs the network)")
    p.add_argument("--image-size", type=int, default=16, help="images are resized to this side")
    p.add_argument("--timesteps", type=int, default=100, help="diffusion steps")
    p.add_argument("--width", type=int, default=32, help="diffusion U-Net width (a multiple of 8)")
    p.add_argument("--out", required=True, help="output directory (made once the arguments are checked)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt, with the flags that shape its model")
    p.add_argument("--log-every", type=int, default=10, help="steps between lines of OUT/metrics.jsonl")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (and one at the end)")
    p.add_argument("--eval-samples", type=int, default=256,
                   help="images reconstructed (tokenizers) or samples drawn (diffusion) for the metrics")
    g = p.add_argument_group("tokenizer loss terms (vqvae, cvivit; on the last frame)")
    g.add_argument("--gan-weight", type=float, default=0.0,
                   help="PatchGAN hinge loss, times VQGAN's adaptive weight (0 = off)")
    g.add_argument("--gan-start", type=int, default=0, help="step from which the GAN term and discriminator train")
    g.add_argument("--perceptual-weight", type=float, default=0.0, help="LPIPS (VGG16) loss weight (0 = off)")
    g.add_argument("--perceptual-weights", default=None, metavar="PATH",
                   help="torchvision's vgg16-397923af.pth (default: the torch hub cache)")
    g.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="the lpips package's vgg.pth channel weights (default: an installed lpips; else uniform)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth for the FID of diffusion samples and "
                        "tokenizer reconstructions "
                        "(default: $PVKERNELS_INCEPTION_WEIGHTS, then the torch hub cache)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress line on stderr (it is off anyway when stderr is not a terminal)")
    return p


def pseudo_video_params(args) -> dict | None:
    """The per-frame parameters of --aug/--order/--schedule for --frames frames (None: identity).

    Raises:
        ValueError: a --schedule that --aug does not take.
    """
    T, kinds = args.frames, SCHEDULES[args.aug]
    if args.schedule is not None and args.schedule not in kinds:
        takes = f"takes --schedule {' or '.join(kinds)}" if kinds else "takes no --schedule"
        raise ValueError(f"--aug {args.aug} {takes}, got {args.schedule}")
    if args.aug == "identity":
        return None
    schedule = args.schedule or kinds[0]
    noise = schedules.ddpm_noise(T, schedule, args.order) if "noise" in args.aug else None
    if "blur" in args.aug:
        blur = (schedules.geometric_blur(T, args.sigma_max, order=args.order) if schedule == "geometric"
                else schedules.linear_blur(T, args.sigma_max, args.order))
        return schedules.combine(blur, noise) if noise else blur
    return noise


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Every usage error, reported by ``parser.error`` (exit status 2) before anything runs."""
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    for flag in ("gan_weight", "gan_start", "perceptual_weight", "warmup", "grad_clip"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.other_weight is not None and not args.other_weight >= 0:
        parser.error(f"--other-weight must be >= 0, got {args.other_weight}")
    if args.width < 8 or args.width % 8:
        parser.error(f"--width must be a positive multiple of 8 (GroupNorm's groups), got {args.width}")
    if args.eval_samples < 3:
        parser.error(f"--eval-samples must be >= 3, got {args.eval_samples}")
    if args.model not in TOKENIZERS and (args.gan_weight > 0 or args.perceptual_weight > 0):
        parser.error(f"--gan-weight and --perceptual-weight apply to the tokenizers (vqvae, cvivit), not {args.model}")
    if args.codes_per_position != 1 and args.model != "vqvae":
        parser.error(f"--codes-per-position is a vqvae option, not {args.model}'s")
    if args.codes_per_position < 1:
        parser.error(f"--codes-per-position must be >= 1, got {args.codes_per_position}")
    if args.model in TOKENIZERS and "noise" in args.aug:
        parser.error(f"--aug {args.aug}: the tokenizers reconstruct in [0, 1] (sigmoid) and cannot represent "
                     "unclamped noise frames; use --aug blur or identity, or a diffusion model")
    try:
        pseudo_video_params(args)
    except ValueError as exc:
        parser.error(str(exc))
    problem = backend_problem(args.backend)
    if problem:
        parser.error(f"--backend {args.backend}: {problem}")


def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run this process's training (it trains on CUDA when torch sees a
    GPU, else on the CPU), or None. Every model is refused alike, also DDPM (no pvkernels op)."""
    if backend == "triton":
        if not pvkernels.triton_available():
            return "triton is not installed (pip install 'pvkernels[triton]')"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return ("the Triton kernels need a CUDA GPU and torch sees none (TRITON_INTERPRET=1 runs them on the "
                    "CPU, slowly); use --backend auto, cpp or reference")
    if backend == "cpp":
        if torch.cuda.is_available():
            return "the C++ kernels take CPU tensors, and with a CUDA GPU the model trains on it; use auto or triton"
        if not pvkernels.cpp_available():
            return "the C++ extension is unavailable (pvkernels said why at import); use auto or reference"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI's arguments, checked (usage errors exit 2), with frames = 1 for the image models."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.model in ("vqvae", "ddpm"):
        args.frames = 1
    return args


def build_model(args, channels: int) -> torch.nn.Module:
    size, backend = args.image_size, args.backend
    if args.model == "vqvae":
        return VQVAE(channels, groups=args.codes_per_position, backend=backend)
    if args.model == "cvivit":
        return CViViT(channels, size, args.frames, other_weight=args.other_weight, backend=backend)
    if args.model == "ddpm":
        return DDPM(channels, size, args.width, timesteps=args.timesteps)
    # blur and identity frames stay in [-1, 1]: every frame's x0 can be clipped; noise frames cannot
    clip = "last" if "noise" in args.aug else "all"
    generation = "autoregressive" if args.model == "video-diffusion-ar" else "joint"
    return VideoDiffusion(channels, size, args.frames, args.width, timesteps=args.timesteps,
                          other_weight=args.other_weight, clip_frames=clip, generation=generation, backend=backend)


def read_checkpoint(args) -> dict:
    """OUT/checkpoint.pt for ``--resume``, on the CPU, checked against the flags that shape the model.

    Raises:
        FileNotFoundError: OUT holds no checkpoint.
        ValueError: flags of MODEL_FLAGS that differ from the checkpoint's, named with both values.
    """
    path = Path(args.out) / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state.get("args", {})
    differ = [f for f in MODEL_FLAGS if f in saved and saved[f] != getattr(args, f)]
    if differ:
        flag = lambda f, v: f"--{f.replace('_', '-')} {v}"  # noqa: E731
        raise ValueError(f"--resume: {path} holds a model trained with "
                         f"{', '.join(flag(f, saved[f]) for f in differ)}, not "
                         f"{', '.join(flag(f, getattr(args, f)) for f in differ)}: resume with the checkpoint's "
                         "flags, or train into another --out")
    return state


class _Objective(torch.nn.Module):
    """model.loss as a forward, so DistributedDataParallel sees (and all-reduces) it.

    Returns (loss, reconstruction) for the tokenizers and (loss, None) for the diffusion
    models. The perceptual and GAN terms are added by the trainer from the reconstruction: they
    hold no trained generator weights (DDP would only broadcast VGG16's), their gradients reach
    the model through the reconstruction in the same backward, and the GAN term's weight
    needs gradients of this loss.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, generator: torch.Generator):
        if isinstance(self.model, (VQVAE, CViViT)):
            return self.model.loss(x, return_recon=True)
        return self.model.loss(x, generator=generator), None


class Trainer:
    """One run: builds the model from ``args`` (parse_args's), trains it (``train``) and
    evaluates it (``evaluate``).

    Args:
        checkpoint: ``read_checkpoint(args)``'s state, when the caller has read it already
            (``--resume`` reads it otherwise).
        progress: the status line; by default one of its own, off with ``--no-progress``.
            Rank 0 alone shows one.

    OUT is made only once everything the arguments name (data, weight files, checkpoint) was found.
    """

    def __init__(self, args, checkpoint: dict | None = None, progress: Progress | None = None):
        self.args = args
        if args.resume and checkpoint is None:
            checkpoint = read_checkpoint(args)  # a mismatch fails before the data is loaded
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.device = torch.device(f"cuda:{self.rank % torch.cuda.device_count()}" if torch.cuda.is_available()
                                   else "cpu")
        self.progress = progress if progress is not None else Progress(not args.no_progress)
        if self.rank != 0:
            self.progress.enabled = False
        self.out = Path(args.out)
        if self.distributed and self.rank != 0 and args.download:
            dist.barrier()  # rank 0 downloads alone; the others wait for it (torchrun stops them if it fails)
        self.images, self.labels = load_dataset(args.data, args.image_size, args.data_dir,
                                                download=args.download and self.rank == 0)
        if self.distributed and self.rank == 0 and args.download:
            dist.barrier()
        self.video = args.model in VIDEO_MODELS
        self.diffusion = args.model not in TOKENIZERS
        self.params = pseudo_video_params(args) if self.video else None
        # for the FID of samples and reconstructions; an explicit path that does not exist fails here,
        # not after training
        self.inception_path, self.inception_looked = find_inception_weights(args.inception_weights)
        self.perceptual = None
        if args.perceptual_weight > 0:
            self.perceptual = load_lpips(args.perceptual_weights, args.lpips_weights).to(self.device)
            if self.rank == 0:
                print(f"perceptual loss: {self.perceptual.source}", file=sys.stderr)
        torch.manual_seed(args.seed)  # same initial weights on every rank (and DDPM's in VideoDiffusion)
        self.model = build_model(args, self.images.shape[1]).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval() if args.ema_decay > 0 else None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.disc = self.opt_d = None
        if args.gan_weight > 0:
            self.disc = PatchDiscriminator(self.images.shape[1]).to(self.device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=args.lr, betas=(0.5, 0.9))  # VQGAN's betas
        # the data order and the noise (t, epsilon, pseudo-video seeds) from separate streams
        self.data_gen = torch.Generator().manual_seed(2 * (args.seed * 1000 + self.rank))
        self.noise_gen = torch.Generator().manual_seed(2 * (args.seed * 1000 + self.rank) + 1)
        self.step = 0
        if checkpoint is not None:
            self.load(checkpoint)
        ddp = torch.nn.parallel.DistributedDataParallel if self.distributed else (lambda m: m)
        self.objective = ddp(_Objective(self.model))
        # the discriminator's own step goes through DDP (its gradients all-reduced); the
        # generator step calls self.disc directly, frozen, so DDP never sees D in that backward
        self.disc_step = ddp(self.disc) if self.disc is not None else None
        if self.rank == 0:  # the arguments held: a failed run leaves no empty OUT behind
            self.out.mkdir(parents=True, exist_ok=True)

    # -- pseudo videos -------------------------------------------------------------------
    def make_input(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """Images in [0, 1] -> what the model trains on: on its scale, as pseudo videos for the video models."""
        x = 2 * images - 1 if self.diffusion else images
        if not self.video:
            return x
        if self.params is None:  # identity: T copies of the image
            return x.unsqueeze(1).expand(-1, self.args.frames, -1, -1, -1).contiguous()
        seed = int(torch.randint(0, 2**62, (), generator=self.noise_gen)) if step >= 0 else 2**31 - 1
        return pvkernels.pseudo_video(x, **self.params, seed=seed, backend=self.args.backend)

    # -- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        if self.rank != 0:
            return
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                 "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "args": vars(self.args)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict())
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")  # atomic: a crash never leaves half a file

    def load(self, state: dict) -> None:
        """Continues from a checkpoint's state (``read_checkpoint``'s: on the CPU, whose RNG states must stay there)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema", state["model"]))
        if self.disc is not None and "disc" in state:  # a checkpoint from before --gan-weight: D starts fresh
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.step = state["step"]
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"])
        torch.set_rng_state(state["torch_rng"])  # e.g. the quantiser's dead-code restarts

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self) -> None:
        # the decay ramps up (as in Karras et al.'s and diffusers' EMA) so early weights fade fast
        decay = min(self.args.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):  # e.g. the EMA codebook: copied
            e.copy_(b)

    def train_step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One optimiser step on the model input ``x``; returns the loss and the optional terms."""
        args = self.args
        loss, recon = self.objective(x, self.noise_gen)
        terms = {}  # the optional terms, logged beside the total loss
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(last_frame(recon), last_frame(x)).mean()
            loss = loss + args.perceptual_weight * terms["perceptual"]
        gan = self.disc is not None and self.step >= args.gan_start
        if gan:
            fake = last_frame(recon)
            self.disc.requires_grad_(False)  # the generator step computes no D gradients
            terms["g_loss"] = hinge_g_loss(self.disc(fake))
            self.disc.requires_grad_(True)
            terms["gan_weight"] = args.gan_weight * adaptive_weight(loss, terms["g_loss"], self.model.last_layer)
            loss = loss + terms["gan_weight"] * terms["g_loss"]
        for group in self.opt.param_groups:
            group["lr"] = args.lr * min(1.0, (self.step + 1) / max(args.warmup, 1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.opt.step()
        if gan:  # real and fake in one forward: one DDP forward per backward
            terms["d_loss"] = hinge_d_loss(*self.disc_step(torch.cat([last_frame(x), fake.detach()])).chunk(2))
            self.opt_d.zero_grad(set_to_none=True)
            terms["d_loss"].backward()
            self.opt_d.step()
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        return loss, terms

    def train(self) -> dict:
        args = self.args
        start = time.perf_counter()
        last = {}
        while self.step < args.steps:
            images = sample_batch(self.images, args.batch_size, self.data_gen).to(self.device)
            loss, terms = self.train_step(self.make_input(images, self.step))
            if self.step % args.log_every == 0 or self.step == args.steps:
                elapsed = time.perf_counter() - start
                last = {"step": self.step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                        "sec_per_step": elapsed / args.log_every}
                self.log(last)
                start = time.perf_counter()
            if self.progress.due() or (self.progress.enabled and self.step == args.steps):
                # (loss.item() waits for the step: only when the line is redrawn)
                self.progress.show(f"{self.progress.bar(self.step, args.steps)} step {self.step}/{args.steps} "
                                   f"loss {loss.item():.4f}", force=self.step == args.steps)
            if self.step % args.ckpt_every == 0:
                self.save()
        self.save()
        self.progress.end()
        return last

    @torch.no_grad()
    def evaluate(self) -> dict:
        """With the EMA weights: tokenizers, the last-frame PSNR and the reconstruction FID (the
        paper's tokenizer metric: the last frames of the reconstructions against the data);
        diffusion models, the FID/KID of samples' last frames. FID is the offline one (a small
        classifier's features, against every image of the data set) and, when InceptionV3's
        weights are found, the Inception one too. Logged, drawn to OUT/samples.png and returned.
        ``self.shown_images`` keeps 16 last frames (reconstructions or samples; and the originals)
        for summary figures."""
        args = self.args
        begin = time.perf_counter()

        def show(what: str, done: int | None = None, total: int = 1) -> None:  # a stage, with a bar if counted
            counted = self.progress.bar(done, total) if done is not None else " " * (self.progress.bar_width + 2)
            self.progress.show(f"{counted} eval{' (EMA)' if self.ema is not None else ''}: {what}",
                               force=done in (None, 0, total))
        model = self.ema if self.ema is not None else self.model
        model.eval()
        eval_gen = torch.Generator().manual_seed(12345)
        idx = torch.randperm(len(self.images), generator=eval_gen)[: args.eval_samples]
        real = self.images[idx].to(self.device)
        record = {"step": self.step, "eval": True, "model": args.model, "ema": self.ema is not None}
        name, T = NAMES[args.model], args.frames
        frame_names = [f"frame {t}" for t in range(T - 1)] + [f"frame {T - 1} = image"]
        frame_names[0] += " (most corrupted)" if T > 1 and self.params is not None else ""
        if not self.diffusion:
            show(f"reconstructing {len(real)} images")
            x = self.make_input(real, -1)
            recon = model(x)[0]
            fake = last_frame(recon)
            record["psnr_last_frame"] = float(psnr(fake, real).clamp(max=100).mean())
            self.shown_images = {"original": real[:16], "output": fake[:16]}
        else:
            what = f"sampling {args.eval_samples} {'videos' if self.video else 'images'}, step"
            sampling = lambda done, total: show(f"{what} {done}/{total}", done, total)  # noqa: E731
            video = model.sample_video(args.eval_samples, eval_gen, progress=sampling) if self.video else None
            fake = ((video[:, -1] + 1) / 2 if self.video
                    else model.sample(args.eval_samples, eval_gen, progress=sampling))
            self.shown_images = {"output": fake[:16]}
        fitting = lambda done, total: show(  # noqa: E731
            f"fitting the offline metrics' classifier (once per process), step {done}/{total}", done, total)
        classifier, real_features = _classifier(args.data, args.image_size, self.images, self.labels, fitting)
        classifier, real_features = classifier.to(self.device), real_features.to(self.device)
        show("offline FID and KID")
        record.update(offline_scores(real_features, fake, classifier))
        what = "the last frames of the reconstructions of" if not self.diffusion else "the last frames of"
        record["offline_note"] = (f"offline FID / KID: of {what} {len(fake)} "
                                  f"{'images' if not self.diffusion else 'samples'}, on the features of a small "
                                  f"digits classifier, against all {len(self.images)} images; not Inception FID; "
                                  f"KID: {KID_SCALE}")
        if not self.diffusion:  # what a perfect reconstruction scores: the originals' own FID against the data
            record["offline_fid_originals"] = frechet_distance(real_features, classifier.features(real))
        inception = _inception(self.inception_path, self.inception_looked,
                               say=self.progress.say if self.rank == 0 else None)
        if inception is not None:
            show("FID on InceptionV3 features")
            n = min(len(real), len(fake))
            record["fid_inception"] = fid(real[:n], fake[:n], inception.to(self.device))
            record["fid_note"] = (f"FID (InceptionV3, pytorch-fid weights) on {n} "
                                  f"{'reconstructions' if not self.diffusion else 'samples'}: biased upwards at "
                                  "this size, not comparable with 50k-sample FIDs")
        scores = f"offline FID {record['offline_fid']:.1f}, KID {record['offline_kid']:.3g} ({KID_SCALE})"
        if not self.diffusion:
            shown = [(f"input: {'pseudo-video frames' if self.video else 'images'}", x),
                     (f"reconstructions ({record['psnr_last_frame']:.2f} dB on the last frame; "
                      f"{scores.replace('offline FID', 'recon. offline FID')})", recon)]
        else:
            shown = [("training input: " + ("pseudo-video frames" if self.video else "real images"),
                      (self.make_input(real[:8], -1) + 1) / 2),
                     (f"samples{', generated videos' if self.video else ''}: {scores}",
                      (video + 1) / 2 if self.video else fake)]
        self.log(record)
        if self.rank == 0:  # every tensor shown is on the image scale [0, 1]
            show("drawing samples.png")
            sections = [(heading, video_rows(t, frame_names) if t.dim() == 5 else [("image", t)])
                        for heading, t in shown]
            image_grid(self.out / "samples.png", f"{name}, {self._describe()}, step {self.step}"
                       + (" (EMA weights)" if self.ema is not None else ""), sections)
        self.model.train()
        show(f"done in {time.perf_counter() - begin:.1f} s", 1, 1)
        self.progress.end()
        return record

    def _describe(self) -> str:
        a = self.args
        if not self.video:
            return f"{a.image_size}x{a.image_size} {a.data}"
        order = "" if a.aug == "identity" else f", {a.order} order"
        return f"{a.frames} frames, {a.aug}{order}"


_CLASSIFIERS: dict = {}


def _classifier(data: str, size: int, images: torch.Tensor, labels: torch.Tensor, progress=None):
    """The offline-metric feature extractor and the features of every image, computed once per
    dataset and size in a process (``progress(step, steps)`` while it is fitted). Fitted on one
    thread: 300 Adam steps carry the rounding of a multi-threaded reduction into the weights
    (about 1% of an FID between 1 and 2 threads), so the features, and the offline FIDs, would
    depend on how many threads the process runs (the experiments' --jobs)."""
    if (data, size) not in _CLASSIFIERS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            classifier = train_classifier(images, labels, seed=0, progress=progress)
            with torch.no_grad():
                _CLASSIFIERS[(data, size)] = classifier, classifier.features(images)
        finally:
            torch.set_num_threads(threads)
    return _CLASSIFIERS[(data, size)]


_INCEPTIONS: dict = {}


def _inception(path, looked: str, say=None):
    """The FID InceptionV3 from path (loaded once per process), or None when no weights were
    found, saying once per process (through ``say``, if given) why the real FID is unavailable."""
    if path not in _INCEPTIONS:
        _INCEPTIONS[path] = load_inception(path) if path is not None else None
        if path is None and say is not None:
            say(f"pvkernels-train: FID (InceptionV3) unavailable: no {INCEPTION_FILE} (looked in {looked}); "
                "reporting the offline FID and KID only")
    return _INCEPTIONS[path]


def _last_eval(out: Path) -> dict | None:
    """The last evaluation record of OUT/metrics.jsonl (None without one)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return next((r for r in map(json.loads, reversed(lines)) if r.get("eval")), None)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        try:
            checkpoint = read_checkpoint(args) if args.resume else None
            if checkpoint is not None and checkpoint["step"] >= args.steps:
                # trained and evaluated already: its files stay as they are
                if rank0:
                    print(f"pvkernels-train: {args.out} is complete: its checkpoint is at step {checkpoint['step']} "
                          f"of --steps {args.steps}; nothing to do (a larger --steps trains on)", file=sys.stderr)
                    print(json.dumps(_last_eval(Path(args.out)) or {"step": checkpoint["step"], "complete": True}))
                return 0
            trainer = Trainer(args, checkpoint)
        except (FileNotFoundError, ValueError, ImportError, DownloadError) as exc:
            # the data, weight files and checkpoint the arguments name: usage errors, exit 2
            print(f"pvkernels-train: error: {exc}", file=sys.stderr)
            return 2
        trainer.train()
        result, rank = trainer.evaluate(), trainer.rank
        if dist.is_initialized():
            # the DDP modules hold the process group: freed now, not after it is destroyed (the likely
            # cause of a rank's rare "terminate called without an active exception" at exit, gloo's
            # threads torn down late); and no rank tears its gloo pairs down while another uses them
            del trainer
            gc.collect()
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
