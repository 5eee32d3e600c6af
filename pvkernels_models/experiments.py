"""The paper's two comparisons, with controls, seeds, pre-registered primary comparisons and
p-values, at a compute budget.

    python -m pvkernels_models.experiments {tokenizer,diffusion,all} --budget {smoke,cpu,gpu} --out DIR
    python -m pvkernels_models.experiments all --budget cpu --estimate   # its time, from measured steps

- tokenizer: VQVAE (image) against CViViT on T-frame blur pseudo videos, and at each T the
  controls that attribute a difference: CViViT on identity pseudo videos (T copies of the image:
  the architecture and compute without the pseudo-video signal), VQVAE trained for CViViT's
  training FLOPs and (where the budget has them) VQVAE with T codes per latent position (as many
  codes per image as CViViT's last frame can draw on). Metrics: the reconstruction FID of the
  last frame (the image) against the data, the paper's tokenizer metric (offline; on InceptionV3
  too when its weights are given), and its PSNR.
- diffusion: DDPM (image) against VideoDiffusion on T-frame pseudo videos of DDPM noise in
  first and high order (the paper's section 4.1: same marginals, different joints), generated
  autoregressively (VideoDiffusion-AR: frame t given frames < t, as the paper's video models)
  and, where the budget has them, jointly (one t for all frames; also on blur, where first and
  high order are the same video, with lambda = 1 beside 1/(T-1), and the identity control).
  Controls: DDPM trained for each pseudo-video model's training FLOPs (counted by
  torch.utils.flop_counter). Metrics on the last frames of >= 256 samples: offline FID and KID
  (a small digits classifier's features against every image of the data set), FID on
  InceptionV3 when its weights are given.

Primary comparisons (``primary``): a short list fixed here, before any run, and written to
DIR/experiments.json before the first run starts: each names arms ``a`` and ``b``, a metric and
its seeds, and reports the effect (the mean over seeds of a - b: the seeds pair, as a seed fixes
the initial weights of the shared layers and the data order), its 95% confidence interval, the
paired t-test's p and Holm's adjustment over the list. Their arms run ``primary_seeds`` seeds.
Every other p-value is exploratory, reported with a note on how many there are.

Every arm is trained with train.py's one recipe. Writes DIR/experiments.json (``{"primary":
[...], "rows": [{"experiment", "model", "frames", "aug", "order", "metric", "mean", "std",
"seeds", "p_vs_baseline"}, ...]}``: std the sample std over seeds, p the two-sided Welch t-test
against the image baseline, null for the baseline rows; plus the exploratory "comparisons"
between arms, the per-run "runs" and "metrics", what each metric is: KID is the plain value, not
x 1000), prints the primary results, the table and the costs, and draws
DIR/<experiment>_<metric>.png (metric against frames per arm) and DIR/<experiment>_samples.png
(labelled grids). Each run lives in DIR/runs/NAME-seedK/; a run whose result.json was written
with the same arguments is reused (delete it to rerun). ``--jobs N`` trains N runs at once in
worker processes of cores / N threads each (the cpu budget's default is 2: two single-threaded
runs keep two cores busy whatever the small models' threading scales like, and ``--estimate``'s
bound assumes it).

Budgets: ``smoke`` checks that everything runs (a few steps, 2 seeds; minutes, no result);
``cpu`` is the laptop experiment (digits; sized by ``--estimate`` to fit an hour on a quiet
2-core CPU); ``gpu`` is the CIFAR-10 one (needs --data-dir with the python batches; written
down, not run here).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .figures import image_grid, line_plot
from .metrics import KID_SCALE
from .train import NAMES, HelpFormatter, Trainer, _classifier, parse_args

# the metrics each experiment reports rows of (those of a run it does not list stay in "runs")
EXPERIMENT_METRICS = {"tokenizer": ("psnr_last_frame", "offline_fid", "fid_inception"),
                      "diffusion": ("offline_fid", "offline_kid", "fid_inception")}
ROW_KEYS = ("experiment", "model", "frames", "aug", "order", "metric", "mean", "std", "seeds", "p_vs_baseline")
METRICS = {"psnr_last_frame": "last-frame PSNR, dB (higher is better)",
           "offline_fid": "offline FID, small-classifier features (lower is better; tokenizer: the "
                          "reconstruction FID)",
           "offline_kid": f"offline KID ({KID_SCALE}), small-classifier features (lower is better)",
           "fid_inception": "FID on InceptionV3 features (lower is better)"}
LOWER_IS_BETTER = {"psnr_last_frame": False, "offline_fid": True, "offline_kid": True, "fid_inception": True}


# the joint VideoDiffusion's arms at each T: pseudo videos (aug-order), its identity control, the DDPM
# trained for its FLOPs (a budget may trim them: they are exploratory)
JOINT_ARMS = ("noise-first", "noise-high", "blur-high", "identity", "ddpm-flops-matched")


@dataclass(frozen=True)
class Budget:
    """One scale of the grid: data, steps and batch per experiment, the arms at each T, seeds, samples.

    The arms of a primary comparison run ``max(seeds, primary_seeds)`` seeds, every other arm
    ``seeds``; ``jobs`` runs train at once unless --jobs says otherwise.
    """
    data: str
    seeds: int
    eval_samples: int
    tok_size: int
    tok_steps: int
    tok_batch: int
    tok_frames: tuple  # CViViT on blur and on identity pseudo videos, and the FLOP-matched VQVAE, at each
    diff_size: int
    diff_steps: int
    diff_batch: int
    diff_frames: tuple  # the joint VideoDiffusion's arms (``joint_arms``) at each
    timesteps: int
    width: int = 32
    ar_frames: tuple = ()  # VideoDiffusion-AR on noise in first and high order and its FLOP-matched DDPM
    joint_arms: tuple = JOINT_ARMS
    codes_frames: tuple = ()  # the VQVAE with T codes per latent position
    lambda_one_frames: tuple = ()  # T at which the joint model's lambda = 1 is run beside 1/(T-1)
    primary_frames: int = 8  # the T of the primary comparisons
    primary_seeds: int = 0
    jobs: int = 1
    recipe: tuple = ()  # train.py flags common to every run
    note: str = ""


BUDGETS = {
    "smoke": Budget("digits", seeds=2, eval_samples=32, tok_size=16, tok_steps=3, tok_batch=16, tok_frames=(4, 8),
                    diff_size=8, diff_steps=3, diff_batch=16, diff_frames=(4, 8), timesteps=5,
                    ar_frames=(4, 8), codes_frames=(4, 8), lambda_one_frames=(4,), primary_frames=8,
                    recipe=("--warmup", "2"),
                    note="a check that every arm runs end to end; the numbers mean nothing"),
    "cpu": Budget("digits", seeds=3, eval_samples=256, tok_size=16, tok_steps=300, tok_batch=64,
                  tok_frames=(4, 8, 18), diff_size=8, diff_steps=250, diff_batch=32, diff_frames=(8,),
                  joint_arms=("noise-first", "noise-high"), timesteps=30, ar_frames=(4, 8), codes_frames=(),
                  primary_frames=8, primary_seeds=8, jobs=2,
                  recipe=("--warmup", "50", "--ema-decay", "0.99"),
                  note="scikit-learn digits at 8x8 (diffusion) and 16x16 (tokenizer); the primary arms 8 seeds, "
                       "the others 3"),
    "gpu": Budget("cifar10", seeds=3, eval_samples=5000, tok_size=32, tok_steps=20000, tok_batch=128,
                  tok_frames=(4, 8, 18), diff_size=32, diff_steps=50000, diff_batch=128, diff_frames=(4, 8),
                  timesteps=1000, width=128, ar_frames=(4, 8), codes_frames=(4, 8, 18), lambda_one_frames=(4, 8),
                  primary_frames=8, primary_seeds=3,
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
        controls = {"vqvae-matched-codes": "VQVAE with T codes per position (control)",
                    "vqvae-flops-matched": "VQVAE with CViViT's FLOPs at T (control)",
                    "ddpm-flops-matched": "DDPM with the FLOPs of T frames (control)",
                    "ddpm-flops-matched-ar": "DDPM with VideoDiffusion-AR's FLOPs at T (control)"}
        if self.model in controls:
            return controls[self.model]
        name = {"cvivit": "CViViT", "video-diffusion": "VideoDiffusion", "video-diffusion-ar": "VideoDiffusion-AR",
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
        for T in b.codes_frames:
            arms.append(Arm("tokenizer", "vqvae-matched-codes", T, None, None,
                            ("--model", "vqvae", "--codes-per-position", str(T), *steps, *common)))
        return arms
    common = ("--image-size", str(b.diff_size), "--batch-size", str(b.diff_batch), "--timesteps", str(b.timesteps),
              "--width", str(b.width))
    steps = ("--steps", str(b.diff_steps))
    arms = [Arm("diffusion", "ddpm", 1, None, None, ("--model", "ddpm", *steps, *common), baseline=True)]
    for T in b.ar_frames:
        video = ("--model", "video-diffusion-ar", "--frames", str(T), *steps, *common)
        for order in ("first", "high"):
            arms.append(Arm("diffusion", "video-diffusion-ar", T, "noise", order,
                            (*video, "--aug", "noise", "--order", order)))
        arms.append(Arm("diffusion", "ddpm-flops-matched-ar", T, None, None, ("--model", "ddpm", *common),
                        flops_of=f"video-diffusion-ar-T{T}-noise-high"))
    for T in b.diff_frames:
        video = ("--model", "video-diffusion", "--frames", str(T), *steps, *common)
        for aug, order in (("noise", "first"), ("noise", "high"), ("blur", "high")):
            if f"{aug}-{order}" in b.joint_arms:
                arms.append(Arm("diffusion", "video-diffusion", T, aug, order,
                                (*video, "--aug", aug, "--order", order)))
        if T in b.lambda_one_frames:
            arms.append(Arm("diffusion", "video-diffusion-lambda1", T, "noise", "high",
                            (*video, "--aug", "noise", "--order", "high", "--other-weight", "1")))
        if "identity" in b.joint_arms:
            arms.append(Arm("diffusion", "video-diffusion", T, "identity", None, (*video, "--aug", "identity")))
        if "ddpm-flops-matched" in b.joint_arms:
            arms.append(Arm("diffusion", "ddpm-flops-matched", T, None, None, ("--model", "ddpm", *common),
                            flops_of=f"video-diffusion-T{T}-noise-high"))
    return arms


def primary(b: Budget, experiments=("tokenizer", "diffusion")) -> list[dict]:
    """The pre-registered primary comparisons of ``experiments`` at budget b (T = primary_frames):
    fixed here, before any run. The effect is a - b; for the FIDs a negative effect favours a."""
    T, seeds = b.primary_frames, max(b.seeds, b.primary_seeds)
    specs = [
        ("tokenizer-signal", "tokenizer", f"cvivit-T{T}-blur-high", f"cvivit-T{T}-identity",
         "does the pseudo-video signal lower CViViT's reconstruction FID (its identity control: same "
         "architecture, compute, initial weights and data order)?"),
        ("tokenizer-compute", "tokenizer", f"cvivit-T{T}-blur-high", f"vqvae-flops-matched-T{T}",
         "does CViViT on pseudo videos reconstruct better than VQVAE trained for the same FLOPs?"),
        ("diffusion-order", "diffusion", f"video-diffusion-ar-T{T}-noise-high", f"video-diffusion-ar-T{T}-noise-first",
         "high- vs first-order noise pseudo videos for the autoregressive model (the paper's section 4.1)"),
        ("diffusion-compute", "diffusion", f"video-diffusion-ar-T{T}-noise-high", f"ddpm-flops-matched-ar-T{T}",
         "does the autoregressive pseudo-video model sample better than DDPM trained for the same FLOPs?"),
    ]
    return [{"name": name, "experiment": e, "a": a, "b": other, "metric": "offline_fid", "seeds": seeds,
             "question": question} for name, e, a, other, question in specs if e in experiments]


def arm_seeds(b: Budget, arms: list, specs: list) -> dict:
    """Seeds per arm key: the primary comparisons' arms their seeds, the others the budget's."""
    in_primary = {s[k]: s["seeds"] for s in specs for k in ("a", "b")}
    keys = {a.key for a in arms}
    missing = sorted(set(in_primary) - keys)
    if missing:
        raise ValueError(f"the primary comparisons name arms the grid lacks: {', '.join(missing)}")
    return {a.key: in_primary.get(a.key, b.seeds) for a in arms}


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


def paired(a: list, b: list) -> dict:
    """The paired comparison of per-seed values a and b (seed i with seed i; the first
    min(len) seeds): n, the effect mean(a - b), its 95% t confidence interval and the two-sided
    paired t-test's p (None where n < 2 or the differences do not vary)."""
    from scipy import stats

    n = min(len(a), len(b))
    d = [x - y for x, y in zip(a[:n], b[:n])]
    effect = statistics.fmean(d) if n else None
    if n < 2 or statistics.pvariance(d) == 0:
        return {"n": n, "effect": effect, "ci95": None, "p_paired": None}
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(d) / math.sqrt(n)
    return {"n": n, "effect": effect, "ci95": [effect - half, effect + half],
            "p_paired": float(stats.ttest_rel(a[:n], b[:n]).pvalue)}


def holm(ps: list) -> list:
    """Holm's step-down adjustment of p-values (None stays None and is not counted)."""
    known = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out, running = list(ps), 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        out[i] = running
    return out


@dataclass
class Results:
    arms: list
    values: dict = field(default_factory=dict)  # (arm key, metric) -> [per seed, seed 0 first]
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

    def primary(self, specs: list) -> list[dict]:
        """The pre-registered comparisons with their results (paired over seeds; Holm over the list)."""
        label = {a.key: a.label for a in self.arms}
        out = []
        for spec in specs:
            va, vb = self.values[(spec["a"], spec["metric"])], self.values[(spec["b"], spec["metric"])]
            out.append({**spec, "label_a": label[spec["a"]], "label_b": label[spec["b"]],
                        "mean_a": statistics.fmean(va), "mean_b": statistics.fmean(vb),
                        "lower_is_better": LOWER_IS_BETTER[spec["metric"]], **paired(va, vb)})
        for r, p in zip(out, holm([r["p_paired"] for r in out])):
            r["p_holm"] = p
        return out

    def comparisons(self, specs: tuple = ()) -> list[dict]:
        """The exploratory pairs the controls exist for: each pseudo-video arm against its control
        arms at the same T, and high against first order (paired over the common seeds, and
        Welch's p), less the primary ones (``specs``)."""
        pairs = []
        by = {(a.model, a.frames, a.aug, a.order): a for a in self.arms}
        for a in self.arms:
            if a.model == "cvivit" and a.aug != "identity":
                pairs.append((a, by.get(("cvivit", a.frames, "identity", None))))
                pairs.append((a, by.get(("vqvae-flops-matched", a.frames, None, None))))
                pairs.append((a, by.get(("vqvae-matched-codes", a.frames, None, None))))
            if a.model.startswith("video-diffusion") and a.aug != "identity":
                control = "ddpm-flops-matched-ar" if a.model == "video-diffusion-ar" else "ddpm-flops-matched"
                pairs.append((a, by.get((control, a.frames, None, None))))
                if a.model != "video-diffusion-ar":
                    pairs.append((a, by.get(("video-diffusion", a.frames, "identity", None))))
            if a.model in ("video-diffusion", "video-diffusion-ar") and a.aug == "noise" and a.order == "high":
                pairs.append((a, by.get((a.model, a.frames, "noise", "first"))))
            if a.model == "video-diffusion-ar" and a.aug == "noise":  # the generation, same pseudo videos
                pairs.append((a, by.get(("video-diffusion", a.frames, "noise", a.order))))
        done = {(s["a"], s["b"], s["metric"]) for s in specs}
        out = []
        for a, b in pairs:
            if b is None:
                continue
            for metric in METRICS:
                if (a.key, metric) in self.values and (a.key, b.key, metric) not in done:
                    va, vb = self.values[(a.key, metric)], self.values[(b.key, metric)]
                    out.append({"experiment": a.experiment, "metric": metric, "a": a.label, "b": b.label,
                                "mean_a": statistics.fmean(va), "mean_b": statistics.fmean(vb),
                                **paired(va, vb), "p_welch": welch_p(va, vb)})
        return out


def exploratory_note(rows: list, comparisons: list) -> str:
    """How many exploratory p-values there are, and what that means."""
    n = sum(r["p_vs_baseline"] is not None for r in rows) + sum(
        c[k] is not None for c in comparisons for k in ("p_paired", "p_welch"))
    return (f"exploratory: {n} further p-values (the rows' p vs the baseline, the comparisons' paired and Welch "
            f"p), not corrected for multiple comparisons: with no effect anywhere about {0.05 * n:.0f} of them "
            "would fall under 0.05 by chance. Read them as hints; the primary comparisons are the tests.")


def _progress(done: int, total: int, start: float, what: str) -> None:
    elapsed = time.perf_counter() - start
    eta = f", eta {elapsed / done * (total - done) / 60:.1f} min" if done else ""
    bar = "#" * int(30 * done / total)
    print(f"\r[{bar:<30}] {done}/{total} runs, {elapsed / 60:.1f} min{eta}  {what:<60.60}",
          end="", file=sys.stderr, flush=True)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _executor(jobs: int):
    """Worker processes for --jobs > 1 (spawned: no forked OpenMP state), cores / jobs threads each."""
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs)
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads,))


def prepare(experiments: list, budget: Budget, extra: dict) -> tuple:
    """The arms, their train.py argv (the FLOP-matched ones' --steps set from the counted FLOPs),
    their FLOPs per step and the primary comparisons."""
    arms = [arm for e in experiments for arm in grid(e, budget)]
    common = ["--data", budget.data, "--eval-samples", str(budget.eval_samples), *budget.recipe]
    argvs = {arm.key: [*arm.argv, *common, *extra[arm.experiment]] for arm in arms}
    flops = {arm.key: step_flops(argvs[arm.key]) for arm in arms}
    for arm in arms:  # the FLOP-matched image models: steps for the video arm's training FLOPs
        if arm.flops_of:
            steps = budget.tok_steps if arm.experiment == "tokenizer" else budget.diff_steps
            argvs[arm.key] += ["--steps", str(round(steps * flops[arm.flops_of] / flops[arm.key]))]
    return arms, argvs, flops, primary(budget, experiments)


def run(experiments: list, budget: Budget, out: Path, extra: dict, seeds: Optional[int] = None, jobs: int = 1,
        prepared: Optional[tuple] = None) -> Results:
    """Every run of the experiments' grids; ``extra`` holds train.py flags per experiment;
    ``seeds`` overrides every arm's seeds; ``jobs`` runs at once."""
    arms, argvs, flops, specs = prepared or prepare(experiments, budget, extra)
    per_arm = {a.key: seeds for a in arms} if seeds is not None else arm_seeds(budget, arms, specs)
    tasks = [(arm, seed) for arm in arms for seed in range(per_arm[arm.key])]
    argv_of = lambda arm, seed: [*argvs[arm.key], "--seed", str(seed)]  # noqa: E731
    where = lambda arm, seed: out / "runs" / f"{arm.key}-seed{seed}"  # noqa: E731
    results, start, done = Results(arms), time.perf_counter(), {}
    if jobs <= 1:
        for i, (arm, seed) in enumerate(tasks):
            _progress(i, len(tasks), start, f"{arm.label}, seed {seed}")
            done[(arm.key, seed)] = run_one(argv_of(arm, seed), where(arm, seed))
    else:
        with _executor(jobs) as pool:
            futures = {pool.submit(run_one, argv_of(arm, seed), where(arm, seed)): (arm, seed) for arm, seed in tasks}
            for i, future in enumerate(as_completed(futures)):
                arm, seed = futures[future]
                done[(arm.key, seed)] = future.result()
                _progress(i + 1, len(tasks), start, f"{arm.label}, seed {seed}")
    for arm, seed in tasks:  # in grid and seed order, whatever order they finished in: seed i pairs with seed i
        result, argv = done[(arm.key, seed)], argv_of(arm, seed)
        steps = int(argv[argv.index("--steps") + 1])  # one --steps per run
        results.runs.append({"arm": arm.key, "label": arm.label, "seed": seed, "argv": argv, "steps": steps,
                             "train_gflop": steps * flops[arm.key] / 1e9, **result})
        for metric, value in result.items():
            if metric in EXPERIMENT_METRICS[arm.experiment]:
                results.values.setdefault((arm.key, metric), []).append(value)
    _progress(len(tasks), len(tasks), start, "done")
    print(file=sys.stderr)
    return results


def estimate(experiments: list, budget: Budget, extra: dict, seeds: Optional[int] = None, steps: int = 5,
             samples: int = 32) -> dict:
    """The budget's time from measured costs: per arm, the CPU seconds of ``steps`` training steps
    and of evaluating ``samples`` samples (scaled to the budget's), on one thread, so a loaded
    machine slows the measurement less than it would wall-clock time (it still inflates it a
    little: a conservative estimate). One run = its steps x s/step + its evaluation.

    Returns per arm (seeds, steps, s/step, eval s, run s) and the totals: ``serial_sec`` (every
    run one after another on one core), ``jobs2_sec`` (two runs at once on two cores, as
    ``--jobs 2`` runs them: at most half the total plus half the longest run) and the fixed
    costs (counting the FLOPs, fitting the metrics' classifiers).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        begin = time.process_time()
        arms, argvs, flops, specs = prepare(experiments, budget, extra)
        fixed = time.process_time() - begin
        per_arm = {a.key: seeds for a in arms} if seeds is not None else arm_seeds(budget, arms, specs)
        rows = []
        for arm in arms:
            argv = argvs[arm.key]
            n_steps = int(argv[argv.index("--steps") + 1])
            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer(parse_args([*argv, "--out", tmp, "--no-progress"]))
                args = trainer.args
                begin = time.process_time()
                _classifier(args.data, args.image_size, trainer.images, trainer.labels)  # once per size
                fixed += time.process_time() - begin
                images = trainer.images[: args.batch_size]
                trainer.train_step(trainer.make_input(images, 0))  # warm-up
                begin = time.process_time()
                for k in range(steps):
                    trainer.train_step(trainer.make_input(images, k + 1))
                step_sec = (time.process_time() - begin) / steps
                full, args.eval_samples = args.eval_samples, min(samples, args.eval_samples)
                begin = time.process_time()
                trainer.evaluate()
                eval_sec = (time.process_time() - begin) * full / args.eval_samples
            run_sec = n_steps * step_sec + eval_sec
            rows.append({"arm": arm.key, "label": arm.label, "seeds": per_arm[arm.key], "steps": n_steps,
                         "gflop_per_step": flops[arm.key] / 1e9, "sec_per_step": step_sec, "eval_sec": eval_sec,
                         "run_sec": run_sec, "arm_sec": per_arm[arm.key] * run_sec})
    finally:
        torch.set_num_threads(threads)
    total = sum(r["arm_sec"] for r in rows)
    longest = max(r["run_sec"] for r in rows)
    return {"arms": rows, "fixed_sec": fixed, "serial_sec": total + fixed,
            "jobs2_sec": total / 2 + longest / 2 + fixed, "runs": sum(r["seeds"] for r in rows)}


def print_estimate(est: dict, budget_name: str) -> None:
    print(f"\nestimated time of --budget {budget_name}, from CPU seconds measured on one thread per arm:")
    print(f"{'arm':<58} {'seeds':>5} {'steps':>6} {'GFLOP/step':>10} {'s/step':>7} {'eval s':>7} {'min':>6}")
    for r in est["arms"]:
        print(f"{r['label']:<58} {r['seeds']:>5} {r['steps']:>6} {r['gflop_per_step']:>10.2f} "
              f"{r['sec_per_step']:>7.3f} {r['eval_sec']:>7.1f} {r['arm_sec'] / 60:>6.1f}")
    print(f"{est['runs']} runs; fixed costs (FLOP counts, classifiers) {est['fixed_sec'] / 60:.1f} min; "
          f"one run at a time on one core {est['serial_sec'] / 60:.1f} min; with --jobs 2 on a quiet 2-core "
          f"machine at most {est['jobs2_sec'] / 60:.1f} min")


def print_costs(runs: list) -> None:
    """Training compute (FLOPs counted as in ``step_flops``) and seconds per arm, means over seeds."""
    print(f"\n{'training cost per run':<58} {'seeds':>5} {'steps':>6} {'GFLOP':>9} {'train s':>8} {'eval s':>7}")
    for key in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == key]
        train, test = (statistics.fmean(r[k] for r in mine) for k in ("train_sec", "eval_sec"))
        print(f"{mine[0]['label']:<58} {len(mine):>5} {mine[0]['steps']:>6} {mine[0]['train_gflop']:>9.0f} "
              f"{train:>8.1f} {test:>7.1f}")


def _p(p: Optional[float]) -> str:
    return "-" if p is None else f"{p:.3g}" if p < 0.001 else f"{p:.3f}"


def print_primary(results: list) -> None:
    """The pre-registered comparisons first: effect a - b, its 95% CI, paired p and Holm's p."""
    print(f"primary comparisons (pre-registered: fixed before the runs; paired over seeds, Holm over {len(results)}):")
    for r in results:
        ci = "-" if r["ci95"] is None else f"[{r['ci95'][0]:.3g}, {r['ci95'][1]:.3g}]"
        better = "lower" if r["lower_is_better"] else "higher"
        print(f"  {r['name']}: {r['metric']} ({better} is better), {r['n']} seeds\n"
              f"    {r['label_a']} {r['mean_a']:.4g}  vs  {r['label_b']} {r['mean_b']:.4g}\n"
              f"    effect (a - b) {r['effect']:.3g}, 95% CI {ci}, paired p {_p(r['p_paired'])}, "
              f"Holm p {_p(r['p_holm'])}")


def print_table(rows: list, comparisons: list) -> None:
    print(f"{'experiment':<10} {'model':<24} {'T':>2} {'aug':<8} {'order':<5} {'metric':<15} "
          f"{'mean':>10} {'std':>9} {'n':>2} {'p vs base':>9}")
    for r in rows:
        std = "" if r["std"] is None else f"{r['std']:.4g}"
        print(f"{r['experiment']:<10} {r['model']:<24} {r['frames']:>2} {r['aug'] or '-':<8} {r['order'] or '-':<5} "
              f"{r['metric']:<15} {r['mean']:>10.4g} {std:>9} {r['seeds']:>2} {_p(r['p_vs_baseline']):>9}")
    if comparisons:
        print("\nagainst the controls (exploratory; effect a - b over the common seeds, paired and Welch p):")
        for c in comparisons:
            effect = "-" if c["effect"] is None else f"{c['effect']:.3g}"
            print(f"  {c['metric']:<15} {c['a']:<44} {c['mean_a']:>9.4g}  vs  {c['b']:<48} {c['mean_b']:>9.4g}"
                  f"  effect {effect}, paired p {_p(c['p_paired'])}, Welch p {_p(c['p_welch'])}")
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
        counts = sorted({r["seeds"] for _, r in arm_rows if (r["experiment"], r["metric"]) == (experiment, metric)})
        seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
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
                   help="smoke: does every arm run (minutes); cpu: digits, the primary arms 8 seeds, the others 3 "
                        "(sized to an hour on a quiet 2-core CPU); gpu: CIFAR-10 (days)")
    p.add_argument("--out", default=None,
                   help="where experiments.json, the figures and the runs go (not needed by --estimate)")
    p.add_argument("--seeds", type=int, default=None, help="every arm's seeds (default: the budget's, per arm)")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once (default: the budget's)")
    p.add_argument("--estimate", action="store_true",
                   help="print the budget's time from a few measured steps per arm; trains nothing")
    p.add_argument("--backend", default="auto", help="of every pvkernels op (train.py's --backend)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python batches (the gpu budget)")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid's InceptionV3 weights: adds FID rows")
    args = p.parse_args(argv)
    budget = BUDGETS[args.budget]
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    jobs = args.jobs if args.jobs is not None else budget.jobs
    if jobs < 1:
        p.error(f"--jobs must be >= 1, got {jobs}")
    if budget.data == "cifar10" and not args.data_dir:
        p.error(f"--budget {args.budget} trains on CIFAR-10: pass --data-dir with its python batches")
    if args.out is None and not args.estimate:
        p.error("--out is required (except with --estimate)")
    common = ["--backend", args.backend] + (["--data-dir", args.data_dir] if args.data_dir else [])
    common += ["--inception-weights", args.inception_weights] if args.inception_weights else []
    extra = {"tokenizer": common, "diffusion": common}
    experiments = ["tokenizer", "diffusion"] if args.experiment == "all" else [args.experiment]
    if args.estimate:
        print_estimate(estimate(experiments, budget, extra, args.seeds), args.budget)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepared = prepare(experiments, budget, extra)
    specs = prepared[3]
    if args.seeds is not None:
        specs = [{**s, "seeds": args.seeds} for s in specs]
    budget_json = {"name": args.budget, **vars(budget), "seeds": budget.seeds, "seeds_override": args.seeds,
                   "jobs": jobs}
    registered = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # the pre-registration: the primary comparisons are on disk before the first run starts
    (out / "experiments.json").write_text(json.dumps(
        {"status": "pre-registered; running", "primary_registered": registered, "primary": specs,
         "budget": budget_json}, indent=1))
    results = run(experiments, budget, out, extra, args.seeds, jobs, prepared)
    rows, comparisons = [r for _, r in results.arm_rows()], results.comparisons(specs)
    primary_results = results.primary(specs)
    note = exploratory_note(rows, comparisons)
    wall = time.perf_counter() - start
    (out / "experiments.json").write_text(json.dumps(
        {"status": "done", "primary_registered": registered, "primary": primary_results, "rows": rows,
         "comparisons": comparisons, "exploratory_note": note, "runs": results.runs, "metrics": METRICS,
         "budget": budget_json, "wall_sec": wall}, indent=1))
    print(f"\nexperiments ({args.budget} budget: {budget.note}); {len(results.runs)} runs, {jobs} at a time, "
          f"{wall / 60:.1f} min")
    print_primary(primary_results)
    print()
    print_table(rows, comparisons)
    print(f"\n{note}")
    print_costs(results.runs)
    figures = draw(results, out)
    print(f"\nwrote {out / 'experiments.json'} and " + ", ".join(str(f) for f in figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
