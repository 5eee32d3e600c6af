"""The README's main job: image models against their pseudo-video counterparts, same budget.

    python -m pvkernels_models.demo [--steps 300] [--seeds 1] [--out runs/demo] [--quick]

Trains VQVAE vs CViViT (16x16 digits) and DDPM vs VideoDiffusion (the digits' native 8x8) on
the offline digits data with the same steps, batch size and recipe, prints a table (last-frame
PSNR; the offline FID and KID of 256 samples; FID on InceptionV3 features too when pytorch-fid's
weights are found; seconds per step for each backend) and writes OUT/demo.png: per model a titled
grid with labelled rows (pseudo-video frames, reconstructions, samples). Runs on a 2-core CPU in a
few minutes, showing one progress line per run on a terminal. The comparisons with controls, seeds
and p-values are ``python -m pvkernels_models.experiments``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import pvkernels

from .metrics import KID_SCALE
from .train import NAMES, HelpFormatter, Progress, Trainer, parse_args

PAIRS = (("vqvae", "cvivit"), ("ddpm", "video-diffusion"))
# the tokenizers on 16x16 digits (16 codes per frame), the diffusion models on the digits' own 8x8
SIZES = {"vqvae": 16, "cvivit": 16, "ddpm": 8, "video-diffusion": 8}
METRICS = {"psnr_last_frame": "last-frame PSNR, dB (higher is better)",
           "offline_fid": "Frechet distance on a small digits classifier's features, against all 1797 digits "
                          "(not Inception FID); lower is better",
           "offline_kid": f"KID on the same features ({KID_SCALE}); lower is better",
           "fid_inception": "FID (InceptionV3) on 256 samples: biased upwards, lower is better"}
# the tokenizers' reconstruction FID (train.py computes it too) is the experiments' row, not the demo's
SHOWN = {"vqvae": ("psnr_last_frame",), "cvivit": ("psnr_last_frame",)}
SHORT = {"psnr_last_frame": "PSNR {:.2f} dB", "offline_fid": "offline FID {:.1f}",
         "offline_kid": f"offline KID {{:.3g}} ({KID_SCALE})", "fid_inception": "FID {:.1f}"}


def run(model: str, seed: int, steps: int, out: Path, frames: int, extra: list, label: str = "") -> dict:
    """Trains and evaluates one model, on one progress line (on a terminal) that ``label`` starts."""
    args = parse_args([
        "--model", model, "--frames", str(frames), "--steps", str(steps), "--seed", str(seed),
        "--out", str(out / f"{model}-seed{seed}"), "--log-every", str(max(steps // 5, 1)), "--ckpt-every",
        str(steps), "--image-size", str(SIZES[model]), *extra])
    progress = Progress(prefix=f"{label}{model}, seed {seed}: ", one_line=True, bar_width=10)
    trainer = Trainer(args, progress=progress)
    start = time.perf_counter()
    trainer.train()
    result = trainer.evaluate()
    result["train_sec"] = time.perf_counter() - start
    shown = ", ".join(SHORT[k].format(result[k]) for k in _shown(model, result))
    progress.close(f"{steps} steps and the evaluation in {result['train_sec']:.0f} s: {shown}")
    return result


def _shown(model: str, result: dict) -> list:
    """The metrics of ``result`` the demo shows for ``model``, in METRICS' order."""
    return [k for k in METRICS if k in result and k in SHOWN.get(model, METRICS)]


def step_time(model: str, backend: str, frames: int, repeats: int = 5) -> float:
    """Seconds per training step of `model` with every pvkernels op on `backend`."""
    args = parse_args(["--model", model, "--frames", str(frames), "--steps", "1", "--out",
                       "/tmp/pvkernels-demo-timing", "--backend", backend, "--image-size", str(SIZES[model]),
                       "--no-progress"])
    trainer = Trainer(args)
    x = trainer.images[:args.batch_size]
    times = []
    for k in range(repeats + 1):
        start = time.perf_counter()
        loss, _ = trainer.objective(trainer.make_input(x, k), trainer.noise_gen)
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pvkernels-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps of every model")
    p.add_argument("--seeds", type=int, default=1, help="runs per model (the table's std is over them)")
    p.add_argument("--frames", type=int, default=4, help="pseudo-video length of the video models")
    p.add_argument("--out", default="runs/demo", help="where the runs, demo.png and demo.json go")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    args = p.parse_args(argv)
    steps = 5 if args.quick else args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--eval-samples", "64", "--timesteps", "20"] if args.quick else []
    rows = []
    models = [model for pair in PAIRS for model in pair]
    total = len(models) * args.seeds
    for i, model in enumerate(models):
        results = [run(model, seed, steps, out, args.frames, extra, f"[{i * args.seeds + seed + 1}/{total}] ")
                   for seed in range(args.seeds)]
        for key in _shown(model, results[0]):
            values = [r[key] for r in results]
            rows.append({"model": model, "metric": key, "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else None, "seeds": len(values),
                         "train_sec": statistics.fmean(r["train_sec"] for r in results)})
    # the fused backend of the device the models train on (the C++ kernels take CPU tensors only)
    fused = (("triton",) if pvkernels.triton_available() else ()) if torch.cuda.is_available() else (
        ("cpp",) if pvkernels.cpp_available() else ())
    backends = ["reference", *fused]
    timed = ("cvivit", "video-diffusion")
    progress = Progress(prefix="timing a training step per backend: ", bar_width=10)
    timing = {}
    for k, (m, b) in enumerate((m, b) for m in timed for b in backends):
        progress.show(f"{progress.bar(k, len(timed) * len(backends))} {m}, {b}", force=True)
        timing.setdefault(m, {})[b] = step_time(m, b, args.frames, 2 if args.quick else 5)
    progress.close(f"{progress.bar(1, 1)} done")
    setting = f"digits (tokenizers 16x16, diffusion 8x8), {steps} steps, batch 64, {args.frames}-frame blur"
    print_table(rows, timing, f"{setting}, {args.seeds} seed(s)")
    (out / "demo.json").write_text(json.dumps({"rows": rows, "step_time": timing}, indent=1))
    _collage(out, f"pseudo-video demo: {setting} pseudo videos, seed 0")
    print(f"\nwrote {out / 'demo.png'} and {out / 'demo.json'}")
    return 0


def print_table(rows: list, timing: dict, setting: str) -> None:
    """The demo's table (a row per model and metric, what each metric is) and the step times."""
    print(f"\npseudo-video demo: {setting}")
    print(f"{'model':<17}{'metric':<17}{'mean':>9}{'std':>8}{'train s':>9}   (std: sample std over seeds)")
    for r in rows:
        std = "" if r["std"] is None else f"{r['std']:.3g}"
        print(f"{r['model']:<17}{r['metric']:<17}{r['mean']:>9.4g}{std:>8}{r['train_sec']:>9.1f}")
    for key in dict.fromkeys(r["metric"] for r in rows):
        print(f"{key}: {METRICS[key]}")
    print("\nseconds per training step (forward + backward) by backend")
    for m, per in timing.items():
        print(f"{m:<17}" + "  ".join(f"{b} {t * 1e3:.1f} ms" for b, t in per.items()))


def _collage(out: Path, title: str) -> None:
    """Stacks the per-run labelled grids (seed 0) under a title into OUT/demo.png."""
    from PIL import Image, ImageDraw

    from .figures import font, text_width

    grids = [Image.open(p).convert("RGB") for m in NAMES if (p := out / f"{m}-seed0" / "samples.png").exists()]
    face = font(17)
    width = max(max(g.width for g in grids), 16 + text_width(ImageDraw.Draw(grids[0]), title, face))
    canvas = Image.new("RGB", (width, 34 + sum(g.height + 12 for g in grids)), "white")
    ImageDraw.Draw(canvas).text((8, 8), title, fill="black", font=face)
    y = 34
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height + 12
    canvas.save(out / "demo.png")


if __name__ == "__main__":
    raise SystemExit(main())
