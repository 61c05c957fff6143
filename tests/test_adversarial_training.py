"""Adversarial inputs to training and sampling (issue 19, items 3, 4, 5, 7): nothing silently wrong.

  non-finite flags   every float key of every command is in config.FLOAT_RANGES; NaN, inf and
                     out-of-range values from a flag, --set or YAML: one line naming key, value and
                     range, exit 2, nothing written
  hostile rewards    a --reward function returning NaN, inf, text or None: one line naming the prompt
                     and sample, exit 2, no weights written
  NaN step           a step whose loss or gradient norm is NaN stops the run (one line: step, metric),
                     keeps the last good checkpoint (finite weights), writes no model/, and the same
                     command resumes from that checkpoint to the weights of an uninterrupted run
  bad model dirs     a truncated, garbage or empty model.safetensors (student, teacher, reference,
                     sampler; also under --force, which then keeps the finished run), a model without
                     tokenizer files, --out on a symlink loop, --out - onto /dev/full: one line naming
                     the file and what is wrong
  long prompts       a prompt longer than the model's context minus max_new_tokens is refused naming
                     the record, or skipped and counted with long_prompts=skip; a 6 MB prompt is
                     refused before it is tokenized
  --force            over a finished run redoes it (it crashed with FileNotFoundError); the refusal of
                     a changed config names the keys that differ, steps first, not --resume
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from s2d_cli.cli import app

BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def s2d(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def one_line(result, code: int = 2) -> str:
    """The error contract: `code`, one line on stderr, no traceback; returns the message after 's2d: error: '."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2d: error: "), result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.output
    return lines[0][len("s2d: error: "):]


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "master_fp32.safetensors":
            state.update(load_file(f))
    return state


@pytest.fixture
def sequences(tmp_path) -> Path:
    """Teacher sequences for kl-warmup: plain prompt + completion text (tokenized by the student)."""
    path = tmp_path / "seqs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a} + {a} =", "completion": f" {2 * a}"}) + "\n"
                            for a in range(4)))
    return path


def kl_warmup(student, sequences, out, *extra, ok: bool = True):
    return s2d("kl-warmup", "--student", student, "--rollouts", sequences, "--batch-size", 2, "--lr", 1e-3,
               "--out", out, *extra, ok=ok)


# ------------------------------------------------------------------------------------------------
# item 3: non-finite and out-of-range numbers

def config_classes():
    from s2d_cli.evaluate import EvalConfig
    from s2d_cli.grpo import GRPOConfig
    from s2d_cli.kl_warmup import KLWarmupConfig
    from s2d_cli.opd import OPDConfig
    from s2d_cli.report import ReportConfig
    from s2d_cli.rollout import RolloutConfig
    from s2d_cli.tiny import TinyConfig
    from s2d_cli.toy import ToyConfig
    from s2d_cli.verify import VerifyConfig

    return [RolloutConfig, EvalConfig, VerifyConfig, GRPOConfig, KLWarmupConfig, OPDConfig, ReportConfig,
            TinyConfig, ToyConfig]


def test_every_float_key_of_every_command_has_a_range():
    """A float key added later without a range would accept NaN again: the table must name it."""
    from s2d_cli.config import FLOAT_RANGES, FLOAT_RANGES_OF, float_range, is_float_key

    seen = set()
    for cls in config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if is_float_key(hints[f.name]):
                seen.add(f.name)
                assert f.name in FLOAT_RANGES or f.name in FLOAT_RANGES_OF.get(cls.__name__, {}), (cls, f.name)
                default = f.default
                assert default is None or default in float_range(cls, f.name), (cls, f.name, default)
    assert {"temperature", "top_p", "lr", "clip_low", "clip_high", "beta", "alpha", "timeout", "discount",
            "is_cap", "max_grad_norm", "adam_beta1", "adam_beta2"} <= seen


def test_ranges_by_hand():
    from s2d_cli.config import Range, float_range
    from s2d_cli.kl_warmup import KLWarmupConfig
    from s2d_cli.rollout import RolloutConfig

    unit_open_top = Range(0, 1, hi_open=True)
    assert [x in unit_open_top for x in (0.0, 0.5, 1.0, -1e-9, math.nan, math.inf)] == \
        [True, True, False, False, False, False]
    assert str(unit_open_top) == "in [0, 1)" and str(Range(0, lo_open=True)) == "> 0"
    assert 0.0 in float_range(RolloutConfig, "temperature")         # sampling: 0 is greedy
    assert 0.0 not in float_range(KLWarmupConfig, "temperature")    # the KL divides by it
    assert math.inf not in float_range(RolloutConfig, "temperature")


@pytest.mark.parametrize("args, message", [
    (["kl-warmup", "--temperature", "nan"], "--temperature: expected a finite number > 0, got nan"),
    (["kl-warmup", "--temperature", "inf"], "--temperature: expected a finite number > 0, got inf"),
    (["kl-warmup", "--set", "temperature=0"], "--set: temperature: expected a finite number > 0, got 0.0"),
    (["kl-warmup", "--lr", "inf"], "--lr: expected a finite number in (0, 1], got inf"),
    (["kl-warmup", "--set", "max_grad_norm=nan"], "--set: max_grad_norm: expected a finite number >= 0, got nan"),
    (["kl-warmup", "--set", "weight_decay=-inf"], "--set: weight_decay: expected a finite number >= 0, got -inf"),
    (["opd", "--set", "alpha=inf"], "--set: alpha: expected a finite number >= 0, got inf"),
    (["opd", "--alpha", "nan"], "--alpha: expected a finite number >= 0, got nan"),
    (["opd", "--discount", "nan"], "--discount: expected a finite number in [0, 1], got nan"),
    (["grpo", "--set", "clip_low=nan"], "--set: clip_low: expected a finite number in [0, 1], got nan"),
    (["grpo", "--set", "clip_high=inf"], "--set: clip_high: expected a finite number >= 0, got inf"),
    (["grpo", "--beta", "nan"], "--beta: expected a finite number >= 0, got nan"),
    (["grpo", "--set", "is_cap=nan"], "--set: is_cap: expected a finite number >= 0, got nan"),
    (["grpo", "--temperature", "inf"], "--temperature: expected a finite number >= 0, got inf"),
    (["rollout", "--top-p", "nan"], "--top-p: expected a finite number in (0, 1], got nan"),
    (["eval", "--set", "gpu_memory_utilization=nan"],
     "--set: gpu_memory_utilization: expected a finite number in (0, 1], got nan"),
    (["verify", "--set", "timeout=1e300"], "--set: timeout: expected a finite number in (0, 86400], got 1e+300"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(tiny_model_dir, sequences, tmp_path, args, message):
    command, *rest = args
    model = str(tiny_model_dir)
    small = ["--steps", "1", "--max-new-tokens", "2", "--limit", "2"]   # short, should a value get through
    needs = {"kl-warmup": ["--student", model, "--rollouts", str(sequences), "--steps", "1"],
             "opd": ["--student", model, "--teacher", model, "--dataset", "toy", *small],
             "grpo": ["--model", model, "--dataset", "toy", *small],
             "rollout": ["--model", model, "--dataset", "toy", *small[2:]],
             "eval": ["--model", model, "--dataset", "toy", *small[2:]],
             "verify": [str(sequences)]}[command]
    out = tmp_path / "out"
    assert one_line(s2d(command, *needs, *rest, "--out", out, ok=False)) == message
    assert not out.exists()


def test_a_yaml_value_is_named_with_its_file(tiny_model_dir, sequences, tmp_path):
    (tmp_path / "stage.yaml").write_text("beta: .nan\n")
    result = s2d("grpo", "--model", tiny_model_dir, "--dataset", "toy", "--config", tmp_path / "stage.yaml",
                 "--steps", 1, "--limit", 2, "--max-new-tokens", 2, "--out", tmp_path / "out", ok=False)
    assert one_line(result) == f"{tmp_path / 'stage.yaml'}: beta: expected a finite number >= 0, got nan"


REWARDS = '''
import math
def nan(completion, answer): return math.nan
def inf(completion, answer): return -math.inf
def text(completion, answer): return "1"
def nothing(completion, answer): return None
def numpy_like(completion, answer):
    import torch
    return torch.tensor(0.5)      # a 0-d tensor is a number
'''


@pytest.mark.parametrize("name, shown", [("nan", "returned nan"), ("inf", "returned -inf"),
                                         ("text", "returned str '1'"), ("nothing", "returned NoneType None")])
def test_a_reward_that_is_not_a_finite_number_names_the_record(tiny_model_dir, tmp_path, monkeypatch, name, shown):
    (tmp_path / "hostile_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    result = s2d("grpo", "--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward",
                 f"hostile_rewards:{name}", "--steps", 1, "-G", 2, "-P", 1, "--max-new-tokens", 2,
                 "--backend", "hf", "--out", out, ok=False)
    message = one_line(result)
    assert message.startswith(f"--reward hostile_rewards:{name}: prompt '") and \
        message.endswith(f"' sample 0: {shown}; expected a finite number"), message
    assert not out.exists()      # failed before its first step: nothing left, no weights


def test_a_number_like_reward_is_taken(tiny_model_dir, tmp_path, monkeypatch):
    from s2d_cli.grpo import function_reward

    (tmp_path / "hostile_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import hostile_rewards

    rec = {"completion": "x", "answer": "1", "id": "p1", "sample": 3}
    assert function_reward(hostile_rewards.numpy_like, "m:f", rec) == 0.5
    assert function_reward(lambda c, a: True, "m:f", rec) == 1.0


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_non_finite_step_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, sequences, tmp_path,
                                                                     monkeypatch, what):
    """Step 3 of 4 goes NaN (its loss, or only its gradient): exit 2 naming step and metric; checkpoints
    1 and 2 stay with finite weights, nothing of step 3 is logged or saved, no model/ and no manifest.
    The same command then resumes from step 2 and ends on the weights of a run that never failed."""
    from s2d_cli import losses

    original, calls = losses.forward_kl_sampled, [0]

    def poisoned(logp_BT, mask_BT, **kw):
        calls[0] += 1                       # one micro-batch a step: call 3 is step 3
        if calls[0] == 3 and what == "gradient norm":
            logp_BT.register_hook(lambda g: g * math.nan)      # the loss stays finite, its gradient not
        loss, m = original(logp_BT, mask_BT, **kw)
        return (loss * math.nan if calls[0] == 3 and what == "loss" else loss), m

    run, clean = tmp_path / "run", tmp_path / "clean"
    args = ("--steps", 4, "--set", "save_every=1")
    monkeypatch.setattr(losses, "forward_kl_sampled", poisoned)
    message = one_line(kl_warmup(tiny_model_dir, sequences, run, *args, ok=False))
    assert message == (f"step 3: {what} is nan, not finite: training stopped, nothing of this step saved; "
                       f"{run} keeps its last good checkpoint step-000002 (rerun to resume from it). "
                       "Lower --lr, keep max_grad_norm > 0, or check the data and rewards")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert all(torch.isfinite(w).all() for w in weights(run / "checkpoints" / "step-000002").values())
    assert not (run / "model").exists() and not (run / "manifest.json").exists()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    monkeypatch.setattr(losses, "forward_kl_sampled", original)
    kl_warmup(tiny_model_dir, sequences, run, *args)                  # resumes at step 3
    kl_warmup(tiny_model_dir, sequences, clean, *args)
    a, b = weights(run / "model"), weights(clean / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# item 4: bad model directories and outputs

def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    weights_file = dst / "model.safetensors"
    if how == "truncated":
        data = weights_file.read_bytes()
        weights_file.write_bytes(data[:len(data) // 2])
    elif how == "garbage":
        weights_file.write_bytes(b"<html>404 Not Found</html>\n" * 20)
    elif how == "empty":
        weights_file.write_bytes(b"")
    elif how == "no tokenizer":
        for f in dst.iterdir():
            if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
                f.unlink()
    return dst


SAFETENSORS_ERRORS = {"truncated": "incomplete metadata, file not fully covered",
                      "garbage": "header too large", "empty": "header too small"}


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("role", ["kl-warmup student", "kl-warmup teacher", "opd teacher", "grpo reference",
                                  "rollout model", "eval model"])
def test_a_damaged_weights_file_is_named(tiny_model_dir, sequences, tmp_path, role, how):
    bad = damaged_copy(tiny_model_dir, tmp_path / "bad", how)
    good, out = str(tiny_model_dir), tmp_path / "out"
    args = {
        "kl-warmup student": ["kl-warmup", "--student", bad, "--rollouts", sequences, "--steps", 1],
        "kl-warmup teacher": ["kl-warmup", "--student", good, "--teacher", bad, "--targets", "full",
                              "--rollouts", sequences, "--steps", 1],
        "opd teacher": ["opd", "--student", good, "--teacher", bad, "--dataset", "toy", "--steps", 1,
                        "--limit", 2, "--max-new-tokens", 2],
        "grpo reference": ["grpo", "--model", bad, "--beta", 0.1, "--dataset", "toy", "--steps", 1,
                           "--limit", 2, "--max-new-tokens", 2],
        "rollout model": ["rollout", "--model", bad, "--dataset", "toy", "--limit", 1, "--max-new-tokens", 2],
        "eval model": ["eval", "--model", bad, "--dataset", "toy", "--limit", 1, "--max-new-tokens", 2],
    }[role]
    message = one_line(s2d(*args, "--out", out, ok=False))
    assert message.startswith(f"{bad / 'model.safetensors'}: not a readable safetensors file ("), message
    assert SAFETENSORS_ERRORS[how] in message
    assert not out.exists()


@pytest.mark.parametrize("command", ["kl-warmup", "rollout"])
def test_a_model_without_tokenizer_files_is_named(tiny_model_dir, sequences, tmp_path, command):
    bad = damaged_copy(tiny_model_dir, tmp_path / "bad", "no tokenizer")
    args = ["kl-warmup", "--student", bad, "--rollouts", sequences] if command == "kl-warmup" else \
        ["rollout", "--model", bad, "--dataset", "toy", "--limit", 1, "--max-new-tokens", 2]
    message = one_line(s2d(*args, "--out", tmp_path / "out", ok=False))
    assert message == (f"{bad}: no tokenizer files (expected tokenizer.json or tokenizer_config.json inside); "
                       "copy them from the model this one was trained from")


def test_force_with_a_damaged_model_keeps_the_finished_run(tiny_model_dir, sequences, tmp_path):
    run = tmp_path / "run"
    kl_warmup(tiny_model_dir, sequences, run, "--steps", 1)
    before = weights(run / "model")
    bad = damaged_copy(tiny_model_dir, tmp_path / "bad", "truncated")
    message = one_line(kl_warmup(bad, sequences, run, "--steps", 1, "--force", ok=False))
    assert message.startswith(f"{bad / 'model.safetensors'}: not a readable safetensors file")
    after = weights(run / "model")
    assert (run / "manifest.json").is_file() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("command", ["kl-warmup", "rollout", "eval"])
def test_out_on_a_symlink_loop_is_named(tiny_model_dir, sequences, tmp_path, command):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    model = str(tiny_model_dir)
    args = {"kl-warmup": ["kl-warmup", "--student", model, "--rollouts", sequences],
            "rollout": ["rollout", "--model", model, "--dataset", "toy", "--limit", 1, "--max-new-tokens", 2],
            "eval": ["eval", "--model", model, "--dataset", "toy", "--limit", 1, "--max-new-tokens", 2]}[command]
    message = one_line(s2d(*args, "--out", loop / "run", ok=False))
    assert message == f"--out {loop / 'run'}: Too many levels of symbolic links (a symlink loop)"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_stdout_onto_a_full_disk_is_one_line(tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([str(BIN / "s2d"), "rollout", "--model", str(tiny_model_dir), "--dataset", "toy",
                               "--limit", "2", "--max-new-tokens", "2", "--out", "-"],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "s2d: error: <stdout>: No space left on device (errno 28); free some space or write elsewhere"]


# ------------------------------------------------------------------------------------------------
# item 7: --force over a finished run, and the config-change message

def test_force_over_a_finished_run_redoes_it(tiny_model_dir, sequences, tmp_path):
    run = tmp_path / "run"
    kl_warmup(tiny_model_dir, sequences, run, "--steps", 2)
    first = json.loads((run / "manifest.json").read_text())["created"]
    time.sleep(1.1)                      # `created` has one-second resolution
    kl_warmup(tiny_model_dir, sequences, run, "--steps", 2, "--force")
    assert json.loads((run / "manifest.json").read_text())["created"] != first
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]


def test_a_changed_config_names_the_keys_that_differ(tiny_model_dir, sequences, tmp_path):
    run = tmp_path / "run"
    kl_warmup(tiny_model_dir, sequences, run, "--steps", 2)
    message = one_line(kl_warmup(tiny_model_dir, sequences, run, "--steps", 3, "--resume", "--lr", 2e-3,
                                 "--set", "save_every=1", ok=False))
    assert message == (f"{run}: holds a finished kl-warmup run with a different config "
                       "(steps: 2 -> 3, lr: 0.001 -> 0.002); to train on from it, start a new --out with "
                       f"--student {run}/model (--force replaces the finished run)")


def test_run_config_diff_by_hand():
    from s2d_cli.trainer import run_config_diff

    old = {"steps": 2, "lr": 1e-3, "resume": False, "seed": 0, "out": "a", "beta": 0.0, "n": 1, "chat": "auto"}
    new = {"steps": 3, "lr": 1e-3, "resume": True, "seed": 1, "out": "b", "beta": 0.1, "n": 2, "chat": "plain"}
    assert run_config_diff(old, new, None, None) == \
        "steps: 2 -> 3, beta: 0.0 -> 0.1, chat: 'auto' -> 'plain', n: 1 -> 2, 1 more: seed"
    assert run_config_diff({**old, "resume": True}, old, [{"path": "d", "sha256": "x"}],
                           [{"path": "d", "sha256": "y"}]) == "input d changed since"
    assert run_config_diff(old, old, None, None) == "a different command"


# ------------------------------------------------------------------------------------------------
# item 5: prompts longer than the model's context

CONTEXT, MAX_NEW = 64, 8          # room for a prompt: 56 tokens


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory, tokenizer_dir) -> Path:
    from s2d_cli.models import build_tiny_model, load_tokenizer

    return build_tiny_model(tmp_path_factory.mktemp("ctx") / "m", tokenizer=load_tokenizer(str(tokenizer_dir)),
                            max_position_embeddings=CONTEXT)


@pytest.fixture
def prompts(tmp_path) -> Path:
    """Prompts of 21, 61 and 56 tokens with chat=plain and no instruction: digits are split one by one
    and the rendered prompt is the problem plus a newline (one token)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "problem": "7" * k, "answer": "7"}) + "\n"
                            for i, k in (("a", 20), ("b", 60), ("c", 55))))
    return path


PLAIN = ["--set", "chat=plain", "--set", "instruction=", "--max-new-tokens", MAX_NEW]


def test_the_prompt_lengths_are_what_the_tokenizer_says(short_context_model):
    from s2d_cli.models import load_tokenizer

    tok = load_tokenizer(str(short_context_model))
    assert [len(tok("7" * k + "\n")["input_ids"]) for k in (20, 60, 55)] == [21, 61, 56]


@pytest.mark.parametrize("command", ["rollout", "eval", "grpo", "opd"])
def test_a_prompt_longer_than_the_context_is_refused_naming_it(short_context_model, prompts, tmp_path, command):
    model = str(short_context_model)
    args = {"rollout": ["rollout", "--model", model], "eval": ["eval", "--model", model],
            "grpo": ["grpo", "--model", model, "--steps", 1, "-G", 2, "-P", 1],
            "opd": ["opd", "--student", model, "--teacher", model, "--steps", 1, "--n", 1, "-P", 1]}[command]
    out = tmp_path / "out"
    message = one_line(s2d(*args, "--dataset", prompts, *PLAIN, "--out", out, ok=False))
    assert message == (f"{prompts}: prompt 'b' is 61 tokens; the model's 64-position context minus max_new_tokens 8 "
                       "leaves 56 (shorten it, lower --max-new-tokens, or --set long_prompts=skip)")
    assert not out.exists()


def test_long_prompts_skip_leaves_them_out_and_counts_them(short_context_model, prompts, tmp_path):
    from s2d_cli.artifacts import read_records

    out = tmp_path / "out"
    result = s2d("rollout", "--model", short_context_model, "--dataset", prompts, *PLAIN, "--set",
                 "long_prompts=skip", "--out", out)
    assert f"{prompts}: left out 1 of 3 prompts longer than 56 tokens" in " ".join(result.stderr.split())
    assert [r["id"] for r in read_records(out)] == ["a", "c"]      # c: exactly the 56 tokens there is room for
    assert json.loads((out / "manifest.json").read_text())["skipped_long_prompts"] == 1
    run = tmp_path / "grpo"
    s2d("grpo", "--model", short_context_model, "--dataset", prompts, *PLAIN, "--set", "long_prompts=skip",
        "--steps", 1, "-G", 2, "-P", 1, "--backend", "hf", "--out", run)
    assert json.loads((run / "manifest.json").read_text())["skipped_long_prompts"] == 1


def test_a_huge_prompt_is_refused_before_it_is_rendered_or_tokenized(short_context_model, tmp_path, monkeypatch):
    """6 MB of text: the bound by characters refuses it (the message counts characters, not tokens), and
    neither the chat template nor the tokenizer ever sees it."""
    from s2d_cli import rollout

    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"id": "short", "problem": "1 + 1"}) + "\n"
                    + json.dumps({"id": "huge", "problem": "x" * 6_000_000}) + "\n")
    render = rollout.render_prompt

    def small_only(tokenizer, problem, **kw):
        assert len(problem) < 1000, "a huge prompt was rendered"
        return render(tokenizer, problem, **kw)

    monkeypatch.setattr(rollout, "render_prompt", small_only)
    message = one_line(s2d("rollout", "--model", short_context_model, "--dataset", path, "--max-new-tokens", MAX_NEW,
                           "--out", tmp_path / "out", ok=False))
    assert message.startswith(f"{path}: prompt 'huge' is 6,000,000 characters, more than 56 tokens hold; "), message


def test_kl_warmup_refuses_or_skips_a_sequence_longer_than_the_context(short_context_model, tmp_path):
    seqs = tmp_path / "seqs.jsonl"
    seqs.write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt_ids": [5] * 10, "completion_ids": [6] * 10},
        {"prompt_ids": [5] * 40, "completion_ids": [6] * 30},          # 70 tokens > 64
        {"prompt_ids": [5] * 32, "completion_ids": [6] * 32},          # exactly 64: fits
        {"prompt": "x" * 6_000_000, "completion": "1"})))            # refused by its characters
    run = tmp_path / "run"
    message = one_line(kl_warmup(short_context_model, seqs, run, "--steps", 1, ok=False))
    assert message == (f"{seqs}: record 2: prompt + completion is 70 tokens, longer than the model's 64-position "
                       "context (shorten it, or --set long_prompts=skip)")
    seqs.write_text("".join(line + "\n" for i, line in enumerate(seqs.read_text().splitlines()) if i != 1))
    message = one_line(kl_warmup(short_context_model, seqs, run, "--steps", 1, ok=False))
    assert message.startswith(f"{seqs}: record 3: prompt + completion is more than 64 tokens")
    kl_warmup(short_context_model, seqs, run, "--steps", 1, "--set", "long_prompts=skip")
    assert json.loads((run / "manifest.json").read_text())["skipped_long_prompts"] == 1
