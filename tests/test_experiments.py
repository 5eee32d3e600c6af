"""The experiments command end to end on a tiny budget: the grid, the JSON rows, the table, the figures."""
import functools
import json

import pytest

from pvkernels_models import experiments, train
from pvkernels_models.experiments import ROW_KEYS, Budget, grid, main, welch_p

TINY = Budget("digits", seeds=2, eval_samples=8, tok_size=8, tok_steps=1, tok_batch=4, tok_frames=(2,),
              diff_size=8, diff_steps=2, diff_batch=4, diff_frames=(2,), timesteps=2, width=8,
              recipe=("--warmup", "1"))


def test_the_grid_has_every_arm_and_control():
    b = experiments.BUDGETS["cpu"]
    tok = {(a.model, a.frames) for a in grid("tokenizer", b)}
    assert {("cvivit", T) for T in (4, 8, 18)} <= tok  # the paper's headline length among them
    arms = {(a.model, a.frames, a.aug): a for a in grid("tokenizer", b)}
    for T in (4, 8, 18):  # the attribution controls at each T: the signal, then the compute
        assert ("cvivit", T, "identity") in arms and ("cvivit", T, "blur") in arms
        assert arms[("vqvae-flops-matched", T, None)].flops_of == f"cvivit-T{T}-blur-high"
        assert "--steps" not in arms[("vqvae-flops-matched", T, None)].argv  # set from the counted FLOPs
    diff = {(a.model, a.frames, a.aug, a.order) for a in grid("diffusion", b)}
    for T in (4, 8):
        assert {("video-diffusion", T, "noise", "first"), ("video-diffusion", T, "noise", "high"),
                ("video-diffusion", T, "blur", "high"), ("video-diffusion", T, "identity", None),
                ("ddpm-flops-matched", T, None, None)} <= diff
    assert ("video-diffusion-lambda1", 4, "noise", "high") in diff and ("ddpm", 1, None, None) in diff
    assert [a.baseline for a in grid("diffusion", b)].count(True) == 1


def test_welch_p():
    assert welch_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert welch_p([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]) < 1e-3
    assert welch_p([1.0], [2.0, 3.0]) is None and welch_p([1.0, 1.0], [1.0, 1.0]) is None


def test_experiments_all_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(experiments.BUDGETS, "smoke", TINY)
    # the offline metrics' classifier in 20 steps instead of 300: the plumbing is under test here
    monkeypatch.setattr(train, "_CLASSIFIERS", {})
    monkeypatch.setattr(train, "train_classifier", functools.partial(train.train_classifier, steps=20))
    assert main(["all", "--budget", "smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "experiments.json").read_text())
    rows = result["rows"]
    assert rows and all(tuple(r) == ROW_KEYS for r in rows)
    assert {(r["experiment"], r["metric"]) for r in rows} == {
        ("tokenizer", "psnr_last_frame"), ("tokenizer", "offline_fid"), ("diffusion", "offline_fid"),
        ("diffusion", "offline_kid")}
    for r in rows:
        baseline = r["model"] in ("vqvae", "ddpm") and r["frames"] == 1
        assert (r["p_vs_baseline"] is None) == baseline, r
        assert r["seeds"] == 2 and r["std"] is not None and r["std"] >= 0
    assert len(rows) == 5 * 2 + 2 * 6  # tokenizer: 5 arms x 2 metrics; diffusion: 6 arms x 2 metrics
    assert all(0 <= run["offline_fid_originals"] for run in result["runs"] if run["arm"].startswith(("vq", "cv")))
    # the FLOP-matched DDPM trains for the video arm's FLOPs: more steps than the video arm
    steps = {run["arm"]: int(run["argv"][run["argv"].index("--steps") + 1]) for run in result["runs"]}
    assert steps["ddpm-flops-matched-T2"] > steps["video-diffusion-T2-noise-high"] == 2
    assert steps["vqvae-flops-matched-T2"] > steps["cvivit-T2-blur-high"] == 1
    assert {c["b"] for c in result["comparisons"]} >= {"DDPM with the FLOPs of T frames (control), T=2",
                                                       "VideoDiffusion, identity (control), T=2",
                                                       "CViViT, identity (control), T=2",
                                                       "VQVAE with CViViT's FLOPs at T (control), T=2"}
    assert {r["train_gflop"] > 0 for r in result["runs"]} == {True}
    out = capsys.readouterr().out
    assert "p vs base" in out and "ddpm-flops-matched" in out and "against the controls" in out
    for name in ("tokenizer_psnr_last_frame", "diffusion_offline_fid", "diffusion_offline_kid",
                 "tokenizer_samples", "diffusion_samples"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    # a second call reuses every run (same arguments): nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/result.json")}
    assert main(["diffusion", "--budget", "smoke", "--out", str(tmp_path)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_bad_budget_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["all", "--budget", "gpu", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["everything", "--budget", "cpu", "--out", str(tmp_path)])
