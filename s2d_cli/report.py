"""s2d report — one comparison table and a few plots from eval and training run directories.

    s2d report runs/toy/eval-base runs/toy/eval-student runs/toy/grpo --out runs/toy/report
    s2d report runs/a/eval runs/b/eval --names base,distilled --title "Toy recipe" --out report
    s2d report --arms runs/toy/arms.json --out runs/toy/report
    s2d report --claims runs/toy/seed-0 runs/toy/seed-1 ... [--readme README.md]

Reads each directory's manifest.json (written last, so its presence means the run is complete):
  eval runs (kind "eval")                    -> a row of the table from metrics.json
  training runs (grpo, kl-warmup, opd, ...)  -> curves from metrics.jsonl, a row of the training table
Without --arms every eval directory is an arm named by its directory (or --names, in order). An arms
file names the arms and ties training runs to them, in its own order:

    {"student (bridge + GRPO)": {"eval": "runs/toy/eval-student", "train": ["runs/toy/kl", "runs/toy/opd",
                                 "runs/toy/grpo-student"], "labels": 500}, ...}

`labels` defaults to the sum of the train runs' `labels_used`; steps and train time are their sums.
Relative paths are read from the current directory, else from the arms file's directory.

Writes DIR/results.md, DIR/accuracy.png (accuracy per arm with its 95% interval, on an axis fitted to
them) and, with training runs, DIR/curves.png (one panel per quantity a run logged: reward, training
accuracy, GRPO's policy loss, cross-entropy, forward KL, the sampled reverse-KL estimate..., each with
its y-axis label; one line per run, long noisy curves drawn under a moving average that the legend
names), both titled --title; the
directory is built under a temporary name and renamed, so a report is never half-written. The path of
results.md goes to stdout. Without matplotlib (pip install 's2d[plots]') only results.md is written.

--claims: the run directories are seeds of the toy demo (each holding eval/ARM for the paper's arms);
prints the paper's claims, each a paired difference over problems x seeds with its 95% interval and
verdict (holds / does not hold / undecided; s2d_cli/claims.py), as a markdown table on stdout and one
line per claim on stderr. --readme FILE also rewrites FILE's generated claims block.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from . import cliutil as cu
from .config import resolve
from .errors import UsageError, located

MANIFEST = "manifest.json"
DASH = "—"
# curves.png: one panel per quantity some run logged: (title, y-axis label, metrics.jsonl key, run kinds
# whose key means that quantity; None: any). "loss" is a different quantity per command: GRPO's is its
# clipped surrogate; kl-warmup's repeats its cross-entropy / forward KL (not drawn twice); opd's is the
# KL it descends plus the --alpha term.
PANELS = (
    ("reward", "mean reward", "reward_mean", None),
    ("training accuracy", "accuracy of the sampled completions", "accuracy", None),
    ("policy loss (GRPO surrogate)", "loss", "loss", ("grpo",)),
    ("KL to the reference model", "nats / token", "kl_ref", None),
    ("cross-entropy on teacher tokens", "nats / token", "ce", None),
    ("forward KL(teacher || student)", "nats / token", "forward_kl", None),
    ("reverse KL, sampled estimate", "nats / token", "reverse_kl", None),
    ("reverse KL, full vocabulary", "nats / token", "reverse_kl_exact", None),
    ("reverse KL, top-K", "nats / token", "reverse_kl_topk", None),
    ("OPD loss", "loss", "loss", ("opd",)),
)
SMOOTH_ABOVE = 20     # a curve of more points is drawn faint, under its moving average over ~1/20 of them
REPORT_FILES = ("results.md", "accuracy.png", "curves.png")


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)  # eval and training run directories
    out: str = ""                 # report directory (results.md + PNGs)
    title: str = "s2d results"    # heading of results.md and the title of every plot
    names: str | None = None      # comma-separated names for `runs`, in order
    arms: str | None = None       # JSON file: arm -> {"eval": dir, "train": [dirs], "labels": int}
    claims: bool = False          # runs are seeds of the toy demo: print the paper's claims over them
    readme: str | None = None     # with claims: rewrite this file's generated claims block too

    def validate(self) -> None:
        if self.claims:
            if not self.runs:
                raise UsageError("--claims needs the seeds' run directories (each holding eval/ARM)")
            if self.arms or self.out or self.names:
                raise UsageError("--claims takes only run directories and --readme (not --arms, --out, --names)")
            return
        if self.readme:
            raise UsageError("--readme goes with --claims")
        if not self.out:
            raise UsageError("missing required option --out")
        if not self.runs and not self.arms:
            raise UsageError("nothing to report: give run directories and/or --arms FILE")


@dataclass
class EvalRun:
    path: Path
    metrics: dict[str, Any]
    manifest: dict[str, Any]


@dataclass
class TrainRun:
    path: Path
    name: str
    kind: str
    manifest: dict[str, Any]
    rows: list[dict[str, float]]  # metrics.jsonl, one dict per step, sorted by step


@dataclass
class Arm:
    name: str
    eval: EvalRun
    train: list[TrainRun] = field(default_factory=list)
    labels: int | None = None     # from the arms file; else the train runs' labels_used


# ----------------------------------------------------------------------------------------------
# reading run directories

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_metrics_jsonl(path: Path) -> list[dict[str, float]]:
    """Numeric fields of each line that has a step; a later line for the same step wins."""
    by_step: dict[float, dict[str, float]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise located(path, lineno, f"invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or _number(obj.get("step")) is None:
            continue
        by_step[obj["step"]] = {k: v for k, v in obj.items() if _number(v) is not None}
    return [by_step[s] for s in sorted(by_step)]


def read_run(path: str | Path) -> EvalRun | TrainRun:
    """An eval or training run directory, checked: anything else is a UsageError naming the path."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such directory")
    if not p.is_dir():
        raise UsageError(f"{p}: not a run directory")
    if not (p / MANIFEST).is_file():
        raise UsageError(f"{p}: not a complete s2d run (no {MANIFEST})")
    manifest = _read_json(p / MANIFEST)
    if not isinstance(manifest, dict):
        raise UsageError(f"{p / MANIFEST}: expected a JSON object")
    kind = str(manifest.get("kind"))
    if kind == "eval":
        if not (p / "metrics.json").is_file():
            raise UsageError(f"{p}: eval run without metrics.json")
        metrics = _read_json(p / "metrics.json")
        ci = metrics.get("accuracy_ci95") if isinstance(metrics, dict) else None
        if (not isinstance(metrics, dict) or _number(metrics.get("accuracy")) is None
                or not isinstance(ci, list) or len(ci) != 2 or any(_number(x) is None for x in ci)):
            raise UsageError(f"{p / 'metrics.json'}: expected accuracy and accuracy_ci95 [lo, hi]")
        return EvalRun(p, metrics, manifest)
    if not (p / "metrics.jsonl").is_file():
        raise UsageError(f"{p}: a {kind!r} artifact, not an eval run (metrics.json) or a training run "
                         "(metrics.jsonl)")
    return TrainRun(p, p.name, kind, manifest, read_metrics_jsonl(p / "metrics.jsonl"))


def _resolve_path(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: expected a directory path, got {value!r}")
    p = Path(value)
    return p if p.is_absolute() or p.exists() else base / p


def read_arms(path: str) -> list[tuple[str, Path, list[Path], int | None]]:
    """(name, eval dir, train dirs, labels) per arm of an arms file, in file order."""
    f = Path(path)
    if not f.is_file():
        raise UsageError(f"{f}: arms file not found")
    data = _read_json(f)
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{f}: expected a JSON object of arm name -> {{eval, train, labels}}")
    arms = []
    for name, spec in data.items():
        where = f"{f}: arm {name!r}"
        if not isinstance(spec, dict):
            raise UsageError(f"{where}: expected an object with eval, train, labels")
        unknown = set(spec) - {"eval", "train", "labels"}
        if unknown:
            raise UsageError(f"{where}: unknown key {sorted(unknown)[0]!r} (known keys: eval, labels, train)")
        if "eval" not in spec:
            raise UsageError(f"{where}: missing 'eval' (the arm's eval directory)")
        train = spec.get("train", [])
        if not isinstance(train, list):
            raise UsageError(f"{where}: train: expected a list of run directories")
        labels = spec.get("labels")
        if labels is not None and (isinstance(labels, bool) or not isinstance(labels, int)):
            raise UsageError(f"{where}: labels: expected an integer, got {labels!r}")
        arms.append((str(name), _resolve_path(spec["eval"], f.parent, f"{where}: eval"),
                     [_resolve_path(t, f.parent, f"{where}: train") for t in train], labels))
    return arms


def _color(i: int, n: int):
    """The i-th of n distinct colours: matplotlib's 10-colour cycle while it suffices, tab20 up to 20 (the
    demo has 11 training runs; C0 and C10 were one colour), then evenly spaced hues."""
    if n <= 10:
        return f"C{i}"
    from matplotlib import colormaps
    return colormaps["tab20"](i) if n <= 20 else colormaps["hsv"](i / n)


def _unique_names(paths: list[Path]) -> list[str]:
    """Directory names, with the parent prepended where two runs share a name (a/eval, b/eval)."""
    full = [Path(os.path.abspath(p)) for p in paths]  # "." and "runs/x/" have names too; symlinks keep theirs
    names = [p.name for p in full]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(full, names)]


def collect(cfg: ReportConfig) -> tuple[list[Arm], list[TrainRun]]:
    """Arms (table rows) and the distinct training runs (curves), every directory checked first."""
    given = [Path(r) for r in cfg.runs]
    names = [n.strip() for n in cfg.names.split(",")] if cfg.names else _unique_names(given)
    if len(names) != len(given):
        raise UsageError(f"--names: {len(names)} names for {len(given)} run directories")
    train_by_path: dict[Path, TrainRun] = {}

    def train_run(run: TrainRun, name: str | None = None) -> TrainRun:
        key = run.path.resolve()
        if key not in train_by_path:
            run.name = name or run.name
            train_by_path[key] = run
        return train_by_path[key]

    arms = []
    for name, eval_dir, train_dirs, labels in read_arms(cfg.arms) if cfg.arms else []:
        ev = read_run(eval_dir)
        if not isinstance(ev, EvalRun):
            raise UsageError(f"{eval_dir}: arm {name!r}: 'eval' is a {ev.kind} run, not an eval run")
        runs = [read_run(t) for t in train_dirs]
        for t, r in zip(train_dirs, runs):
            if not isinstance(r, TrainRun):
                raise UsageError(f"{t}: arm {name!r}: 'train' lists an eval run")
        arms.append(Arm(name, ev, [train_run(r) for r in runs], labels))
    for path, name in zip(given, names):
        run = read_run(path)
        if isinstance(run, EvalRun):
            arms.append(Arm(name, run))
        else:
            train_run(run, name)
    seen = [a.name for a in arms]
    dup = next((n for n in seen if seen.count(n) > 1), None)
    if dup is not None:
        raise UsageError(f"two arms are named {dup!r} (use --names or the arms file to tell them apart)")
    return arms, list(train_by_path.values())


# ----------------------------------------------------------------------------------------------
# the table (pure)

def fmt(x: float | None, digits: int = 3) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def fmt_accuracy(acc: float, lo: float, hi: float) -> str:
    """0.625, [0.5, 0.75] -> '0.625 ± 0.125' (± half the interval's width)."""
    return f"{acc:.3f} ± {(hi - lo) / 2:.3f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]], text_columns: int = 1) -> list[str]:
    """A GitHub markdown table; the first `text_columns` are left-aligned, numbers right-aligned."""
    out = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _sum(values: list[Any]) -> float | None:
    nums = [_number(v) for v in values]
    nums = [v for v in nums if v is not None]
    return sum(nums) if nums else None


def arm_labels(arm: Arm) -> int | None:
    if arm.labels is not None:
        return arm.labels
    total = _sum([t.manifest.get("labels_used") for t in arm.train])
    return None if total is None else int(total)


def accuracy_rows(arms: list[Arm]) -> tuple[list[str], list[list[str]]]:
    ks = sorted({str(k) for a in arms for k in a.eval.metrics.get("pass@k") or {}},
                key=lambda k: (int(k), k) if k.isdigit() else (math.inf, k))
    header = ["arm", "dataset", "prompts × n", "accuracy ± 95% CI", "95% CI",
              *[f"pass@{k}" for k in ks], "maj@n", "labels", "steps", "train time"]
    rows = []
    for a in arms:
        m = a.eval.metrics
        lo, hi = m["accuracy_ci95"]
        config = a.eval.manifest.get("config") or {}
        dataset = m.get("dataset") or config.get("dataset") or DASH
        size = f"{m['num_prompts']} × {m['n']}" if "num_prompts" in m and "n" in m else DASH
        steps = _sum([t.manifest.get("steps") for t in a.train])
        labels = arm_labels(a)
        rows.append([a.name, dataset, size, fmt_accuracy(m["accuracy"], lo, hi), f"[{lo:.3f}, {hi:.3f}]",
                     *[fmt(_number((m.get("pass@k") or {}).get(k))) for k in ks], fmt(_number(m.get("maj@n"))),
                     DASH if labels is None else str(labels), DASH if steps is None else str(int(steps)),
                     fmt_duration(_sum([t.manifest.get("wall_time_s") for t in a.train]))])
    return header, rows


def breakdown_rows(arms: list[Arm], key: str) -> tuple[list[str], list[list[str]]] | None:
    """Accuracy per level/subject (metrics' by_level / by_subject), arms as rows; None if no arm has it."""
    groups = sorted({g for a in arms for g in a.eval.metrics.get(key) or {}},
                    key=lambda g: (0, int(g), "") if str(g).isdigit() else (1, 0, str(g)))
    if not groups:
        return None
    rows = [[a.name, *[fmt(_number(((a.eval.metrics.get(key) or {}).get(g) or {}).get("accuracy")))
                       for g in groups]] for a in arms]
    return ["arm", *[str(g) for g in groups]], rows


def last_value(run: TrainRun, key: str) -> float | None:
    return next((r[key] for r in reversed(run.rows) if key in r), None)


def training_rows(runs: list[TrainRun]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "kind", "steps", "labels used", "wall time", "final reward", "final accuracy",
              "final loss"]
    rows = [[t.name, t.kind, str(t.manifest.get("steps", len(t.rows))),
             str(t.manifest["labels_used"]) if t.manifest.get("labels_used") is not None else DASH,
             fmt_duration(_number(t.manifest.get("wall_time_s"))), fmt(last_value(t, "reward_mean")),
             fmt(last_value(t, "accuracy")), fmt(last_value(t, "loss"), 4)] for t in runs]
    return header, rows


def results_markdown(title: str, arms: list[Arm], runs: list[TrainRun], plots: list[str]) -> str:
    lines = [f"# {title}", ""]
    if arms:
        lines += ["## Accuracy", ""]
        lines += _md_table(*accuracy_rows(arms), text_columns=2)
        lines += ["", "Accuracy is avg@n (n samples per prompt) with a 95% normal interval clustered by prompt; "
                      "pass@k is the unbiased estimator, maj@n the majority vote over the n samples. "
                      "Labels, steps and train time add up the arm's training runs.", ""]
        if "accuracy.png" in plots:
            lines += ["![accuracy per arm](accuracy.png)", ""]
        for key, what in (("by_level", "level"), ("by_subject", "subject")):
            table = breakdown_rows(arms, key)
            if table is not None:
                lines += [f"### Accuracy by {what}", "", *_md_table(*table), ""]
    if runs:
        lines += ["## Training runs", "", *_md_table(*training_rows(runs), text_columns=2), ""]
        if "curves.png" in plots:
            lines += ["![training curves](curves.png)", ""]
    lines += ["## Sources", ""]
    for a in arms:
        config = a.eval.manifest.get("config") or {}
        model = a.eval.metrics.get("model") or config.get("model") or DASH
        lines.append(f"- {a.name}: `{a.eval.path}` (model `{model}`)")
    lines += [f"- {t.name}: `{t.path}` ({t.kind})" for t in runs]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# plots (matplotlib's object API: no pyplot, no global backend state)

def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points: [1, 2, 3, 4], 2 -> [1, 1.5, 2.5, 3.5]."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_accuracy(arms: list[Arm], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.1 * len(arms) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    acc = [a.eval.metrics["accuracy"] for a in arms]
    lo = [a - a_.eval.metrics["accuracy_ci95"][0] for a, a_ in zip(acc, arms)]
    hi = [a_.eval.metrics["accuracy_ci95"][1] - a for a, a_ in zip(acc, arms)]
    xs = list(range(len(arms)))
    ax.bar(xs, acc, yerr=[[max(0.0, v) for v in lo], [max(0.0, v) for v in hi]], capsize=4,
           color=[_color(i, len(xs)) for i in xs])
    for x, a in zip(xs, acc):
        ax.annotate(f"{a:.3f}", (x, a), textcoords="offset points", xytext=(6, 3), fontsize=8)
    ax.set_xticks(xs, [a.name for a in arms], rotation=20 if len(arms) > 3 else 0,
                  ha="right" if len(arms) > 3 else "center")
    # the axis fits the data: accuracies of 0.005 and 0.015 are invisible on a fixed 0-1 axis
    top = max([a + max(0.0, h) for a, h in zip(acc, hi)] + [1e-3])
    ax.set_ylim(0, min(1.0, top * 1.2))
    ax.set_ylabel("accuracy (avg@n, 95% CI)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)


def curve_panels(runs: list[TrainRun]) -> list[tuple[str, str, list[tuple[int, TrainRun, list]]]]:
    """The panels curves.png draws: (title, y label, [(run index, run, [(step, value)])]), one per quantity
    of `PANELS` that some run logged."""
    out = []
    for title, ylabel, key, kinds in PANELS:
        lines = []
        for i, run in enumerate(runs):
            if kinds is not None and run.kind not in kinds:
                continue
            pts = [(r["step"], r[key]) for r in run.rows if key in r]
            if pts:
                lines.append((i, run, pts))
        if lines:
            out.append((title, ylabel, lines))
    return out


def smoothing_window(points: int) -> int:
    """Moving-average window of a curve of `points` steps (1: drawn as it is)."""
    return max(2, points // 20) if points > SMOOTH_ABOVE else 1


def plot_curves(runs: list[TrainRun], path: Path, title: str = "") -> bool:
    """One panel per quantity some run logged (`PANELS`); False if there is nothing to draw."""
    from matplotlib.figure import Figure

    panels = curve_panels(runs)
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows + (0.4 if title else 0)), layout="constrained")
    if title:
        fig.suptitle(title)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, ylabel, lines) in zip(axes, panels):
        for i, run, pts in lines:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            color = _color(i, len(runs))
            window = smoothing_window(len(pts))
            if window > 1:  # noisy RL curves: faint raw values under a moving average, named in the legend
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, moving_average(ys, window), color=color, linewidth=1.5,
                        label=f"{run.name} (mean of {window} steps)")
            else:
                ax.plot(xs, ys, color=color, linewidth=1.5, label=run.name, marker="o" if len(pts) < 8 else None,
                        markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=120)
    return True


# ----------------------------------------------------------------------------------------------
# the command

def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in REPORT_FILES and p.suffix != ".png"]
        if foreign:
            raise UsageError(f"{out}: exists and holds more than a report ({foreign[0]}); choose another --out")


def run_claims(cfg: ReportConfig) -> str:
    from . import claims

    results = claims.evaluate_claims([Path(r) for r in cfg.runs])
    text = claims.claims_markdown(results, len(cfg.runs))
    if cfg.readme:
        claims.replace_block(Path(cfg.readme), text)
    for claim, comps, verdict in results:
        diffs = ", ".join(f"{c.a} - {c.b} {c.difference:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]" for c in comps)
        cu.console.print(f"claim: {claim}: {verdict} ({diffs})", soft_wrap=True, markup=False, highlight=False)
    print(text, end="")
    return text


def run(cfg: ReportConfig) -> Path | str:
    from .models import replace_dir

    if cfg.claims:
        return run_claims(cfg)
    out = Path(cfg.out)
    _check_out(out)
    arms, runs = collect(cfg)
    try:
        import matplotlib  # noqa: F401
        have_plots = True
    except ImportError:
        have_plots = False
        cu.console.print("report: matplotlib is not installed, plots skipped (pip install 's2d[plots]')")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{out}: cannot create ({e.strerror})") from None
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        plots = []
        if have_plots and arms:
            plot_accuracy(arms, staging / "accuracy.png", cfg.title)
            plots.append("accuracy.png")
        if have_plots and runs and plot_curves(runs, staging / "curves.png", cfg.title):
            plots.append("curves.png")
        (staging / "results.md").write_text(results_markdown(cfg.title, arms, runs, plots), encoding="utf-8")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    def n(k: int, what: str) -> str:
        return f"{k} {what}" + ("" if k == 1 else "s")
    cu.console.print(f"report: {n(len(arms), 'arm')}, {n(len(runs), 'training run')}, "
                     f"plots: {', '.join(plots) or 'none'}")
    print(out / "results.md")
    return out / "results.md"


def command(
    runs: list[str] = typer.Argument(None, help="Eval and training run directories."),
    out: str = typer.Option(None, "--out", "-o", help="Report directory (results.md + PNG plots)."),
    title: str = typer.Option(None, "--title", help="Heading of results.md and title of every plot."),
    names: str = typer.Option(None, "--names", help="Comma-separated names for the run directories, in order."),
    arms: str = typer.Option(None, "--arms", help="JSON file: arm name -> {eval, train, labels}."),
    claims: bool = typer.Option(False, "--claims", help="The run directories are seeds of the toy demo: print "
                                "the paper's claims (paired difference, 95% interval, verdict) over them."),
    readme: str = typer.Option(None, "--readme", help="With --claims: also rewrite this file's claims block."),
    config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Compare eval runs in a table and plot training curves: DIR/results.md + PNGs.

    With --claims, the runs are seeds of the toy demo and the paper's claims over them go to stdout.

    Example: s2d report runs/eval runs/grpo runs/opd --out runs/report
    """
    flags = cu.given(runs=runs or None, out=out, title=title, names=names, arms=arms, claims=claims or None,
                     readme=readme)
    cu.execute(run, lambda: resolve(ReportConfig, config_file=config, sets=set_, flags=flags))
