"""The experiments command end to end on a tiny budget: the grid, the pre-registered primary comparisons
and their statistics, the JSON rows, the table, the figures, --jobs, --estimate."""
import functools
import json
from concurrent.futures import Future

import pytest

from pvkernels_models import experiments, train
from pvkernels_models.experiments import ROW_KEYS, Budget, grid, holm, main, paired, welch_p

TINY = Budget("digits", seeds=2, eval_samples=8, tok_size=8, tok_steps=1, tok_batch=4, tok_frames=(2,),
              diff_size=8, diff_steps=2, diff_batch=4, diff_frames=(2,), joint_arms=("noise-high", "identity"),
              timesteps=2, width=8, ar_frames=(2,), codes_frames=(2,), primary_frames=2, recipe=("--warmup", "1"))


@pytest.fixture
def quick(monkeypatch):
    """The tiny budget as "smoke", and the offline metrics' classifier in 20 steps instead of 300
    (the plumbing is under test here), in a fresh process's cache."""
    monkeypatch.setitem(experiments.BUDGETS, "smoke", TINY)
    monkeypatch.setattr(train, "_CLASSIFIERS", {})
    monkeypatch.setattr(train, "train_classifier", functools.partial(train.train_classifier, steps=20))


def test_the_grid_has_every_arm_and_control():
    b = experiments.BUDGETS["cpu"]
    tok = {(a.model, a.frames) for a in grid("tokenizer", b)}
    assert {("cvivit", T) for T in (4, 8, 18)} <= tok  # the paper's headline length among them
    arms = {(a.model, a.frames, a.aug): a for a in grid("tokenizer", b)}
    for T in (4, 8, 18):  # the attribution controls at each T: the signal, then the compute
        assert ("cvivit", T, "identity") in arms and ("cvivit", T, "blur") in arms
        assert arms[("vqvae-flops-matched", T, None)].flops_of == f"cvivit-T{T}-blur-high"
        assert "--steps" not in arms[("vqvae-flops-matched", T, None)].argv  # set from the counted FLOPs
    diff = {(a.model, a.frames, a.aug, a.order): a for a in grid("diffusion", b)}
    for T in (4, 8):  # the autoregressive model on noise in both orders, and DDPM at its FLOPs
        assert {("video-diffusion-ar", T, "noise", "first"), ("video-diffusion-ar", T, "noise", "high")} <= set(diff)
        assert diff[("ddpm-flops-matched-ar", T, None, None)].flops_of == f"video-diffusion-ar-T{T}-noise-high"
        assert diff[("video-diffusion-ar", T, "noise", "high")].argv[1] == "video-diffusion-ar"
    assert {("video-diffusion", 8, "noise", "first"), ("video-diffusion", 8, "noise", "high")} <= set(diff)  # joint
    assert ("ddpm", 1, None, None) in diff and [a.baseline for a in grid("diffusion", b)].count(True) == 1
    full = {(a.model, a.frames, a.aug) for a in grid("diffusion", experiments.BUDGETS["gpu"])}
    assert {("video-diffusion", 8, "identity"), ("ddpm-flops-matched", 8, None),
            ("video-diffusion-lambda1", 8, "noise")} <= full  # trimmed at cpu, not gone


def test_the_primary_comparisons_are_few_fixed_and_seeded_at_8_on_cpu():
    b = experiments.BUDGETS["cpu"]
    specs = experiments.primary(b)
    assert [s["name"] for s in specs] == ["tokenizer-signal", "tokenizer-compute", "diffusion-order",
                                          "diffusion-compute"]
    assert [(s["a"], s["b"]) for s in specs] == [
        ("cvivit-T8-blur-high", "cvivit-T8-identity"), ("cvivit-T8-blur-high", "vqvae-flops-matched-T8"),
        ("video-diffusion-ar-T8-noise-high", "video-diffusion-ar-T8-noise-first"),
        ("video-diffusion-ar-T8-noise-high", "ddpm-flops-matched-ar-T8")]
    assert {s["metric"] for s in specs} == {"offline_fid"} and {s["seeds"] for s in specs} == {8}
    arms = [a for e in ("tokenizer", "diffusion") for a in grid(e, b)]
    seeds = experiments.arm_seeds(b, arms, specs)
    in_primary = {s[k] for s in specs for k in ("a", "b")}
    assert {seeds[k] for k in in_primary} == {8} and {v for k, v in seeds.items() if k not in in_primary} == {3}
    assert [s["name"] for s in experiments.primary(b, ["tokenizer"])] == ["tokenizer-signal", "tokenizer-compute"]
    with pytest.raises(ValueError, match="the grid lacks: cvivit-T8-blur-high"):
        experiments.arm_seeds(b, arms[:1], specs)


def test_welch_p():
    assert welch_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert welch_p([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]) < 1e-3
    assert welch_p([1.0], [2.0, 3.0]) is None and welch_p([1.0, 1.0], [1.0, 1.0]) is None


def test_paired_effect_ci_and_p_and_holm():
    from scipy import stats

    a, b = [3.0, 5.0, 4.0, 6.0], [1.0, 2.5, 2.0, 3.5]  # differences 2, 2.5, 2, 2.5: mean 2.25
    r = paired(a, b)
    assert r["n"] == 4 and r["effect"] == pytest.approx(2.25)
    half = stats.t.ppf(0.975, 3) * stats.tstd([2, 2.5, 2, 2.5]) / 2
    assert r["ci95"] == pytest.approx([2.25 - half, 2.25 + half])
    assert r["p_paired"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired(a + [9.0], b)["n"] == 4  # the common seeds
    assert paired([1.0, 2.0], [0.0, 1.0]) == {"n": 2, "effect": 1.0, "ci95": None, "p_paired": None}
    assert holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    assert holm([0.5, 0.6]) == [1.0, 1.0]


class SyncPool:
    """A stand-in for the worker processes: runs each task at submit, hands back finished futures."""

    def __init__(self):
        self.submitted = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        self.submitted += 1
        future = Future()
        future.set_result(fn(*args))
        return future


def test_experiments_all_on_a_tiny_budget(tmp_path, monkeypatch, capsys, quick):
    pool = SyncPool()
    monkeypatch.setattr(experiments, "_executor", lambda jobs: pool)
    registered = []
    run_one = experiments.run_one

    def first_run_sees_the_registration(argv, out):  # the primary list is on disk before any run
        if not registered:
            registered.append(json.loads((tmp_path / "experiments.json").read_text()))
        return run_one(argv, out)
    monkeypatch.setattr(experiments, "run_one", first_run_sees_the_registration)
    assert main(["all", "--budget", "smoke", "--out", str(tmp_path), "--jobs", "2"]) == 0
    assert pool.submitted == 22  # 11 arms x 2 seeds, through the --jobs pool
    assert registered[0]["status"].startswith("pre-registered") and "rows" not in registered[0]
    assert [(p["a"], p["b"]) for p in registered[0]["primary"]] == [
        ("cvivit-T2-blur-high", "cvivit-T2-identity"), ("cvivit-T2-blur-high", "vqvae-flops-matched-T2"),
        ("video-diffusion-ar-T2-noise-high", "video-diffusion-ar-T2-noise-first"),
        ("video-diffusion-ar-T2-noise-high", "ddpm-flops-matched-ar-T2")]
    result = json.loads((tmp_path / "experiments.json").read_text())
    assert result["primary_registered"] == registered[0]["primary_registered"]
    for p in result["primary"]:  # each with its effect, confidence interval and paired p (Holm too)
        assert {"a", "b", "metric", "seeds", "effect", "ci95", "p_paired", "p_holm", "mean_a", "mean_b"} <= set(p)
        assert p["n"] == p["seeds"] == 2 and p["metric"] == "offline_fid"
    rows = result["rows"]
    assert rows and all(tuple(r) == ROW_KEYS for r in rows)
    assert {(r["experiment"], r["metric"]) for r in rows} == {
        ("tokenizer", "psnr_last_frame"), ("tokenizer", "offline_fid"), ("diffusion", "offline_fid"),
        ("diffusion", "offline_kid")}
    for r in rows:
        baseline = r["model"] in ("vqvae", "ddpm") and r["frames"] == 1
        assert (r["p_vs_baseline"] is None) == baseline, r
        assert r["seeds"] == 2 and r["std"] is not None and r["std"] >= 0
    assert len(rows) == 5 * 2 + 6 * 2  # tokenizer: 5 arms x 2 metrics; diffusion: 6 arms x 2 metrics
    assert {(r["model"], r["aug"], r["order"]) for r in rows if r["metric"] == "offline_fid"} >= {
        ("video-diffusion-ar", "noise", "first"), ("video-diffusion-ar", "noise", "high"),
        ("cvivit", "identity", None), ("vqvae-flops-matched", None, None)}
    assert all(0 <= run["offline_fid_originals"] for run in result["runs"] if run["arm"].startswith(("vq", "cv")))
    # the runs in grid and seed order whatever order they finished in, each value its seed's
    runs = result["runs"]
    assert [r["seed"] for r in runs] == [0, 1] * 11
    fid_of = {(r["arm"], r["seed"]): r["offline_fid"] for r in runs}
    primary = result["primary"][0]
    assert primary["mean_a"] == pytest.approx((fid_of[(primary["a"], 0)] + fid_of[(primary["a"], 1)]) / 2)
    # the FLOP-matched image models train for the video arm's FLOPs: more steps than the video arm
    steps = {run["arm"]: int(run["argv"][run["argv"].index("--steps") + 1]) for run in runs}
    assert steps["ddpm-flops-matched-ar-T2"] > steps["video-diffusion-ar-T2-noise-high"] == 2
    assert steps["vqvae-flops-matched-T2"] > steps["cvivit-T2-blur-high"] == 1
    labels = {c["b"] for c in result["comparisons"]}
    assert {"VideoDiffusion, identity (control), T=2", "VQVAE with T codes per position (control), T=2",
            "VideoDiffusion, noise, high order, T=2"} <= labels  # (the AR arm against the joint one)
    primary_pairs = {(p["label_a"], p["label_b"], p["metric"]) for p in result["primary"]}
    assert not primary_pairs & {(c["a"], c["b"], c["metric"]) for c in result["comparisons"]}
    assert result["exploratory_note"].startswith("exploratory: ") and {r["train_gflop"] > 0 for r in runs} == {True}
    out = capsys.readouterr().out
    assert out.index("primary comparisons (pre-registered") < out.index("p vs base") < out.index("exploratory: ")
    assert "effect (a - b)" in out and "Holm p" in out and "ddpm-flops-matched-ar" in out
    for name in ("tokenizer_psnr_last_frame", "tokenizer_offline_fid", "diffusion_offline_fid",
                 "diffusion_offline_kid", "tokenizer_samples", "diffusion_samples"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    # a second call reuses every run (same arguments): nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/result.json")}
    assert main(["diffusion", "--budget", "smoke", "--out", str(tmp_path)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert [p["name"] for p in json.loads((tmp_path / "experiments.json").read_text())["primary"]] == [
        "diffusion-order", "diffusion-compute"]


def test_estimate_prints_the_budgets_time_from_measured_steps(quick, capsys, monkeypatch):
    monkeypatch.setitem(experiments.BUDGETS, "smoke", TINY)
    assert main(["tokenizer", "--budget", "smoke", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "estimated time of --budget smoke" in out and "with --jobs 2 on a quiet 2-core machine at most" in out
    est = experiments.estimate(["tokenizer"], TINY, {"tokenizer": [], "diffusion": []}, steps=1, samples=4)
    assert [r["arm"] for r in est["arms"]][:2] == ["vqvae-T1", "cvivit-T2-blur-high"] and est["runs"] == 10
    for r in est["arms"]:
        assert r["sec_per_step"] > 0 and r["run_sec"] == pytest.approx(r["steps"] * r["sec_per_step"] + r["eval_sec"])
    longest = max(r["run_sec"] for r in est["arms"])
    total = sum(r["arm_sec"] for r in est["arms"])
    assert est["jobs2_sec"] == pytest.approx(total / 2 + longest / 2 + est["fixed_sec"])


def test_bad_budget_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["all", "--budget", "gpu", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["everything", "--budget", "cpu", "--out", str(tmp_path)])
    for bad, message in ((["--jobs", "0"], "--jobs must be >= 1"), ([], "--out is required")):
        with pytest.raises(SystemExit) as exc:
            main(["all", "--budget", "smoke", *bad, *(["--out", str(tmp_path)] if bad else [])])
        assert exc.value.code == 2 and message in capsys.readouterr().err
