"""The demo: one progress line per run on a terminal (none off one), KID's scale in its table, --help."""
import pytest

from pvkernels_models import demo

from .test_train import help_blocks, screen, terminal

TINY = ["--image-size", "8", "--batch-size", "8", "--eval-samples", "8", "--width", "16"]


def test_one_progress_line_per_run_on_a_terminal(tmp_path, monkeypatch):
    stderr = terminal(monkeypatch)
    for seed in (0, 1):
        result = demo.run("vqvae", seed, 2, tmp_path, 1, TINY, label=f"[{seed + 1}/2] ")
        assert result["psnr_last_frame"] > 0
    lines = screen(stderr.getvalue())
    assert len(lines) == 3 and lines[2] == "", lines  # two lines, each ended
    for seed, line in enumerate(lines[:2]):
        assert line.startswith(f"[{seed + 1}/2] vqvae, seed {seed}: 2 steps and the evaluation in "), line
        assert " s: PSNR " in line and line.endswith(" dB")
    states = stderr.getvalue().split("\n")[0].split("\r")
    assert any("] step 2/2 loss" in s for s in states) and any("eval (EMA): reconstructing" in s for s in states)


def test_no_progress_off_a_terminal(tmp_path, capsys):
    demo.run("vqvae", 0, 2, tmp_path, 1, TINY, label="[1/1] ")
    assert capsys.readouterr().err == ""


def test_the_table_says_kids_scale(capsys):
    rows = [{"model": "ddpm", "metric": "offline_kid", "mean": 151.4, "std": None, "seeds": 1, "train_sec": 1.0}]
    demo.print_table(rows, {"cvivit": {"reference": 0.1}}, "a setting")
    out = capsys.readouterr().out
    assert "151.4" in out and "offline_kid: KID on the same features (the plain value, not x 1000)" in out


def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    blocks = help_blocks(capsys.readouterr().out)
    assert "(default: 300)" in blocks["--steps"] and "(default: runs/demo)" in blocks["--out"]
    assert "(default: 4)" in blocks["--frames"] and "(default: 1)" in blocks["--seeds"]
