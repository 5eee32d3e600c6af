"""Training CLI for the image models and their pseudo-video counterparts.

    python -m pvkernels_models.train --model cvivit --frames 4 --aug blur --steps 200 --out runs/cvivit

Writes DIR/metrics.jsonl (JSON lines), DIR/checkpoint.pt (atomically), DIR/samples.png.
``--resume`` continues bit for bit from DIR/checkpoint.pt. Under ``torchrun`` it trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 writes the files.

The tokenizers take two optional loss terms on the last frame (the image): a PatchGAN hinge
loss (``--gan-weight``, from ``--gan-start``) and an LPIPS perceptual loss
(``--perceptual-weight``, needs torchvision's VGG16 weights file). The diffusion models are
scored with FID on InceptionV3 features when pytorch-fid's weights file is found, otherwise
with the clearly labelled "offline FID".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import pvkernels
from pvkernels import schedules

from .data import DownloadError, load_dataset, sample_batch
from .diffusion import DDPM, VideoDiffusion
from .losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, last_frame, load_lpips
from .metrics import fid, find_inception_weights, offline_fid, psnr, train_classifier
from .pretrained import INCEPTION_FILE, load_inception
from .tokenizers import CViViT, VQVAE

MODELS = ("vqvae", "cvivit", "ddpm", "video-diffusion")
VIDEO_MODELS = ("cvivit", "video-diffusion")
TOKENIZERS = ("vqvae", "cvivit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pvkernels-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--frames", type=int, default=4, help="pseudo-video length (video models)")
    p.add_argument("--aug", choices=("blur", "noise", "blur+noise"), default="blur")
    p.add_argument("--order", choices=("first", "high"), default="high")
    p.add_argument("--schedule", choices=("linear", "geometric", "cosine"), default="linear",
                   help="blur: linear|geometric; noise: linear|cosine (DDPM)")
    p.add_argument("--sigma-max", type=float, default=2.0, help="strongest blur (frame 0)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=pvkernels.BACKENDS, default="auto")
    p.add_argument("--data", default="digits", help="digits | cifar10 | folder:PATH")
    p.add_argument("--data-dir", default=None, help="where the CIFAR-10 python batches are")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR-10 into --data-dir first if it is not there (needs the network)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--timesteps", type=int, default=100, help="diffusion steps")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=256)
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
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth for FID of diffusion samples "
                        "(default: $PVKERNELS_INCEPTION_WEIGHTS, then the torch hub cache; else offline FID)")
    p.add_argument("--no-progress", action="store_true")
    return p


def pseudo_video_params(args) -> dict:
    """The per-frame parameters of --aug/--order/--schedule for --frames frames."""
    T = args.frames
    blur_kinds, noise_kinds = ("linear", "geometric"), ("linear", "cosine")
    blur = noise = None
    if "blur" in args.aug:
        kind = args.schedule if args.schedule in blur_kinds else "linear"
        blur = (schedules.linear_blur(T, args.sigma_max, args.order) if kind == "linear"
                else schedules.geometric_blur(T, args.sigma_max, order=args.order))
    if "noise" in args.aug:
        if args.aug == "noise" and args.schedule not in noise_kinds:
            raise ValueError(f"--aug noise takes --schedule linear or cosine, got {args.schedule}")
        noise = schedules.ddpm_noise(T, args.schedule if args.schedule in noise_kinds else "linear", args.order)
    if blur and noise:
        return schedules.combine(blur, noise)
    return blur or noise


def build_model(args, channels: int) -> torch.nn.Module:
    size = args.image_size
    if args.model == "vqvae":
        return VQVAE(channels)
    if args.model == "cvivit":
        return CViViT(channels, size, args.frames)
    if args.model == "ddpm":
        return DDPM(channels, size, timesteps=args.timesteps)
    return VideoDiffusion(channels, size, args.frames, timesteps=args.timesteps)


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
    def __init__(self, args):
        self.args = args
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.device = torch.device(f"cuda:{self.rank % torch.cuda.device_count()}" if torch.cuda.is_available()
                                   else "cpu")
        self.out = Path(args.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.distributed and self.rank != 0 and args.download:
            dist.barrier()  # rank 0 downloads alone; the others wait for it (torchrun stops them if it fails)
        self.images, self.labels = load_dataset(args.data, args.image_size, args.data_dir,
                                                download=args.download and self.rank == 0)
        if self.distributed and self.rank == 0 and args.download:
            dist.barrier()
        self.video = args.model in VIDEO_MODELS
        self.params = pseudo_video_params(args) if self.video else None
        # for the diffusion samples' FID; an explicit path that does not exist fails here, not after training
        self.inception_path, self.inception_looked = (find_inception_weights(args.inception_weights)
                                                      if args.model not in TOKENIZERS else (None, ""))
        self.perceptual = None
        if args.perceptual_weight > 0:
            self.perceptual = load_lpips(args.perceptual_weights, args.lpips_weights).to(self.device)
            if self.rank == 0:
                print(f"perceptual loss: {self.perceptual.source}", file=sys.stderr)
        torch.manual_seed(args.seed)  # same initial weights on every rank
        self.model = build_model(args, self.images.shape[1]).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.disc = self.opt_d = None
        if args.gan_weight > 0:
            self.disc = PatchDiscriminator(self.images.shape[1]).to(self.device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=args.lr, betas=(0.5, 0.9))  # VQGAN's betas
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + self.rank)  # data, noise, timesteps
        self.step = 0
        if args.resume:
            self.load()
        ddp = torch.nn.parallel.DistributedDataParallel if self.distributed else (lambda m: m)
        self.objective = ddp(_Objective(self.model))
        # the discriminator's own step goes through DDP (its gradients all-reduced); the
        # generator step calls self.disc directly, frozen, so DDP never sees D in that backward
        self.disc_step = ddp(self.disc) if self.disc is not None else None

    # -- pseudo videos -------------------------------------------------------------------
    def make_input(self, images: torch.Tensor, step: int) -> torch.Tensor:
        if not self.video:
            return images
        seed = (self.args.seed * 1_000_003 + step * 7919 + self.rank) % 2**63
        return pvkernels.pseudo_video(images, **self.params, seed=seed).clamp(0, 1)

    # -- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        if self.rank != 0:
            return
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                 "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "args": vars(self.args)}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict())
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")  # atomic: a crash never leaves half a file

    def load(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and "disc" in state:  # a checkpoint from before --gan-weight: D starts fresh
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.step = state["step"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])  # e.g. the quantiser's dead-code restarts

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        args = self.args
        start = time.perf_counter()
        last = {}
        while self.step < args.steps:
            images = sample_batch(self.images, args.batch_size, self.gen).to(self.device)
            x = self.make_input(images, self.step)
            loss, recon = self.objective(x, self.gen)
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
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if gan:  # real and fake in one forward: one DDP forward per backward
                terms["d_loss"] = hinge_d_loss(*self.disc_step(torch.cat([last_frame(x), fake.detach()])).chunk(2))
                self.opt_d.zero_grad(set_to_none=True)
                terms["d_loss"].backward()
                self.opt_d.step()
            self.step += 1
            if self.step % args.log_every == 0 or self.step == args.steps:
                elapsed = time.perf_counter() - start
                last = {"step": self.step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                        "sec_per_step": elapsed / args.log_every}
                self.log(last)
                start = time.perf_counter()
                if self.rank == 0 and not args.no_progress:
                    bar = "#" * int(30 * self.step / args.steps)
                    print(f"\r[{bar:<30}] {self.step}/{args.steps} loss {loss.item():.4f}", end="", file=sys.stderr)
            if self.step % args.ckpt_every == 0:
                self.save()
        if self.rank == 0 and not args.no_progress:
            print(file=sys.stderr)
        self.save()
        return last

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Last-frame PSNR (tokenizers) or offline FID of samples (diffusion), logged and returned."""
        args = self.args
        self.model.eval()
        eval_gen = torch.Generator().manual_seed(12345)
        idx = torch.randperm(len(self.images), generator=eval_gen)[: args.eval_samples]
        real = self.images[idx].to(self.device)
        record = {"step": self.step, "eval": True, "model": args.model}
        if args.model in ("vqvae", "cvivit"):
            x = self.make_input(real, -1 % 2**31)
            recon = self.model(x)[0]
            image = recon[:, -1] if self.video else recon
            record["psnr_last_frame"] = float(psnr(image, real).clamp(max=100).mean())
            shown = (x, recon)
        else:
            fake = self.model.sample(min(args.eval_samples, 64), generator=eval_gen)
            inception = _inception(self.inception_path, self.inception_looked, verbose=self.rank == 0)
            if inception is not None:
                record["fid_inception"] = fid(real[: len(fake)], fake, inception.to(self.device))
                record["fid_note"] = (f"FID (InceptionV3, pytorch-fid weights) on {len(fake)} samples: biased "
                                      "upwards at this size, not comparable with 50k-sample FIDs")
            else:
                classifier = _classifier(args.data, args.image_size, self.images, self.labels)
                record["offline_fid"] = offline_fid(real[: len(fake)], fake, classifier)
                record["offline_fid_note"] = "Frechet distance on a small digits classifier, not Inception FID"
            shown = (self.make_input(real[:8], -1 % 2**31), fake[:8])
        self.log(record)
        if self.rank == 0:
            save_grid(self.out / "samples.png", shown, self.video)
        self.model.train()
        return record


_CLASSIFIERS: dict = {}


def _classifier(data: str, size: int, images: torch.Tensor, labels: torch.Tensor):
    """The offline-FID feature extractor, trained once per dataset and size in a process."""
    if (data, size) not in _CLASSIFIERS:
        _CLASSIFIERS[(data, size)] = train_classifier(images, labels, seed=0)
    return _CLASSIFIERS[(data, size)]


_INCEPTIONS: dict = {}


def _inception(path, looked: str, verbose: bool):
    """The FID InceptionV3 from path (loaded once per process), or None when no weights were
    found, saying once per process why the real FID is unavailable."""
    if path not in _INCEPTIONS:
        _INCEPTIONS[path] = load_inception(path) if path is not None else None
        if path is None and verbose:
            print(f"pvkernels-train: FID (InceptionV3) unavailable: no {INCEPTION_FILE} (looked in {looked}); "
                  "reporting the offline FID instead", file=sys.stderr)
    return _INCEPTIONS[path]


def save_grid(path: Path, tensors, video: bool) -> None:
    """PNG with one column per example (8) and, per tensor (pseudo videos, then reconstructions
    or samples), one row per frame."""
    from PIL import Image

    blocks = [t[:8].detach().float().cpu() for t in tensors]
    blocks = [b.unsqueeze(1) if b.dim() == 4 else b for b in blocks]  # (N, T, C, H, W)
    C, H, W = blocks[0].shape[2:]
    n = max(b.shape[0] for b in blocks)
    rows = sum(b.shape[1] for b in blocks) + len(blocks) - 1
    canvas = torch.ones(C, rows * (H + 1), n * (W + 1))
    r = 0
    for b in blocks:
        for t in range(b.shape[1]):
            for i in range(b.shape[0]):
                canvas[:, r * (H + 1): r * (H + 1) + H, i * (W + 1): i * (W + 1) + W] = b[i, t]
            r += 1
        r += 1  # a blank row between blocks
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy()
    Image.fromarray(array).resize((array.shape[1] * 4, array.shape[0] * 4), Image.NEAREST).save(path)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    for flag in ("gan_weight", "gan_start", "perceptual_weight"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.model not in TOKENIZERS and (args.gan_weight > 0 or args.perceptual_weight > 0):
        parser.error(f"--gan-weight and --perceptual-weight apply to the tokenizers (vqvae, cvivit), not {args.model}")
    if args.model in TOKENIZERS and args.inception_weights:
        parser.error(f"--inception-weights is for the FID of diffusion samples (ddpm, video-diffusion), "
                     f"not {args.model}")
    if args.model in ("vqvae", "ddpm"):
        args.frames = 1
    os.environ["PVKERNELS_BACKEND"] = args.backend  # every op below dispatches through "auto"
    try:
        trainer = Trainer(args)
        trainer.train()
        result = trainer.evaluate()
        if dist.is_initialized():
            dist.barrier()  # no rank tears its gloo pairs down while another still uses them
    except (FileNotFoundError, ValueError, ImportError, DownloadError) as exc:
        print(f"pvkernels-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
