"""Experiment trackers, through accelerate's tracker API (`Accelerator(log_with=...)`).

    s2d grpo ... --set report_to=tensorboard                 # out/tb, as `tensorboard --logdir runs` reads it
    s2d grpo ... --set report_to=wandb,mlflow --set tracker_project=math-rl
    s2d eval ... --out runs/eval --set report_to=wandb       # the eval's metrics as one log entry
    report_to: [tensorboard, wandb]                          # the same in a stage YAML

`report_to` takes accelerate's tracker names (tensorboard, wandb, mlflow, aim, clearml, comet_ml,
dvclive, swanlab, trackio), `all` (every one installed) or `none`; each needs its own package. The
older keys still work: `tensorboard: true` adds tensorboard, `wandb_project: NAME` adds wandb with that
project. metrics.jsonl is written either way; the trackers get the same numbers (training: one entry a
step; kl-warmup's held-out values and `s2d eval`'s metrics under eval/). Run name: the --out directory's
name; project (W&B project, MLflow experiment, ...): `tracker_project`, default "s2d".
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .errors import UsageError

# tracker -> the module accelerate imports for it (and the package that provides it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "aim": ("aim", "aim"), "clearml": ("clearml", "clearml"),
            "comet_ml": ("comet_ml", "comet-ml"), "dvclive": ("dvclive", "dvclive"),
            "swanlab": ("swanlab", "swanlab"), "trackio": ("trackio", "trackio")}
DEFAULT_PROJECT = "s2d"


def _installed(name: str) -> bool:
    module = TRACKERS[name][0]
    if name == "tensorboard":    # accelerate writes TensorBoard events with either package
        return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    return importlib.util.find_spec(module) is not None


def tracker_names(report_to: list[str] | str | None, *, tensorboard: bool = False,
                  wandb_project: str | None = None) -> list[str]:
    """The trackers a config asks for (`report_to`, plus the older `tensorboard` / `wandb_project` keys),
    each checked to be known and installed: a run fails here, before its directory exists, not at step 1."""
    if isinstance(report_to, str):
        report_to = [report_to]
    names: list[str] = []
    for raw in report_to or []:
        name = str(raw).strip().lower().replace("-", "_")
        if name in ("none", ""):
            continue
        if name == "all":
            names.extend(n for n in TRACKERS if _installed(n))
            continue
        if name == "comet":
            name = "comet_ml"
        if name not in TRACKERS:
            raise UsageError(f"report_to: unknown tracker {raw!r} (expected {', '.join(TRACKERS)}, all or none)")
        if not _installed(name):
            package = TRACKERS[name][1]
            raise UsageError(f"report_to: {name} needs the {package} package (pip install {package})")
        names.append(name)
    if tensorboard:
        if not _installed("tensorboard"):
            raise UsageError("tensorboard: true needs the tensorboard package (pip install tensorboard)")
        names.append("tensorboard")
    if wandb_project:
        if not _installed("wandb"):
            raise UsageError("wandb_project needs the wandb package (pip install wandb)")
        names.append("wandb")
    return list(dict.fromkeys(names))


def tracker_project(cfg) -> str:
    return getattr(cfg, "tracker_project", None) or getattr(cfg, "wandb_project", None) or DEFAULT_PROJECT


def names_of(cfg) -> list[str]:
    return tracker_names(getattr(cfg, "report_to", None), tensorboard=getattr(cfg, "tensorboard", False),
                         wandb_project=getattr(cfg, "wandb_project", None))


def log_with(names: list[str], out: Path) -> list:
    """What `Accelerator(log_with=...)` takes: TensorBoard as accelerate's own tracker writing to out/tb
    (where s2d always wrote it; by name, accelerate would write to out/PROJECT), the others by name."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker("tb", str(out)) if n == "tensorboard" else n for n in names]


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Trackers take scalars and strings as hyperparameters (TensorBoard's hparams refuse lists)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            value = str(value)
        out[key] = value
    return out


def start(acc, cfg, *, out: Path, config: dict[str, Any]) -> None:
    """Start the trackers an `Accelerator(log_with=log_with(...))` was made with (main process only)."""
    if not acc.log_with:
        return
    acc.init_trackers(tracker_project(cfg), config=flat_config(config),
                      init_kwargs={"wandb": {"name": out.name}, "mlflow": {"run_name": out.name},
                                   "clearml": {"task_name": out.name}})


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The values a tracker can plot: numbers, nested dicts flattened with '/' (eval's pass@k, by level)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            out.update(numeric(value, f"{prefix}{key}/"))
    return out


def finish(acc) -> None:
    """Close the trackers (not `acc.end_training()`, which would also tear down the process group)."""
    for tracker in getattr(acc, "trackers", []):
        tracker.finish()
    acc.trackers = []


def log_once(cfg, metrics: dict[str, Any], *, out: str | Path | None, config: dict[str, Any],
             prefix: str = "eval/") -> None:
    """A command that is not a training run (`s2d eval`): its metrics as one entry in the trackers its
    config names. Without --out, TensorBoard has nowhere to write: the run name is then the config's."""
    names = names_of(cfg)
    if not names:
        return
    from accelerate import Accelerator

    root = Path(out) if out else Path(".")
    import torch

    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=log_with(names, root), project_dir=str(root))
    start(acc, cfg, out=root.resolve(), config=config)
    acc.log(numeric(metrics, prefix), step=0)
    finish(acc)
