"""The paper's two comparisons, with controls, seeds and p-values, at a compute budget.

    python -m pvkernels_models.experiments {tokenizer,diffusion,all} --budget {smoke,cpu,gpu} --out DIR

- tokenizer: VQVAE (image) against CViViT on T-frame blur pseudo videos, and at each T the
  controls that attribute a difference: CViViT on identity pseudo videos (T copies of the image:
  the architecture and compute without the pseudo-video signal), VQVAE trained for CViViT's
  training FLOPs, and VQVAE with T codes per latent position (as many codes per image as
  CViViT's last frame can draw on); metrics: the reconstruction FID of the last frame (the image) against the data,
  the paper's tokenizer metric (offline; on InceptionV3 too when its weights are given), and
  its PSNR.
- diffusion: DDPM (image) against VideoDiffusion on T-frame pseudo videos of DDPM noise in
  first and high order (the paper's section 4.1: same marginals, different joints), of blur
  (where first and high order are the same video, so high only), with lambda = 1/(T-1) and,
  for noise in high order, lambda = 1; controls: VideoDiffusion on identity pseudo videos (T
  copies of the image: the architecture and compute without the pseudo-video signal) and DDPM
  trained for the pseudo-video arm's training FLOPs (counted by torch.utils.flop_counter).
  Metrics on the last frames of >= 256 samples: offline FID and KID (a small digits
  classifier's features against every image of the data set), FID on InceptionV3 when its
  weights are given.

Every arm is trained with train.py's one recipe and the same seeds (a seed fixes the init of
the shared layers and the data order). Writes DIR/experiments.json (``{"rows": [{"experiment",
"model", "frames", "aug", "order", "metric", "mean", "std", "seeds", "p_vs_baseline"}, ...]}``:
std the sample std over seeds, p the two-sided Welch t-test against the image baseline, null
for the baseline rows; plus "comparisons" between arms, the per-run "runs" and "metrics", what
each metric is: KID is the plain value, not x 1000), prints the table, and draws
DIR/<experiment>_<metric>.png (metric against frames per arm) and
DIR/<experiment>_samples.png (labelled grids). Each run lives in DIR/runs/NAME-seedK/; a run
whose result.json was written with the same arguments is reused (delete it to rerun).

Budgets: ``smoke`` checks that everything runs (a few steps, 2 seeds; minutes, no result);
``cpu`` is the laptop experiment (digits; under 45 minutes on a quiet 2-core CPU); ``gpu`` is
the CIFAR-10 one (needs --data-dir with the python batches; written down, not run here).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .figures import image_grid, line_plot
from .metrics import KID_SCALE
from .train import NAMES, HelpFormatter, Trainer, parse_args

# the metrics each experiment reports rows of (those of a run it does not list stay in "runs")
EXPERIMENT_METRICS = {"tokenizer": ("psnr_last_frame", "offline_fid", "fid_inception"),
                      "diffusion": ("offline_fid", "offline_kid", "fid_inception")}
ROW_KEYS = ("experiment", "model", "frames", "aug", "order", "metric", "mean", "std", "seeds", "p_vs_baseline")
METRICS = {"psnr_last_frame": "last-frame PSNR, dB (higher is better)",
           "offline_fid": "offline FID, small-classifier features (lower is better; tokenizer: the "
                          "reconstruction FID)",
           "offline_kid": f"offline KID ({KID_SCALE}), small-classifier features (lower is better)",
           "fid_inception": "FID on InceptionV3 features (lower is better)"}


@dataclass(frozen=True)
class Budget:
    """One scale of the grid: data, steps and batch per experiment, frames, seeds, samples."""
    data: str
    seeds: int
    eval_samples: int
    tok_size: int
    tok_steps: int
    tok_batch: int
    tok_frames: tuple
    diff_size: int
    diff_steps: int
    diff_batch: int
    diff_frames: tuple
    timesteps: int
    width: int = 32
    lambda_one_frames: tuple = ()  # T at which lambda = 1 is run beside 1/(T-1)
    recipe: tuple = ()  # train.py flags common to every run
    note: str = ""


BUDGETS = {
    "smoke": Budget("digits", seeds=2, eval_samples=32, tok_size=16, tok_steps=3, tok_batch=16, tok_frames=(4, 8),
                    diff_size=8, diff_steps=3, diff_batch=16, diff_frames=(4, 8), timesteps=5,
                    lambda_one_frames=(4,), recipe=("--warmup", "2"),
                    note="a check that every arm runs end to end; the numbers mean nothing"),
    "cpu": Budget("digits", seeds=3, eval_samples=256, tok_size=16, tok_steps=300, tok_batch=64, tok_frames=(4, 8, 18),
                  diff_size=8, diff_steps=250, diff_batch=32, diff_frames=(4, 8), timesteps=30,
                  lambda_one_frames=(4,), recipe=("--warmup", "50", "--ema-decay", "0.99"),
                  note="scikit-learn digits at 8x8 (diffusion) and 16x16 (tokenizer), 3 seeds"),
    "gpu": Budget("cifar10", seeds=3, eval_samples=5000, tok_size=32, tok_steps=20000, tok_batch=128,
                  tok_frames=(4, 8, 18), diff_size=32, diff_steps=50000, diff_batch=128, diff_frames=(4, 8),
                  timesteps=1000, width=128, lambda_one_frames=(4, 8),
                  recipe=("--warmup", "1000", "--ema-decay", "0.9999", "--lr", "2e-4"),
                  note="CIFAR-10 32x32 (needs --data-dir); written down, never run here (days on one GPU)"),
}


@dataclass(frozen=True)
class Arm:
    """One line of the grid: the row it reports as and the train.py flags that make it."""
    experiment: str
    model: str  # the row's model name
    frames: int
    aug: Optional[str]
    order: Optional[str]
    argv: tuple
    baseline: bool = False
    flops_of: Optional[str] = None  # the key of the arm whose training FLOPs this image model's steps match

    @property
    def key(self) -> str:
        parts = [self.model, f"T{self.frames}", self.aug, self.order]
        return "-".join(str(p) for p in parts if p is not None)

    @property
    def label(self) -> str:
        return self.series if self.baseline else f"{self.series}, T={self.frames}"

    @property
    def series(self) -> str:
        """The arm's name without T: one line of the metric-against-frames plot."""
        if self.baseline:
            return NAMES[self.argv[1]]
        if self.model == "vqvae-matched-codes":
            return "VQVAE with T codes per position (control)"
        if self.model == "vqvae-flops-matched":
            return "VQVAE with CViViT's FLOPs at T (control)"
        if self.model == "ddpm-flops-matched":
            return "DDPM with the FLOPs of T frames (control)"
        name = {"cvivit": "CViViT", "video-diffusion": "VideoDiffusion",
                "video-diffusion-lambda1": "VideoDiffusion, lambda=1"}[self.model]
        return f"{name}, identity (control)" if self.aug == "identity" else f"{name}, {self.aug}, {self.order} order"


def grid(experiment: str, b: Budget) -> list[Arm]:
    """The arms of one experiment at budget b (the baseline first)."""
    if experiment == "tokenizer":
        common = ("--image-size", str(b.tok_size), "--batch-size", str(b.tok_batch))
        steps = ("--steps", str(b.tok_steps))
        arms = [Arm("tokenizer", "vqvae", 1, None, None, ("--model", "vqvae", *steps, *common), baseline=True)]
        for T in b.tok_frames:
            cvivit = ("--model", "cvivit", "--frames", str(T), *steps, *common)
            arms.append(Arm("tokenizer", "cvivit", T, "blur", "high", (*cvivit, "--aug", "blur", "--order", "high")))
            arms.append(Arm("tokenizer", "cvivit", T, "identity", None, (*cvivit, "--aug", "identity")))
            arms.append(Arm("tokenizer", "vqvae-flops-matched", T, None, None, ("--model", "vqvae", *common),
                            flops_of=f"cvivit-T{T}-blur-high"))
            arms.append(Arm("tokenizer", "vqvae-matched-codes", T, None, None,
                            ("--model", "vqvae", "--codes-per-position", str(T), *steps, *common)))
        return arms
    common = ("--image-size", str(b.diff_size), "--batch-size", str(b.diff_batch), "--timesteps", str(b.timesteps),
              "--width", str(b.width))
    steps = ("--steps", str(b.diff_steps))
    arms = [Arm("diffusion", "ddpm", 1, None, None, ("--model", "ddpm", *steps, *common), baseline=True)]
    for T in b.diff_frames:
        video = ("--model", "video-diffusion", "--frames", str(T), *steps, *common)
        for aug, order in (("noise", "first"), ("noise", "high"), ("blur", "high")):
            arms.append(Arm("diffusion", "video-diffusion", T, aug, order, (*video, "--aug", aug, "--order", order)))
        if T in b.lambda_one_frames:
            arms.append(Arm("diffusion", "video-diffusion-lambda1", T, "noise", "high",
                            (*video, "--aug", "noise", "--order", "high", "--other-weight", "1")))
        arms.append(Arm("diffusion", "video-diffusion", T, "identity", None, (*video, "--aug", "identity")))
        arms.append(Arm("diffusion", "ddpm-flops-matched", T, None, None, ("--model", "ddpm", *common),
                        flops_of=f"video-diffusion-T{T}-noise-high"))
    return arms


def step_flops(argv: list) -> float:
    """FLOPs of one training step (forward + backward) of the run ``argv``, counted by
    torch.utils.flop_counter on the reference backend (its attention is SDPA, which the
    counter knows; the fused kernels are opaque to it). Matmuls and convolutions only."""
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(parse_args([*argv, "--steps", "1", "--backend", "reference", "--out", tmp,
                                      "--no-progress", "--ema-decay", "0"]))
        x = trainer.make_input(trainer.images[: trainer.args.batch_size], 0)
        with FlopCounterMode(display=False) as counter:
            loss, _ = trainer.objective(x, trainer.noise_gen)
            loss.backward()
    return float(counter.get_total_flops())


def run_one(argv: list, out: Path) -> dict:
    """Trains and evaluates one run in ``out`` (reusing its result.json if made by the same argv)."""
    done = out / "result.json"
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached["argv"] == argv:
            return cached["result"]
    if out.exists():
        shutil.rmtree(out)
    trainer = Trainer(parse_args([*argv, "--out", str(out), "--no-progress"]))
    start = time.perf_counter()
    trainer.train()
    trained = time.perf_counter()
    record = trainer.evaluate()
    result = {k: v for k, v in record.items() if k in METRICS or k in ("offline_kid_se", "offline_fid_originals")}
    result.update(train_sec=trained - start, eval_sec=time.perf_counter() - trained)
    torch.save(trainer.shown_images, out / "images.pt")
    done.write_text(json.dumps({"argv": argv, "result": result}, indent=1))
    return result


def welch_p(a: list, b: list) -> Optional[float]:
    """Two-sided Welch t-test p-value (None with fewer than 2 values a side or no variance)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return None
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return None if math.isnan(p) else float(p)


@dataclass
class Results:
    arms: list
    values: dict = field(default_factory=dict)  # (arm key, metric) -> [per seed]
    runs: list = field(default_factory=list)

    def arm_rows(self) -> list[tuple]:
        """(arm, row) per arm and metric, experiment by experiment, the baseline first."""
        out = []
        for experiment in dict.fromkeys(a.experiment for a in self.arms):
            arms = [a for a in self.arms if a.experiment == experiment]
            base = next(a for a in arms if a.baseline)
            for metric in [m for m in METRICS if (base.key, m) in self.values]:
                for arm in arms:
                    v = self.values[(arm.key, metric)]
                    out.append((arm, {
                        "experiment": experiment, "model": arm.model, "frames": arm.frames, "aug": arm.aug,
                        "order": arm.order, "metric": metric, "mean": statistics.fmean(v),
                        "std": statistics.stdev(v) if len(v) > 1 else None, "seeds": len(v),
                        "p_vs_baseline": None if arm.baseline else welch_p(v, self.values[(base.key, metric)])}))
        return out

    def comparisons(self) -> list[dict]:
        """The pairs the controls exist for: each pseudo-video arm against its control arms at
        the same T, and high against first order."""
        pairs = []
        by = {(a.model, a.frames, a.aug, a.order): a for a in self.arms}
        for a in self.arms:
            if a.model == "cvivit" and a.aug != "identity":
                pairs.append((a, by.get(("cvivit", a.frames, "identity", None))))
                pairs.append((a, by.get(("vqvae-flops-matched", a.frames, None, None))))
                pairs.append((a, by.get(("vqvae-matched-codes", a.frames, None, None))))
            if a.model.startswith("video-diffusion") and a.aug != "identity":
                pairs.append((a, by.get(("ddpm-flops-matched", a.frames, None, None))))
                pairs.append((a, by.get(("video-diffusion", a.frames, "identity", None))))
            if a.model == "video-diffusion" and a.aug == "noise" and a.order == "high":
                pairs.append((a, by.get(("video-diffusion", a.frames, "noise", "first"))))
        out = []
        for a, b in pairs:
            if b is None:
                continue
            for metric in METRICS:
                if (a.key, metric) in self.values:
                    va, vb = self.values[(a.key, metric)], self.values[(b.key, metric)]
                    out.append({"experiment": a.experiment, "metric": metric, "a": a.label, "b": b.label,
                                "mean_a": statistics.fmean(va), "mean_b": statistics.fmean(vb),
                                "p": welch_p(va, vb)})
        return out


def _progress(done: int, total: int, start: float, what: str) -> None:
    elapsed = time.perf_counter() - start
    eta = f", eta {elapsed / done * (total - done) / 60:.1f} min" if done else ""
    bar = "#" * int(30 * done / total)
    print(f"\r[{bar:<30}] {done}/{total} runs, {elapsed / 60:.1f} min{eta}  {what:<60.60}",
          end="", file=sys.stderr, flush=True)


def run(experiments: list, budget: Budget, out: Path, extra: dict, seeds: int) -> Results:
    """Every run of the experiments' grids; ``extra`` holds train.py flags per experiment."""
    arms = [arm for e in experiments for arm in grid(e, budget)]
    common = ["--data", budget.data, "--eval-samples", str(budget.eval_samples), *budget.recipe]
    argvs = {arm.key: [*arm.argv, *common, *extra[arm.experiment]] for arm in arms}
    flops = {arm.key: step_flops(argvs[arm.key]) for arm in arms}
    for arm in arms:  # the FLOP-matched image models: steps for the video arm's training FLOPs
        if arm.flops_of:
            steps = budget.tok_steps if arm.experiment == "tokenizer" else budget.diff_steps
            argvs[arm.key] += ["--steps", str(round(steps * flops[arm.flops_of] / flops[arm.key]))]
    results = Results(arms)
    total, start = len(arms) * seeds, time.perf_counter()
    for i, arm in enumerate(arms):
        for seed in range(seeds):
            _progress(i * seeds + seed, total, start, f"{arm.label}, seed {seed}")
            argv = [*argvs[arm.key], "--seed", str(seed)]
            result = run_one(argv, out / "runs" / f"{arm.key}-seed{seed}")
            steps = int(argv[argv.index("--steps") + 1])  # one --steps per run
            results.runs.append({"arm": arm.key, "label": arm.label, "seed": seed, "argv": argv, "steps": steps,
                                 "train_gflop": steps * flops[arm.key] / 1e9, **result})
            for metric, value in result.items():
                if metric in EXPERIMENT_METRICS[arm.experiment]:
                    results.values.setdefault((arm.key, metric), []).append(value)
    _progress(total, total, start, "done")
    print(file=sys.stderr)
    return results


def print_costs(runs: list) -> None:
    """Training compute (FLOPs counted as in ``step_flops``) and seconds per arm, means over seeds."""
    print(f"\n{'training cost per run':<52} {'steps':>6} {'GFLOP':>9} {'train s':>8} {'eval s':>7}")
    for key in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == key]
        train, test = (statistics.fmean(r[k] for r in mine) for k in ("train_sec", "eval_sec"))
        print(f"{mine[0]['label']:<52} {mine[0]['steps']:>6} {mine[0]['train_gflop']:>9.0f} {train:>8.1f} {test:>7.1f}")


def print_table(rows: list, comparisons: list) -> None:
    print(f"{'experiment':<10} {'model':<24} {'T':>2} {'aug':<8} {'order':<5} {'metric':<15} "
          f"{'mean':>10} {'std':>9} {'n':>2} {'p vs base':>9}")
    for r in rows:
        std = "" if r["std"] is None else f"{r['std']:.4g}"
        p = "-" if r["p_vs_baseline"] is None else f"{r['p_vs_baseline']:.3f}"
        print(f"{r['experiment']:<10} {r['model']:<24} {r['frames']:>2} {r['aug'] or '-':<8} {r['order'] or '-':<5} "
              f"{r['metric']:<15} {r['mean']:>10.4g} {std:>9} {r['seeds']:>2} {p:>9}")
    if comparisons:
        print("\nagainst the controls (Welch two-sided p):")
        for c in comparisons:
            p = "-" if c["p"] is None else f"{c['p']:.3f}"
            print(f"  {c['metric']:<15} {c['a']:<44} {c['mean_a']:>9.4g}  vs  {c['b']:<40} {c['mean_b']:>9.4g}"
                  f"  p {p}")
    for metric in dict.fromkeys(r["metric"] for r in rows):
        print(f"{metric}: {METRICS[metric]}")


def draw(results: Results, out: Path) -> list[Path]:
    """A metric-against-frames plot per experiment and metric, and a labelled grid of each
    arm's seed-0 reconstructions or samples per experiment."""
    written = []
    arm_rows = results.arm_rows()
    for experiment, metric in dict.fromkeys((r["experiment"], r["metric"]) for _, r in arm_rows):
        lines, baselines = {}, []
        for arm, r in arm_rows:
            if (r["experiment"], r["metric"]) != (experiment, metric):
                continue
            if arm.baseline:
                baselines.append((arm.label, r["mean"], r["std"]))
                continue
            xs, ms, ss = lines.setdefault(arm.series, ([], [], []))
            xs.append(arm.frames), ms.append(r["mean"]), ss.append(r["std"])
        path = out / f"{experiment}_{metric}.png"
        seeds = max(r["seeds"] for _, r in arm_rows)
        line_plot(path, f"{experiment}: {METRICS[metric]}, mean +- std over {seeds} seeds",
                  "pseudo-video frames T (the controls: matched to T)", metric,
                  [(k, *v) for k, v in lines.items()], baselines)
        written.append(path)
    for experiment in dict.fromkeys(a.experiment for a in results.arms):
        sections = []
        for arm in (a for a in results.arms if a.experiment == experiment):
            images = out / "runs" / f"{arm.key}-seed0" / "images.pt"
            if images.is_file():
                shown = torch.load(images, weights_only=True)
                if not sections and "original" in shown:
                    heading = "the images (last frames of the pseudo videos)"
                    sections.append((heading, [("original", shown["original"])]))
                what = "reconstruction" if experiment == "tokenizer" else "samples"
                sections.append((arm.label, [(what, shown["output"])]))
        if sections:
            path = out / f"{experiment}_samples.png"
            what = "last-frame reconstructions" if experiment == "tokenizer" else "samples (last frames)"
            image_grid(path, f"{experiment}: {what}, seed 0, EMA weights", sections, columns=16)
            written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pvkernels-experiments", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("experiment", choices=("tokenizer", "diffusion", "all"), help="which comparison to run")
    p.add_argument("--budget", choices=tuple(BUDGETS), required=True,
                   help="smoke: does every arm run (minutes); cpu: digits, 3 seeds (under 45 min on 2 cores); "
                        "gpu: CIFAR-10 (days)")
    p.add_argument("--out", required=True, help="where experiments.json, the figures and the runs go")
    p.add_argument("--seeds", type=int, default=None, help="override the budget's number of seeds")
    p.add_argument("--backend", default="auto", help="of every pvkernels op (train.py's --backend)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python batches (the gpu budget)")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid's InceptionV3 weights: adds FID rows")
    args = p.parse_args(argv)
    budget = BUDGETS[args.budget]
    seeds = args.seeds if args.seeds is not None else budget.seeds
    if seeds < 1:
        p.error(f"--seeds must be >= 1, got {seeds}")
    if budget.data == "cifar10" and not args.data_dir:
        p.error(f"--budget {args.budget} trains on CIFAR-10: pass --data-dir with its python batches")
    common = ["--backend", args.backend] + (["--data-dir", args.data_dir] if args.data_dir else [])
    common += ["--inception-weights", args.inception_weights] if args.inception_weights else []
    extra = {"tokenizer": common, "diffusion": common}
    experiments = ["tokenizer", "diffusion"] if args.experiment == "all" else [args.experiment]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run(experiments, budget, out, extra, seeds)
    rows, comparisons = [r for _, r in results.arm_rows()], results.comparisons()
    wall = time.perf_counter() - start
    (out / "experiments.json").write_text(json.dumps(
        {"rows": rows, "comparisons": comparisons, "runs": results.runs, "metrics": METRICS,
         "budget": {"name": args.budget, **{k: v for k, v in vars(budget).items()}, "seeds": seeds},
         "wall_sec": wall}, indent=1))
    print(f"\nexperiments ({args.budget} budget: {budget.note}); {seeds} seeds, {wall / 60:.1f} min")
    print_table(rows, comparisons)
    print_costs(results.runs)
    figures = draw(results, out)
    print(f"\nwrote {out / 'experiments.json'} and " + ", ".join(str(f) for f in figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
