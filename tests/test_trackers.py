"""Trackers through accelerate (report_to, and the older tensorboard / wandb_project keys), eval metrics in
them, and the plain progress lines a training run writes into a log."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2d_cli import cliutil, trackers
from s2d_cli.cli import app
from s2d_cli.errors import UsageError


def s2d(*args, ok: bool = True, env: dict | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def tb_scalars(root: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the TensorBoard event files under `root` (TFRecord framing: length,
    its crc, an Event proto, its crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for f in sorted(root.rglob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else (
                    v.tensor.float_val[0] if v.tensor.float_val else None)
                if value is not None:
                    out.setdefault(v.tag, {})[event.step] = value
    return out


@pytest.fixture(scope="module")
def teacher_text(tmp_path_factory) -> Path:
    """Eight teacher sequences as text (kl-warmup tokenizes them with the student's tokenizer)."""
    path = tmp_path_factory.mktemp("tr") / "seqs.jsonl"
    rows = [{"prompt": f"{a} + {b} =", "completion": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."}
            for a, b in [(1, 2), (3, 4), (12, 5), (7, 8), (20, 22), (9, 9), (31, 4), (6, 60)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kl_warmup(student, data, out, *sets, env=None, ok: bool = True):
    return s2d("kl-warmup", "--student", student, "--rollouts", data, "--eval-rollouts", data,
               "--targets", "sampled", "--steps", 3, "--batch-size", 4, "--lr", 1e-3,
               *[x for kv in sets for x in ("--set", kv)], "--out", out, env=env, ok=ok)


# ---------------------------------------------------------------------------------------------- names

def test_report_to_and_the_older_keys_name_the_same_trackers(monkeypatch):
    monkeypatch.setattr(trackers, "_installed", lambda name: name in ("tensorboard", "wandb"))
    assert trackers.tracker_names(["tensorboard"]) == ["tensorboard"]
    assert trackers.tracker_names([], tensorboard=True) == ["tensorboard"]
    assert trackers.tracker_names("tensorboard,wandb".split(","), tensorboard=True,
                                  wandb_project="p") == ["tensorboard", "wandb"]
    assert trackers.tracker_names(["none"]) == [] and trackers.tracker_names(None) == []
    assert trackers.tracker_names(["all"]) == ["tensorboard", "wandb"]
    with pytest.raises(UsageError, match=r"report_to: mlflow needs the mlflow package \(pip install mlflow\)"):
        trackers.tracker_names(["mlflow"])
    with pytest.raises(UsageError, match="report_to: unknown tracker 'tensorbord'"):
        trackers.tracker_names(["tensorbord"])


def test_a_missing_tracker_package_is_one_line_before_anything_is_written(monkeypatch, tmp_path, tiny_model_dir,
                                                                         teacher_text):
    monkeypatch.setattr(trackers, "_installed", lambda name: False)
    for key, message in (("wandb_project=math", "wandb_project needs the wandb package (pip install wandb)"),
                         ("tensorboard=true", "tensorboard: true needs the tensorboard package (pip install "
                                              "tensorboard)"),
                         ("report_to=aim", "report_to: aim needs the aim package (pip install aim)")):
        result = kl_warmup(tiny_model_dir, teacher_text, tmp_path / "run", key, ok=False)
        assert result.exit_code == 2 and result.stderr == f"s2d: error: {message}\n"
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- training

def test_training_metrics_and_held_out_values_reach_tensorboard(tmp_path, tiny_model_dir, teacher_text):
    kl_warmup(tiny_model_dir, teacher_text, tmp_path / "new", "report_to=tensorboard")
    kl_warmup(tiny_model_dir, teacher_text, tmp_path / "old", "tensorboard=true")     # the older key
    for run in ("new", "old"):
        out = tmp_path / run
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        scalars = tb_scalars(out / "tb")
        assert [r["step"] for r in rows] == [1, 2, 3]
        for key in ("loss", "ce", "grad_norm", "lr", "tokens"):
            assert sorted(scalars[key]) == [1, 2, 3], key
            for r in rows:
                assert scalars[key][r["step"]] == pytest.approx(r[key], rel=1e-6), (key, r["step"])
        manifest = json.loads((out / "manifest.json").read_text())
        assert scalars["eval/heldout_kl_start"] == {3: pytest.approx(manifest["heldout_kl_start"], rel=1e-6)}
        assert scalars["eval/heldout_kl_end"] == {3: pytest.approx(manifest["heldout_kl_end"], rel=1e-6)}
    # the trackers are volatile: naming one does not make a finished run another run
    again = kl_warmup(tiny_model_dir, teacher_text, tmp_path / "new")
    assert "nothing to do" in again.stderr


def test_eval_metrics_reach_the_tracker(tmp_path):
    records = [{"id": "a", "completion": "so \\boxed{4}", "answer": "4"},
               {"id": "b", "completion": "so \\boxed{5}", "answer": "6"},
               {"id": "c", "completion": "\\boxed{1}", "answer": "1"},
               {"id": "d", "completion": "no idea", "answer": "2"}]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    s2d("eval", "--rollouts", data, "--out", tmp_path / "ev", "--set", "report_to=tensorboard")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["accuracy"] == 0.5                          # a and c right, b and d wrong
    scalars = tb_scalars(tmp_path / "ev" / "tb")
    assert scalars["eval/accuracy"] == {0: 0.5}
    assert scalars["eval/num_prompts"] == {0: 4}
    result = s2d("eval", "--rollouts", data, "--set", "report_to=tensorboard", ok=False)
    assert result.exit_code == 2
    assert result.stderr == "s2d: error: report_to: tensorboard writes into the output directory: give --out\n"


# ---------------------------------------------------------------------------------------------- progress

def test_training_writes_plain_progress_lines_into_a_log(monkeypatch, tmp_path, tiny_model_dir, teacher_text):
    """stderr is not a terminal under CliRunner: a line every progress_every = 20 seconds of a fake clock
    that moves 25 s at each look (task start, then one update a step): a line at every step."""
    now = [0.0]

    def clock():
        now[0] += 25.0
        return now[0]

    monkeypatch.setattr(cliutil, "_clock", clock)
    monkeypatch.setenv(cliutil.PROGRESS_EVERY_ENV, "1000")          # the config key wins over it
    result = kl_warmup(tiny_model_dir, teacher_text, tmp_path / "run", "progress_every=20")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in result.stderr.splitlines() if " | step " in line]
    assert len(lines) == 3, result.stderr
    # step k at 25 k seconds after the start: (3 - k) steps left at 25 s each
    for line, row, timing in zip(lines, rows, ("25s elapsed, ETA 50s", "50s elapsed, ETA 25s", "1m15s elapsed")):
        m = re.fullmatch(r"kl-warmup ce (\S+)  loss (\S+) \| step (\d)/3 \| (.*)", line)
        assert m, line
        assert int(m.group(3)) == row["step"]
        assert float(m.group(1)) == pytest.approx(row["ce"], rel=1e-3)
        assert float(m.group(2)) == pytest.approx(row["loss"], rel=1e-3)
        assert m.group(4) == timing
