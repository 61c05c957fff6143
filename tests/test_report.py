"""s2d report: the table holds exactly the runs' numbers, the plots are PNGs, bad input is one line + exit 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.report import fmt_accuracy, fmt_duration, moving_average

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_eval(path, *, accuracy, ci, pass_at_k, maj, n=4, prompts=200, by_level=None):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(
        {"kind": "eval", "config": {"model": f"runs/{path.name}-model", "dataset": "toy:split=test"}}))
    metrics = {"dataset": "toy", "model": f"runs/{path.name}-model", "n": n, "num_prompts": prompts,
               "accuracy": accuracy, "accuracy_ci95": ci, "pass@k": pass_at_k, "maj@n": maj}
    if by_level:
        metrics["by_level"] = by_level
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def make_train(path, *, kind, steps, labels, wall, rows):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(
        {"kind": kind, "config": {}, "steps": steps, "labels_used": labels, "wall_time_s": wall}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def runs(tmp_path):
    base = make_eval(tmp_path / "eval-base", accuracy=0.625, ci=[0.5, 0.75],
                     pass_at_k={"1": 0.625, "2": 0.7, "4": 0.8}, maj=0.66,
                     by_level={"1": {"accuracy": 0.9, "num_prompts": 67}, "2": {"accuracy": 0.5, "num_prompts": 67}})
    student = make_eval(tmp_path / "eval-student", accuracy=0.25, ci=[0.2, 0.3], pass_at_k={"1": 0.25}, maj=0.3,
                        n=1)
    grpo = make_train(tmp_path / "grpo", kind="grpo", steps=30, labels=120, wall=95.0,
                      rows=[{"step": s, "loss": 1.0 / (s + 1), "reward_mean": s / 29, "accuracy": s / 29,
                             "kl_ref": 0.01 * s, "lr": 1e-5, "note": "text is ignored"} for s in range(30)])
    opd = make_train(tmp_path / "opd", kind="opd", steps=10, labels=0, wall=300.0,
                     rows=[{"step": s, "loss": 2.0 - 0.1 * s, "reverse_kl": 1.0 - 0.05 * s} for s in range(10)])
    return {"base": base, "student": student, "grpo": grpo, "opd": opd}


def invoke(args):
    return CliRunner().invoke(app, ["report", *map(str, args)])


def test_table_holds_the_numbers(runs, tmp_path):
    out = tmp_path / "report"
    result = invoke([runs["base"], runs["student"], runs["grpo"], runs["opd"], "--out", out, "--title", "Toy"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out / 'results.md'}\n"
    md = (out / "results.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "# Toy"
    header = ("| arm | dataset | prompts × n | accuracy ± 95% CI | 95% CI | pass@1 | pass@2 | pass@4 | maj@n "
              "| labels | steps | train time |")
    assert header in lines
    assert "| eval-base | toy | 200 × 4 | 0.625 ± 0.125 | [0.500, 0.750] | 0.625 | 0.700 | 0.800 | 0.660 | — | — | — |" in lines
    assert "| eval-student | toy | 200 × 1 | 0.250 ± 0.050 | [0.200, 0.300] | 0.250 | — | — | 0.300 | — | — | — |" in lines
    # by level: student has no breakdown
    assert "| arm | 1 | 2 |" in lines
    assert "| eval-base | 0.900 | 0.500 |" in lines and "| eval-student | — | — |" in lines
    # training runs: last logged values; 300 s = 5.0 min
    assert "| grpo | grpo | 30 | 120 | 95 s | 1.000 | 1.000 | 0.0333 |" in lines
    assert "| opd | opd | 10 | 0 | 5.0 min | — | — | 1.1000 |" in lines
    assert "![accuracy per arm](accuracy.png)" in lines and "![training curves](curves.png)" in lines
    for png in ("accuracy.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left over
    # a rerun replaces the report in place
    result = invoke([runs["base"], "--out", out, "--names", "only"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.md"]
    assert "| only | toy | 200 × 4 | 0.625 ± 0.125 |" in (out / "results.md").read_text()


def test_arms_file_names_rows_and_sums_training(runs, tmp_path, monkeypatch):
    arms = {
        "teacher (GRPO)": {"eval": "eval-base", "train": ["grpo"]},
        "student (bridge)": {"eval": "eval-student", "train": ["grpo", "opd"], "labels": 500},
    }
    (tmp_path / "arms.json").write_text(json.dumps(arms))
    monkeypatch.chdir(tmp_path.parent)  # paths in the file are relative to the file's directory
    out = tmp_path / "rep"
    result = invoke(["--arms", tmp_path / "arms.json", "--out", out])
    assert result.exit_code == 0, result.stderr
    lines = (out / "results.md").read_text().splitlines()
    # teacher: labels from grpo's manifest; student: labels from the file, steps 30 + 10, 95 + 300 s = 6.6 min
    assert "| teacher (GRPO) | toy | 200 × 4 | 0.625 ± 0.125 | [0.500, 0.750] | 0.625 | 0.700 | 0.800 | 0.660 | 120 | 30 | 95 s |" in lines
    assert "| student (bridge) | toy | 200 × 1 | 0.250 ± 0.050 | [0.200, 0.300] | 0.250 | — | — | 0.300 | 500 | 40 | 6.6 min |" in lines
    assert sum(line.startswith("| grpo | grpo |") for line in lines) == 1  # a shared run is listed once
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib_only_the_table(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "rep"
    result = invoke([runs["base"], runs["grpo"], "--out", out])
    assert result.exit_code == 0, result.stderr
    assert "plots skipped" in result.stderr
    assert "report: 1 arm, 1 training run, plots: none" in " ".join(result.stderr.split())   # singular, once
    assert sorted(p.name for p in out.iterdir()) == ["results.md"]
    assert ".png" not in (out / "results.md").read_text()


@pytest.mark.parametrize("case", ["missing", "no-manifest", "no-metrics", "rollout", "bad-json", "names",
                                  "arms-key", "foreign-out"])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, case):
    out = tmp_path / "rep"
    bad = tmp_path / "bad"
    args = [runs["base"], bad]
    if case == "no-manifest":
        bad.mkdir()
        (bad / "metrics.json").write_text("{}")
    elif case == "no-metrics":
        bad.mkdir()
        (bad / "manifest.json").write_text(json.dumps({"kind": "eval"}))
    elif case == "rollout":
        bad.mkdir()
        (bad / "manifest.json").write_text(json.dumps({"kind": "rollout", "shards": []}))
    elif case == "bad-json":
        make_train(bad, kind="grpo", steps=2, labels=1, wall=1.0, rows=[{"step": 0, "loss": 1.0}])
        with open(bad / "metrics.jsonl", "a") as f:
            f.write("{not json\n")
    elif case == "names":
        args = [runs["base"], runs["student"], "--names", "a,b,c"]
    elif case == "arms-key":
        bad = tmp_path / "arms.json"
        bad.write_text(json.dumps({"x": {"eval": str(runs["base"]), "label": 3}}))
        args = ["--arms", bad]
    elif case == "foreign-out":
        out.mkdir()
        (out / "model.safetensors").write_text("keep me")
        bad = out
        args = [runs["base"]]
    result = invoke([*args, "--out", out])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("s2d: error: ")
    if case != "names":
        assert str(bad) in result.stderr
    assert case == "foreign-out" or not out.exists()
    if case == "bad-json":
        assert "metrics.jsonl:2: invalid JSON" in result.stderr


def test_formatting_helpers():
    assert fmt_accuracy(0.625, 0.5, 0.75) == "0.625 ± 0.125"
    assert [fmt_duration(s) for s in (None, 42.4, 395, 9000)] == ["—", "42 s", "6.6 min", "2.5 h"]
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_run_names_from_relative_paths_and_eleven_distinct_colours(tmp_path, monkeypatch):
    """`s2d report teacher-grpo ...` named the run "/teacher-grpo" (a relative path's parent has no name);
    with 11 runs the 11th took the 1st's colour."""
    from matplotlib.colors import to_rgba

    from s2d_cli.report import _color, _unique_names

    monkeypatch.chdir(tmp_path)
    for d in ("a/eval", "b/eval", "teacher-grpo"):
        (tmp_path / d).mkdir(parents=True)
    assert _unique_names([Path("teacher-grpo"), Path("a/eval"), Path("b/eval/")]) == ["teacher-grpo", "a/eval",
                                                                                       "b/eval"]
    assert _unique_names([Path(".")]) == [tmp_path.name]
    assert len({to_rgba(_color(i, 11)) for i in range(11)}) == 11
    assert [_color(i, 3) for i in range(3)] == ["C0", "C1", "C2"]


# ---------------------------------------------------------------------------------------------- what the plots show

@pytest.fixture
def figures(monkeypatch):
    """The figures the report draws, by file name (savefig is where a test can see them)."""
    from matplotlib.figure import Figure

    seen = []
    save = Figure.savefig

    def keep(self, path, *args, **kwargs):
        seen.append((Path(path).name, self))
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return seen


def test_plots_fit_the_data_label_every_axis_and_carry_the_title(tmp_path, figures):
    low = make_eval(tmp_path / "eval-low", accuracy=0.005, ci=[0.0, 0.01], pass_at_k={"1": 0.005}, maj=0.005)
    high = make_eval(tmp_path / "eval-high", accuracy=0.015, ci=[0.01, 0.02], pass_at_k={"1": 0.015}, maj=0.015)
    grpo = make_train(tmp_path / "grpo", kind="grpo", steps=40, labels=64, wall=10.0,
                      rows=[{"step": s, "loss": 0.1 * (-1) ** s, "reward_mean": s / 39, "accuracy": s / 39}
                            for s in range(1, 41)])
    kl = make_train(tmp_path / "kl", kind="kl-warmup", steps=5, labels=0, wall=5.0,
                    rows=[{"step": s, "loss": 3.0 - s / 10, "ce": 3.0 - s / 10} for s in range(1, 6)])
    fkl = make_train(tmp_path / "klf", kind="kl-warmup", steps=5, labels=0, wall=5.0,
                     rows=[{"step": s, "loss": 1.0 / s, "forward_kl": 1.0 / s} for s in range(1, 6)])
    opd = make_train(tmp_path / "opd", kind="opd", steps=5, labels=0, wall=5.0,
                     rows=[{"step": s, "loss": 0.5 / s, "reverse_kl": 0.4 / s} for s in range(1, 6)])
    out = tmp_path / "report"
    result = invoke([low, high, grpo, kl, fkl, opd, "--title", "Toy recipe, seed 0", "--out", out])
    assert result.exit_code == 0, result.output
    shown = dict(figures)
    assert set(shown) == {"accuracy.png", "curves.png"}

    (acc_ax,) = shown["accuracy.png"].axes
    assert acc_ax.get_title() == "Toy recipe, seed 0"
    # the top of the axis: the highest interval end (0.02) plus a fifth, not 1
    assert acc_ax.get_ylim() == pytest.approx((0.0, 0.024))
    assert acc_ax.get_ylabel() == "accuracy (avg@n, 95% CI)"

    fig = shown["curves.png"]
    assert fig.get_suptitle() == "Toy recipe, seed 0"
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    # one panel per quantity: GRPO's surrogate, the cross-entropy, the forward KL and the sampled reverse KL
    # apart; kl-warmup's loss (its CE / forward KL again) is not drawn a second time
    assert set(panels) == {"reward", "training accuracy", "policy loss (GRPO surrogate)",
                           "cross-entropy on teacher tokens", "forward KL(teacher || student)",
                           "reverse KL, sampled estimate", "OPD loss"}
    assert all(ax.get_ylabel() for ax in panels.values())
    assert panels["reverse KL, sampled estimate"].get_ylabel() == "nats / token"

    def legend(title):
        return [t.get_text() for t in panels[title].get_legend().get_texts()]

    # 40 GRPO steps: drawn under a moving average over 2 steps (40 // 20), and the legend says so
    assert legend("reward") == ["grpo (mean of 2 steps)"]
    assert legend("policy loss (GRPO surrogate)") == ["grpo (mean of 2 steps)"]
    assert legend("cross-entropy on teacher tokens") == ["kl"]          # 5 points: as they are
    assert legend("OPD loss") == ["opd"]
    # the loss alternates -0.1, 0.1: the faint raw line, then its mean of 2 steps, 0 after the first step
    raw, mean = panels["policy loss (GRPO surrogate)"].get_lines()
    assert list(raw.get_ydata()) == pytest.approx([0.1 * (-1) ** s for s in range(1, 41)])
    assert mean.get_ydata()[0] == pytest.approx(-0.1) and all(y == pytest.approx(0.0) for y in mean.get_ydata()[1:])
