"""The shell boundary: help and examples, config layering, and bad input as one line, exit 2, nothing written.

Bad input must fail before the output directory (or its `.NAME.partial` staging directory) exists, so a
typo never leaves a half-made artifact that a later stage could pick up or a rerun would trip over.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.verify import VerifyConfig

S2D = str(Path(sys.executable).with_name("s2d"))
OPTIONAL = {"grpo": "grpo", "kl-warmup": "kl_warmup", "opd": "opd", "report": "report", "make-tiny": "tiny",
            "toy": "toy"}


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The error contract: exit 2, exactly one line on stderr, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2d: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


VERIFY_RECORDS = [{"id": "a", "completion": "so \\boxed{4}", "answer": "4"},
                  {"id": "b", "completion": "so \\boxed{5}", "answer": "6"},
                  {"id": "c", "completion": "no idea", "answer": "1"}]


# ---------------------------------------------------------------------------------------------- help

def test_top_level_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    names = {"rollout", "verify", "eval"}
    names |= {name for name, module in OPTIONAL.items() if importlib.util.find_spec(f"s2d_cli.{module}")}
    registered = set(typer.main.get_command(app).commands)
    assert names <= registered
    for name in names:
        assert f" {name} " in result.stdout, name


def test_every_command_help_shows_an_example():
    for name in typer.main.get_command(app).commands:
        result = invoke(name, "--help")
        assert result.exit_code == 0, name
        assert "Example:" in result.stdout and f"s2d {name}" in result.stdout, name


def test_version():
    from s2d_cli import __version__

    assert invoke("--version").stdout.strip() == __version__


# ---------------------------------------------------------------------------------------------- config

def test_config_file_set_and_flags_layer_into_the_manifest(tmp_path):
    records = write_jsonl(tmp_path / "in.jsonl", VERIFY_RECORDS)
    cfg = tmp_path / "verify.yaml"
    cfg.write_text("# s2d verify in.jsonl --config verify.yaml\ntimeout: 2.5\nshard_size: 1\nworkers: 2\n")
    out = tmp_path / "out"
    # yaml < --set < flag: shard_size from --set (2), workers from the flag (1), timeout from the file
    result = invoke("verify", records, "--config", cfg, "--set", "shard_size=2", "--workers", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    resolved = dataclasses.asdict(VerifyConfig(input=str(records), out=str(out), workers=1, timeout=2.5,
                                               shard_size=2))
    assert manifest["config"] == resolved
    assert [s["records"] for s in manifest["shards"]] == [2, 1]
    assert [r["correct"] for r in map(json.loads, (out / manifest["shards"][0]["file"]).open())] == [True, False]


@pytest.mark.parametrize("how", ["set", "yaml"])
def test_unknown_config_key_is_one_line_naming_it(tmp_path, how):
    records = write_jsonl(tmp_path / "in.jsonl", VERIFY_RECORDS)
    out = tmp_path / "out"
    if how == "set":
        args = ["--set", "shard_sise=2"]
    else:
        (tmp_path / "c.yaml").write_text("timeout: 2\nshard_sise: 2\n")
        args = ["--config", tmp_path / "c.yaml"]
    line = one_line_error(invoke("verify", records, *args, "--out", out))
    assert "unknown key 'shard_sise'" in line and "shard_size" in line
    assert "did you mean 'shard_size'?" in line   # the likely key first, before the list of ~20
    if how == "yaml":
        assert "c.yaml" in line
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "timeout=soon"], "timeout: expected a number, got 'soon'"),
    (["--set", "timeout"], "expected key=value"),
    (["--timeout", "0"], "--timeout: expected a finite number in (0, 86400], got 0.0"),
    (["--config", "missing.yaml"], "missing.yaml: config file not found"),
])
def test_bad_config_values_are_one_line(tmp_path, args, message):
    records = write_jsonl(tmp_path / "in.jsonl", VERIFY_RECORDS)
    assert message in one_line_error(invoke("verify", records, *args, "--out", tmp_path / "out"))
    assert not any(tmp_path.glob("*out*")) and not any(tmp_path.glob(".*out*"))


# ---------------------------------------------------------------------------------------------- bad input

def _bad_inputs(tmp_path: Path, model: Path) -> dict[str, tuple[list, str]]:
    """name -> (command line up to --out, what the one error line must say)."""
    (tmp_path / "malformed.jsonl").write_text('{"completion": "x", "answer": "1"}\n\n{"completion": oops}\n')
    write_jsonl(tmp_path / "no_answer.jsonl", [{"completion": "x", "answer": "1"}, {"completion": "y"}])
    write_jsonl(tmp_path / "empty_answer.jsonl", [{"completion": "x", "answer": " "}])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.jsonl").write_bytes('{"completion": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    write_jsonl(tmp_path / "no_prompt.jsonl", [{"question": "1 + 1?", "answer": "2"}, {"text": "hi"}])
    write_jsonl(tmp_path / "no_id.jsonl", [{"completion": "x", "answer": "1"}])
    missing_model = tmp_path / "no-such-model"
    write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "problem": "1 + 1?", "answer": "2"},
                                         {"id": 1, "problem": "2 + 2?", "answer": "4"}])
    write_jsonl(tmp_path / "no_key.jsonl", [{"key": "a", "problem": "1 + 1?", "answer": "2"},
                                            {"problem": "2 + 2?", "answer": "4"}])
    (tmp_path / "blank_then_bad.jsonl").write_text('{"problem": "1 + 1?", "answer": "2"}\n\n'
                                                   '{"problem": 5, "answer": "4"}\n')
    (tmp_path / "blank_then_list.jsonl").write_text('{"completion": "x", "answer": "1"}\n\n'
                                                    '{"completion": "x", "answer": ["1"]}\n')
    return {
        "malformed_jsonl": (["verify", tmp_path / "malformed.jsonl"], "malformed.jsonl:3: invalid JSON"),
        "missing_field": (["verify", tmp_path / "no_answer.jsonl"], "no_answer.jsonl:2: missing field 'answer'"),
        "empty_gold": (["verify", tmp_path / "empty_answer.jsonl"], "empty_answer.jsonl:1: field 'answer' is empty"),
        "empty_file": (["verify", tmp_path / "empty.jsonl"], "empty.jsonl: empty (no records)"),
        "non_utf8": (["verify", tmp_path / "latin1.jsonl"], "latin1.jsonl:1: not valid UTF-8"),
        "missing_input": (["verify", tmp_path / "nope.jsonl"], "nope.jsonl: no such file or directory"),
        "missing_model": (["rollout", "--model", missing_model, "--dataset", "math500", "--limit", "2"],
                          f"{missing_model}: model directory not found"),
        "unknown_dataset": (["rollout", "--model", model, "--dataset", "math501"], "--dataset 'math501'"),
        "rollout_prompt_field": (["rollout", "--model", model, "--dataset", tmp_path / "no_prompt.jsonl"],
                                 "no_prompt.jsonl:2: missing field"),
        "rollout_malformed": (["rollout", "--model", model, "--dataset", tmp_path / "malformed.jsonl"],
                              "malformed.jsonl:3: invalid JSON"),
        "eval_missing_model": (["eval", "--model", missing_model, "--dataset", "math500", "--limit", "2"],
                               "model directory not found"),
        "eval_unknown_dataset": (["eval", "--model", model, "--dataset", "math501"], "--dataset 'math501'"),
        "eval_rollouts_missing_field": (["eval", "--rollouts", tmp_path / "no_id.jsonl"],
                                        "no_id.jsonl:1: missing field 'id'"),
        "eval_rollouts_empty": (["eval", "--rollouts", tmp_path / "empty.jsonl"], "empty (no records)"),
        "duplicate_ids": (["eval", "--model", model, "--dataset", tmp_path / "dup.jsonl"],
                          "dup.jsonl:2: id '1' again (first at record 1)"),
        "id_field_missing": (["rollout", "--model", model, "--dataset", tmp_path / "no_key.jsonl", "--set",
                              "id_field=key"], "no_key.jsonl:2: missing field 'key' (--id-field)"),
        "line_after_a_blank": (["rollout", "--model", model, "--dataset", tmp_path / "blank_then_bad.jsonl"],
                               "blank_then_bad.jsonl:3: field 'problem': expected non-empty text"),
        "gold_line_after_a_blank": (["verify", tmp_path / "blank_then_list.jsonl"],
                                    "blank_then_list.jsonl:3: field 'answer': expected text or a number"),
        "missing_file_like_a_hub_id": (["rollout", "--model", model, "--dataset", "data/missing.jsonl"],
                                       "data/missing.jsonl: no such file"),
        "temperature_nan": (["rollout", "--model", model, "--dataset", "math500", "--temperature", "nan"],
                            "--temperature: expected a finite number >= 0, got nan"),
        "top_k_0": (["rollout", "--model", model, "--dataset", "math500", "--top-k", "0"],
                    "--top-k: expected -1 (off) or >= 1, got 0"),
        "limit_negative": (["eval", "--model", model, "--dataset", "math500", "--limit", "-1"],
                           "--limit: expected >= 1, got -1"),
        "batch_size_0": (["rollout", "--model", model, "--dataset", "math500", "--set", "batch_size=0"],
                         "batch_size: expected >= 1, got 0"),
    }


BAD_INPUT_CASES = ["malformed_jsonl", "missing_field", "empty_gold", "empty_file", "non_utf8", "missing_input",
                   "missing_model", "unknown_dataset", "rollout_prompt_field", "rollout_malformed",
                   "eval_missing_model", "eval_unknown_dataset", "eval_rollouts_missing_field", "eval_rollouts_empty",
                   "temperature_nan", "top_k_0", "limit_negative", "batch_size_0", "duplicate_ids",
                   "id_field_missing", "line_after_a_blank", "gold_line_after_a_blank", "missing_file_like_a_hub_id"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_model_dir, case):
    args, message = _bad_inputs(tmp_path, tiny_model_dir)[case]
    out = tmp_path / "out"
    line = one_line_error(invoke(*args, "--out", out))
    assert message in line, line
    assert not out.exists(), "an output directory was created for bad input"
    assert not (tmp_path / ".out.partial").exists(), "a staging directory was created for bad input"


def test_bad_input_in_a_real_process_prints_only_the_error(tmp_path):
    """No library warning or progress bar may come before the error: stderr is exactly one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([S2D, "rollout", "--model", str(tmp_path / "missing"), "--dataset", "math500",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"s2d: error: {tmp_path / 'missing'}: model directory not found\n"
    assert list(tmp_path.iterdir()) == []


def test_existing_non_artifact_output_is_refused(tmp_path):
    records = write_jsonl(tmp_path / "in.jsonl", VERIFY_RECORDS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    line = one_line_error(invoke("verify", records, "--out", tmp_path / "out"))
    assert "not an s2d artifact" in line and "--force" in line
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (["rollout", "--n", "abc"], "s2d: error: Invalid value for '--n': Input should be a valid integer"),
    (["verify", "--bogus", "1"], "s2d: error: No such option: --bogus"),
    (["nosuch"], "s2d: error: No such command 'nosuch'."),
])
def test_a_malformed_command_line_is_one_line_too(args, message):
    """typer draws a box of several lines for these; the `s2d` script says it in one, with exit 2."""
    p = subprocess.run([S2D, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message) and lines[0].endswith("--help)"), p.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`s2d verify ... --out - | head`: when the reader closes the pipe, s2d stops with SIGPIPE's status
    141 and says nothing (it used to report an internal BrokenPipeError)."""
    source = tmp_path / "many.jsonl"
    source.write_text("".join(json.dumps({"completion": f"\\boxed{{{i}}}", "answer": str(i)}) + "\n"
                              for i in range(3000)))
    p = subprocess.Popen([S2D, "verify", str(source), "--out", "-", "--set", "shard_size=100", "--workers", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(p.stdout.readline())["correct"] is True
    p.stdout.close()
    assert p.wait(timeout=300) == 141
    assert p.stderr.read().strip() == b""          # (a non-terminal progress display ends with a newline)


def test_an_abort_reaching_the_console_script_is_one_line(monkeypatch, capsys):
    """typer's Abort (Ctrl-D at a prompt, say) ends `s2d` with one line and exit 1; typer's copy of click
    has no Abort class of its own, so naming it there turned this into an AttributeError traceback."""
    from s2d_cli import cli

    def aborting(**_):
        raise typer.Abort()

    monkeypatch.setattr(cli, "app", aborting)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1 and capsys.readouterr().err == "s2d: aborted\n"


@pytest.mark.parametrize("args", [[], ["rollout"], ["report"]])
def test_no_arguments_print_the_help_once(args):
    """`s2d` or `s2d CMD` with nothing else: the help, once (it used to be printed twice), exit 2."""
    p = subprocess.run([sys.executable, "-m", "s2d_cli.cli", *args], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stdout.count("Usage:") == 1, p.stdout
    assert "Traceback" not in p.stderr


def test_eval_out_help_does_not_offer_stdout():
    """eval refuses `--out -` (metrics go to stdout without --out): its help must not say '-' streams JSONL."""
    text = " ".join(invoke("eval", "--help").stdout.replace("│", " ").split())
    assert "'-' streams JSONL" not in text
    assert "without it the metrics JSON goes to stdout" in text


def test_progress_writes_nothing_when_stderr_is_not_a_terminal(capfd):
    """A transient bar on a log file or pipe used to leave an empty line before each command's summary."""
    from s2d_cli import cliutil

    with cliutil.progress() as bar:
        task = bar.add_task("work", total=3)
        for _ in range(3):
            bar.advance(task)
    assert capfd.readouterr().err == ""


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_a_line_every_n_seconds_with_an_eta():
    """Where no bar can draw (nohup, Make, CI): a line every N seconds, nothing before the first N."""
    import io

    from s2d_cli.cliutil import PlainProgress

    clock, log = FakeClock(), io.StringIO()
    with PlainProgress(30, stream=log, clock=clock) as bar:
        task = bar.add_task("grpo", total=100, completed=20, unit="step")     # a resumed run: 20 steps already done
        clock.now += 10
        bar.update(task, advance=1, description="grpo accuracy 0.25  loss 0.5")
        assert log.getvalue() == ""                               # 10 s < 30 s: nothing yet
        clock.now += 20
        bar.update(task, advance=1, description="grpo accuracy 0.3  loss 0.4")
        # 2 steps in 30 s (the 20 resumed ones cost nothing): 78 left at 15 s each = 19m30s
        assert log.getvalue() == "grpo accuracy 0.3  loss 0.4 | step 22/100 | 30s elapsed, ETA 19m30s\n"
        clock.now += 29
        bar.advance(task, 2)
        assert log.getvalue().count("\n") == 1                  # 29 s since the last line
        clock.now += 1
        bar.advance(task, 1)
        # 5 steps in 60 s: 75 left at 12 s each = 15m00s
        assert log.getvalue().splitlines()[-1] == "grpo accuracy 0.3  loss 0.4 | step 25/100 | 1m00s elapsed, ETA 15m00s"
        clock.now += 3600
        bar.update(task, completed=100)
    # the closing line: done, no ETA
    assert log.getvalue().splitlines()[-1] == "grpo accuracy 0.3  loss 0.4 | step 100/100 | 1h01m00s elapsed"
    assert log.getvalue().count("\n") == 3


def test_plain_progress_interval_comes_from_the_config_key_then_the_environment(monkeypatch):
    from s2d_cli.cliutil import PROGRESS_EVERY_ENV, progress, progress_every

    monkeypatch.delenv(PROGRESS_EVERY_ENV, raising=False)
    assert progress_every() == 30.0
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "5")
    assert progress_every() == 5.0 and progress_every(12) == 12.0
    assert progress().every == 5.0             # stderr is not a terminal under pytest
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "soon")
    with pytest.raises(Exception, match="S2D_PROGRESS_EVERY='soon': expected a number of seconds"):
        progress_every()


def test_plain_progress_off_and_quiet_for_short_commands():
    import io

    from s2d_cli.cliutil import PlainProgress

    clock, log = FakeClock(), io.StringIO()
    with PlainProgress(0, stream=log, clock=clock) as bar:          # 0: off
        task = bar.add_task("rollout", total=3)
        clock.now += 1e6
        bar.advance(task, 3)
    with PlainProgress(30, stream=log, clock=clock) as bar:         # done within 30 s: no line at all
        task = bar.add_task("rollout", total=3)
        clock.now += 29
        bar.advance(task, 3)
    assert log.getvalue() == ""


# the help examples form one chain, runnable in this order in an empty directory (checked by hand)
EXAMPLE_CHAIN = ["make-tiny", "toy", "grpo", "rollout", "verify", "eval", "kl-warmup", "opd", "report"]


def test_help_examples_read_only_what_earlier_examples_write():
    """Each command's `Example:` reads models and artifacts that an earlier example writes: they used to
    name runs/toy/teacher, runs/toy/student, ... which nothing (not even `make demo`) creates."""
    import re
    import shlex

    written: set[str] = set()
    for name in EXAMPLE_CHAIN:
        text = " ".join(invoke(name, "--help").stdout.replace("│", " ").split())
        argv = shlex.split(re.search(r"Example: (s2d .*?)(?: ╭| Options| Arguments|$)", text).group(1))
        assert argv[:2] == ["s2d", name], argv
        opts = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}
        positional = [a for i, a in enumerate(argv[2:], 2) if not a.startswith("--") and not argv[i - 1].startswith("--")]
        reads = [opts[k] for k in ("--model", "--student", "--teacher", "--rollouts") if k in opts]
        reads += positional if name in ("verify", "report") else []
        for path in reads:
            assert path.removesuffix("/model") in written, (name, path, sorted(written))
        written |= {opts["--out"]} if "--out" in opts else set(positional)


@pytest.mark.parametrize("args", [
    ["grpo", "--model", "m", "--dataset", "toy"],
    ["kl-warmup", "--student", "m", "--rollouts", "r"],
    ["opd", "--student", "m", "--teacher", "t", "--dataset", "toy"],
])
def test_training_out_dash_says_a_directory_is_needed(args):
    """`--out -` on a trainer used to answer 'missing required option --out', though --out was given."""
    line = one_line_error(invoke(*args, "--out", "-"))
    assert "missing" not in line and "--out: a training run writes a directory" in line
    assert "missing required option --out" in one_line_error(invoke(*args))


# ---------------------------------------------------------------------------------------------- example data

@pytest.mark.parametrize("example, args, dataset", [
    ("qwen3", [], "DigitalLearningGmbH/MATH-lighteval:split=train"),
    ("llama", [], "DigitalLearningGmbH/MATH-lighteval:split=train"),
    ("qwen3", ["MATH_TRAIN=data/math-train.jsonl"], "data/math-train.jsonl"),
    ("smollm2", ["TASK=gsm8k"], "openai/gsm8k:main,split=train"),
    ("smollm2", ["TASK=gsm8k", "GSM8K_TRAIN=gsm8k-train.jsonl"], "gsm8k-train.jsonl"),
])
def test_examples_read_the_datasets_hub_ids_unless_given_a_local_file(example, args, dataset):
    """What a user has: the hub ids through --dataset, not this repository's ../shared/data."""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(["make", "-n", "-C", str(root / "examples" / example), "all", "S2D=s2d", *args],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "shared/data" not in p.stdout
    datasets = {line.split("--dataset ", 1)[1].split()[0] for line in p.stdout.splitlines() if "--dataset " in line}
    training = {d for d in datasets if not d.startswith(("math500", "aime", "amc", "gsm8k ", "toy"))} - {"gsm8k"}
    assert training == {dataset}, datasets
