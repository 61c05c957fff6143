"""s2d grpo end to end on tiny random-init models, CPU, fixed seeds, values asserted.

  learning        a reward the random model already earns ~15% of the time rises by >= 0.3 in 16 steps
  resume          SIGKILL after a checkpoint + the same command again == one uninterrupted run
  two processes   `accelerate launch` x2 on fixed rollouts == one process (losses, metrics, weights)
  vllm            the vLLM backend trains and its engine holds the trained weights afterwards
  bad input       one line on stderr, exit 2, no traceback, no run directory left behind
  --max-labels    the manifest's labels_used and the distinct ids in out/rollouts
  loss variants   step-1 losses derived by hand from the rewards and lengths; kl_ref = 0 at step 1
  stages          stages/1-teacher-grpo.yaml and stages/3-student-grpo.yaml resolve to GRPOConfig

Runs in-process through typer's CliRunner where it can (python start-up costs ~8 s a process on the
2-core CI box) and as real processes where the point is a process boundary (kill, accelerate).
"""
from __future__ import annotations

import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from s2d_cli.artifacts import read_records
from s2d_cli.cli import app
from s2d_cli.engines import vllm_available
from s2d_cli.trainer import MASTER_PATH

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BIN = Path(sys.executable).parent
VOWEL = "rewards_for_tests:starts_with_vowel"


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(autouse=True)
def rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def grpo(*args, ok: bool = True):
    """`s2d grpo ARGS` in-process; with ok, asserts exit 0 and shows the output when it is not."""
    result = CliRunner().invoke(app, ["grpo", *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


# ------------------------------------------------------------------------------------------------
# 1. learning

def test_reward_rises(tiny_model_dir, tmp_path):
    """Reward = the completion starts with a vowel. Measured on this random-init model (uniform-ish
    over 512 tokens, entropy 6.20 nats ~ ln 512): ~16% of first tokens qualify, so most groups of 8
    hold both outcomes. The first token alone decides the reward, so 2 new tokens suffice.
    Seen (seed 0): steps 1-4 rewards .125 .188 .094 .125, steps 13-16 .719 .812 .938 .812."""
    run = tmp_path / "run"
    grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 16,
         "--group-size", 8, "--prompts-per-step", 4, "--max-new-tokens", 2, "--lr", 1e-2, "--backend", "hf",
         "--out", run)
    rewards = [m["reward_mean"] for m in metrics(run)]
    assert [m["step"] for m in metrics(run)] == list(range(1, 17))
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert 0.05 <= first <= 0.3, rewards          # the signal exists at random init, and is not yet learned
    assert last - first >= 0.3, rewards
    # on-policy, one epoch: ratio 1, and per group sum(A) = 0 with the sequences all 2 tokens long,
    # so the logged GRPO loss is 0 up to rounding while the gradient is not
    assert all(abs(m["loss"]) < 1e-6 and m["ratio_mean"] == 1.0 for m in metrics(run))
    assert all(m["completion_len"] <= 2 for m in metrics(run))


# ------------------------------------------------------------------------------------------------
# 2. resume after SIGKILL

def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    """save_every=2, SIGKILL once step-000002 is on disk, rerun the same command: the result equals
    an uninterrupted run (sampling is seeded per step, so even the rollouts match) and
    metrics.jsonl holds each step exactly once."""
    steps = 8

    def args(out: Path) -> list[str]:
        return ["--model", str(tiny_model_dir), "--dataset", "toy:split=train", "--reward", VOWEL,
                "--steps", str(steps), "-G", "4", "-P", "4", "--max-new-tokens", "3", "--lr", "1e-2",
                "--backend", "hf", "--set", "save_every=2", "--out", str(out)]

    run = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "s2d"), "grpo", *args(run)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "checkpoints" / "step-000002" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert marker.is_file() and not (run / "manifest.json").exists()
    killed_at = len(metrics(run))
    assert 2 <= killed_at < steps

    grpo(*args(run))                              # the same command: resumes from the newest checkpoint
    reference = tmp_path / "uninterrupted"
    grpo(*args(reference))

    resumed, ref = metrics(run), metrics(reference)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    for key in ("reward_mean", "loss", "grad_norm", "entropy"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in ref], rel=1e-5, abs=1e-7), key
    assert_same_weights(weights(run), weights(reference), atol=1e-6)
    assert read_records(run / "rollouts") == read_records(reference / "rollouts")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"] == steps and manifest["final_metrics"]["step"] == steps
    again = grpo(*args(run))                      # finished: nothing redone, and it says so
    assert again.stdout.strip() == str(run)
    assert f"{run}: a finished grpo run with this config, nothing to do" in again.stderr
    assert json.loads((run / "manifest.json").read_text()) == manifest


# ------------------------------------------------------------------------------------------------
# fixed rollouts: 8 prompts x G=4, completion lengths 1..9, binary rewards; prompt p5 is a
# zero-variance group (all 0) so dapo drops it

G = 4


def write_rollouts(path: Path, vocab: int) -> list[dict]:
    rng = random.Random(0)
    records = []
    for p in range(8):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))]
        rewards = [0.0] * G if p == 5 else [float(rng.random() < 0.5) for _ in range(G)]
        if p != 5 and len(set(rewards)) == 1:
            rewards[0] = 1.0 - rewards[0]
        for j in range(G):
            records.append({"id": f"p{p}", "sample": j, "prompt_ids": prompt,
                            "completion_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))],
                            "reward": rewards[j]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def advantages(rewards: list[float], scale: str) -> list[float]:
    """GRPO advantages by hand: (r - mean) / (population std + 1e-6), or r - mean for Dr. GRPO."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + 1e-6) if scale == "std" else r - mean for r in rewards]


def expected_first_loss(records: list[dict], loss: str, prompts: int, max_new_tokens: int) -> float:
    """The step-1 loss when ratio = 1 (on-policy, first epoch), per variant:
        grpo / gspo  -(1/B) sum_b A_b                       (token mean per sequence of a constant A_b)
        dr_grpo      -(1/(B max_new)) sum_b A_b |o_b|
        dapo         -sum_b A_b |o_b| / sum_b |o_b|         over groups with reward variance only"""
    groups = [records[i * G:(i + 1) * G] for i in range(prompts)]
    adv, lens, keep = [], [], []
    for g in groups:
        rewards = [r["reward"] for r in g]
        adv += advantages(rewards, "none" if loss == "dr_grpo" else "std")
        lens += [len(r["completion_ids"]) for r in g]
        keep += [len(set(rewards)) > 1] * G
    n = len(adv)
    if loss in ("grpo", "gspo"):
        return -sum(adv) / n
    if loss == "dr_grpo":
        return -sum(a * t for a, t in zip(adv, lens)) / (n * max_new_tokens)
    return -sum(a * t for a, t, k in zip(adv, lens, keep) if k) / sum(t for t, k in zip(lens, keep) if k)


@pytest.fixture
def fixed_rollouts(tmp_path, tiny_model_dir):
    from s2d_cli.models import load_tokenizer

    path = tmp_path / "rollouts.jsonl"
    return path, write_rollouts(path, len(load_tokenizer(str(tiny_model_dir))))


# ------------------------------------------------------------------------------------------------
# 3. two processes == one process

def one_and_two_processes(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The grpo command `args` run as one process (tmp_path/one) and, meanwhile, as two (tmp_path/two)."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch = two_processes("grpo", *args, "--out", str(two))
    proc = subprocess.Popen(launch, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    grpo(*args, "--out", one)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, shlex.join(launch) + "\n" + output[-3000:]
    return one, two


def two_processes(*args: str) -> list[str]:
    """`accelerate launch` of `s2d_cli.cli *args` as two torch.distributed CPU processes (gloo)."""
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "s2d_cli.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny_model_dir, fixed_rollouts, tmp_path):
    """dapo (global token normaliser, a dropped zero-variance group) + beta 0.1 (so the loss depends
    on the weights from step 2 on), micro-batches of <= 40 tokens (so each process accumulates
    several, a different number on each rank). Rank r takes prompts [2r, 2r+2) of each step's 4.

    `accelerate launch --cpu --num_processes 2` would start ONE process (accelerate sends --cpu to
    its single-process launcher; multi-CPU needs mpirun); --multi_gpu starts two torch.distributed
    processes, and s2d's Accelerator(cpu=True) makes them a gloo MULTI_CPU group on a CPU host."""
    path, records = fixed_rollouts
    one, two = one_and_two_processes(
        ["--model", str(tiny_model_dir), "--rollouts", str(path), "--steps", "3", "-G", str(G), "-P", "4",
         "--loss", "dapo", "--beta", "0.1", "--lr", "1e-3", "--set", "micro_batch_tokens=40"], tmp_path)
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    assert json.loads((one / "manifest.json").read_text())["world_size"] == 1

    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3]
    # step 1 by hand: policy == reference, so kl_ref = 0 and the loss is the dapo surrogate at ratio 1
    expected = expected_first_loss(records[:4 * G], "dapo", 4, 0)
    assert m1[0]["loss"] == pytest.approx(expected, rel=1e-5) and m1[0]["kl_ref"] == 0.0
    for key in ("loss", "kl_ref", "grad_norm", "reward_mean", "entropy", "ratio_mean"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5, abs=1e-8), key
    assert m1[2]["kl_ref"] > 1e-3                  # step 3: the policy has moved away from the reference
    assert_same_weights(weights(one), weights(two), atol=1e-5)


def test_two_processes_train_bf16_weights_through_the_same_fp32_masters(tiny_model_dir, fixed_rollouts, tmp_path):
    """bf16 weights under DDP (what 'auto' does on GPUs): each rank's masters take the all-reduced bf16
    gradients, and the two-process update equals the one-process one up to bf16 gradient rounding
    (measured: update cosine 0.99988; step-1 loss equal)."""
    from safetensors.torch import load_file

    path, _ = fixed_rollouts
    one, two = one_and_two_processes(
        ["--model", str(tiny_model_dir), "--rollouts", str(path), "--steps", "3", "-G", str(G), "-P", "4",
         "--loss", "dapo", "--lr", "1e-5", "--set", "micro_batch_tokens=40", "--set", "dtype=bf16"], tmp_path)
    m1, m2 = metrics(one), metrics(two)
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-5)
    start = load_file(Path(tiny_model_dir) / "model.safetensors")

    def update(run):
        masters = load_file(run / "checkpoints" / "step-000003" / MASTER_PATH)
        return torch.cat([(masters[k] - start[k].to(torch.bfloat16).float()).flatten() for k in sorted(masters)])

    a, b = update(one), update(two)
    assert float(a @ b / (a.norm() * b.norm())) > 0.999 and float(a.norm()) > 0


def test_a_process_with_nothing_to_train_on_stops_every_process(tiny_model_dir, fixed_rollouts, tmp_path):
    """Rank 1's prompts of step 1 have only empty completions: it would skip the backward rank 0 waits
    in (a hang under DDP); both processes stop at once with one clear line instead."""
    path, records = fixed_rollouts
    for r in records:
        if r["id"] in ("p2", "p3"):                # rank 1's share of step 1 (prompts [2, 4) of 4)
            r["completion_ids"] = []
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    launch = two_processes("grpo", "--model", str(tiny_model_dir), "--rollouts", str(path), "--steps", "1",
                           "-G", str(G), "-P", "4", "--out", str(tmp_path / "run"))
    proc = subprocess.run(launch, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "step 1: 1 of 2 processes got no sequence with a completion token" in proc.stderr


# ------------------------------------------------------------------------------------------------
# 4. bad input

def test_a_run_that_fails_after_its_first_steps_keeps_its_directory(tiny_model_dir, tmp_path):
    """A reward that crashes at step 3 fails the command, but steps 1-2's metrics stay (the directory
    is only removed when a command fails before its first step: bad input)."""
    import rewards_for_tests

    rewards_for_tests._calls[0] = 0
    run = tmp_path / "run"
    result = grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward",
                  "rewards_for_tests:fails_on_call_17", "--steps", 4, "-G", 4, "-P", 2, "--max-new-tokens", 3,
                  "--backend", "hf", "--out", run, ok=False)
    assert result.exit_code == 1 and "reward backend went away" in result.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2]          # 8 reward calls a step: the 17th is step 3's
    assert (run / ".rollouts.partial").is_dir()
    # no checkpoint yet: another config takes the directory over whole, its staged rollouts included
    # (the rollouts writer used to refuse them as another config's)
    grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 4, "-G", 4,
         "-P", 2, "--max-new-tokens", 3, "--backend", "hf", "--out", run)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4] and len(read_records(run / "rollouts")) == 32


def test_a_broken_pipe_that_is_not_stdout_is_an_error(tiny_model_dir, tmp_path):
    """Only a closed stdout ends the command quietly with 141 (`... --out - | head`); a reward's own
    broken pipe is a failure, said in one line with exit 1."""
    result = grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward",
                  "rewards_for_tests:broken_pipe", "--steps", 1, "-G", 4, "-P", 2, "--max-new-tokens", 3,
                  "--backend", "hf", "--out", tmp_path / "run", ok=False)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "s2d: error: internal error: BrokenPipeError: [Errno 32] Broken pipe (set S2D_DEBUG=1 for the traceback)"]
    assert not (tmp_path / "run").exists()


def test_out_never_takes_over_a_model_directory(tiny_model_dir, tmp_path):
    """A model directory holds a config.json too: it is not a partial run to take over (its config was
    overwritten), and --out equal to --model is refused before anything is written."""
    import shutil

    copy = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, copy)
    before = (copy / "config.json").read_text()
    common = ["--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 1, "-G", 4, "-P", 2,
              "--max-new-tokens", 3, "--backend", "hf"]
    result = grpo("--model", tiny_model_dir, *common, "--out", copy, ok=False)
    assert result.exit_code == 2 and "exists, is not empty and is not an s2d run" in result.stderr
    result = grpo("--model", copy, *common, "--out", copy, "--force", ok=False)
    assert result.exit_code == 2 and f"--out {copy}: is the model directory" in result.stderr
    assert (copy / "config.json").read_text() == before and not (copy / "checkpoints").exists()


def test_a_run_directory_in_use_is_not_taken_over(tiny_model_dir, tmp_path):
    """While another command holds the run directory (here: a partial run of another config with no
    checkpoint yet, which an idle leftover would make way for), grpo stops with one line naming its pid
    and leaves the directory as it was."""
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "grpo", "fingerprint": "another", "config": {}}))
    hold = "import sys, time; from s2d_cli.artifacts import lock_output; from pathlib import Path\n" \
           "lock_output(Path(sys.argv[1])); print('ready', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, run], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 1,
                      "-G", 4, "-P", 2, "--max-new-tokens", 3, "--backend", "hf", "--out", run, ok=False)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"s2d: error: {run}: another s2d command (pid {holder.pid}) is writing it "
                                     "now; wait for it to finish or choose another --out")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert json.loads((run / "config.json").read_text())["fingerprint"] == "another"


def test_bad_inputs(tiny_model_dir, tmp_path):
    """Each: exit 2, one line `s2d: error: ...` on stderr, no traceback, and no run directory."""
    no_answers = tmp_path / "problems.jsonl"
    no_answers.write_text('{"problem": "What is 1 + 1?"}\n{"problem": "What is 2 + 2?"}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    ok = ["--model", str(tiny_model_dir), "--dataset", "toy:split=train", "--steps", "1", "--max-new-tokens", "2"]
    cases = {
        "no gold answers": (["--model", str(tiny_model_dir), "--dataset", str(no_answers)], "no gold answer"),
        "group size 1": ([*ok, "--group-size", "1"], "--group-size: expected >= 2"),
        "missing model": (["--model", str(tmp_path / "no-such-model"), "--dataset", "toy:split=train"],
                          "model directory not found"),
        "output under a file": ([*ok, "--out", str(a_file / "run")], "cannot write there"),
    }
    vocab = json.loads((Path(tiny_model_dir) / "config.json").read_text())["vocab_size"]   # embedding rows
    for name, field, value, message in [
        ("empty prompt", "prompt_ids", [], "record 1: field 'prompt_ids': expected at least one token id"),
        ("id past the vocabulary", "completion_ids", [5, vocab], f"token id {vocab} is outside the model's"),
        ("negative id", "prompt_ids", [5, -3], "token id -3 is outside"),
        ("text ids", "completion_ids", ["5"], "expected a list of integer token ids"),
        ("text reward", "reward", "1", "field 'reward': expected a finite number, got '1'"),
    ]:
        bad = tmp_path / f"{name.replace(' ', '-')}.jsonl"
        records = write_rollouts(bad, vocab)
        records[0][field] = value
        bad.write_text("".join(json.dumps(r) + "\n" for r in records))
        cases[f"rollouts: {name}"] = (["--model", str(tiny_model_dir), "--rollouts", str(bad), "-G", str(G),
                                       "-P", "2", "--steps", "1"], message)
    for key, value, message in [("dtype", "fp64", "error: dtype: expected auto, bf16, fp16 or fp32, got 'fp64'"),
                                ("chunk_size", "0", "chunk_size: expected >= 1, got 0"),
                                ("adam_beta2", "1.5", "--set: adam_beta2: expected a finite number in [0, 1), got 1.5"),
                                ("lr", "nan", "--set: lr: expected a finite number in (0, 1], got nan"),
                                ("timeout", "nan", "--set: timeout: expected a finite number in (0, 86400], got nan"),
                                ("workers", "-1", "error: workers: expected a process count >= 0")]:
        cases[f"--set {key}"] = ([*ok, "--set", f"{key}={value}"], message)
    if os.geteuid() != 0:  # root writes into read-only directories anyway
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        cases["read-only parent"] = ([*ok, "--out", str(read_only / "run")], "cannot write there")
    for name, (args, message) in cases.items():
        out = tmp_path / "runs" / name.replace(" ", "-").replace(":", "")
        if "--out" not in args:
            args = [*args, "--out", str(out)]
        result = grpo(*args, ok=False)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("s2d: error: ") and message in lines[0], (name, lines)
        assert "Traceback" not in result.output and result.stdout == "", name
        assert not out.exists(), (name, sorted(p.name for p in out.iterdir()))
    assert a_file.is_file() and a_file.read_text() == ""


# ------------------------------------------------------------------------------------------------
# 5. --max-labels

@pytest.mark.parametrize("max_labels, used", [(3, 3), (10, 6)])
def test_max_labels_caps_distinct_prompts(tiny_model_dir, tmp_path, max_labels, used):
    """P=2 prompts x 3 steps = 6 prompt slots: 3 labels are all used (the schedule cycles through
    them), 10 labels leave 4 unseen; labels_used = min(N, P * steps)."""
    run = tmp_path / "run"
    grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 3,
         "-G", 2, "-P", 2, "--max-new-tokens", 2, "--lr", 1e-3, "--max-labels", max_labels, "--out", run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["labels_used"] == used == min(max_labels, 2 * 3) and manifest["max_labels"] == max_labels
    records = read_records(run / "rollouts")
    assert len(records) == 3 * 2 * 2 and len({r["id"] for r in records}) == used
    assert all(r["id"].startswith("toy-train-") for r in records)


# ------------------------------------------------------------------------------------------------
# 6. loss variants and the reference KL

@pytest.mark.parametrize("loss", ["dr_grpo", "dapo", "gspo"])
def test_loss_variant_first_step_by_hand(tiny_model_dir, fixed_rollouts, tmp_path, loss):
    """One step on the fixed rollouts (prompts p0-p3). At ratio 1 the surrogate is -A weighted by
    each variant's normaliser (see expected_first_loss); with these lengths and rewards:
    dr_grpo and dapo are length-weighted so they are not 0, gspo (one ratio per sequence, mean of
    std-normalised advantages over each group) is 0."""
    path, records = fixed_rollouts
    run = tmp_path / loss
    grpo("--model", tiny_model_dir, "--rollouts", path, "--steps", 1, "-G", G, "-P", 4, "--loss", loss,
         "--max-new-tokens", 16, "--lr", 1e-3, "--out", run)
    (m,) = metrics(run)
    expected = expected_first_loss(records[:4 * G], loss, 4, 16)
    assert m["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7), (loss, m["loss"], expected)
    if loss != "gspo":
        assert abs(expected) > 1e-3
    assert m["ratio_mean"] == pytest.approx(1.0) and m["clip_frac"] == 0.0
    assert (run / "model" / "config.json").is_file()
    # the stored rewards were verified against labels: the 4 prompts read count as labels spent
    assert json.loads((run / "manifest.json").read_text())["labels_used"] == 4


def test_beta_logs_kl_ref_zero_at_step_one(tiny_model_dir, tmp_path):
    """--beta 0.1 loads the starting model as the reference: at step 1 policy == reference, so every
    token's k3 = exp(0) - 0 - 1 = 0 exactly; after an update at lr 1e-2 it is > 0."""
    run = tmp_path / "run"
    grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 2,
         "-G", 4, "-P", 4, "--max-new-tokens", 3, "--lr", 1e-2, "--beta", 0.1, "--out", run)
    m1, m2 = metrics(run)
    assert m1["kl_ref"] == 0.0
    assert m2["kl_ref"] > 0.0
    assert m1["loss"] == pytest.approx(0.0, abs=1e-6)   # grpo at ratio 1: -(1/B) sum A = 0, plus 0.1 * 0


def test_dapo_drops_zero_variance_groups_from_the_normaliser(tiny_model_dir, fixed_rollouts, tmp_path):
    """All 8 prompts in one step (-P 8), so p5 -- every reward 0, advantage 0 -- is in the batch. Its
    tokens add 0 to dapo's numerator; kept, they would still add to the denominator sum |o_b| and
    shrink the loss (by about a tenth here). expected_first_loss counts only groups with variance."""
    path, records = fixed_rollouts
    run = tmp_path / "dapo"
    grpo("--model", tiny_model_dir, "--rollouts", path, "--steps", 1, "-G", G, "-P", 8, "--loss", "dapo",
         "--lr", 1e-3, "--out", run)
    (m,) = metrics(run)
    expected = expected_first_loss(records, "dapo", 8, 0)
    kept_too = -sum(a * len(r["completion_ids"]) for a, r in zip(
        [a for p in range(8) for a in advantages([r["reward"] for r in records[p * G:(p + 1) * G]], "std")],
        records)) / sum(len(r["completion_ids"]) for r in records)
    assert abs(expected - kept_too) > 1e-3 * abs(expected)    # the case tells the two apart
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["zero_var_frac"] == pytest.approx(1 / 8)


@pytest.mark.parametrize("loss, low, high", [("grpo", 0.2, 0.2), ("dr_grpo", 0.2, 0.2), ("dapo", 0.2, 0.28),
                                             ("gspo", 3e-4, 4e-4)])
def test_clip_defaults_per_loss_are_the_papers(loss, low, high):
    """DAPO's clip-higher is 0.28 (Yu et al. 2025, sec. 3.1); GSPO's 3e-4 / 4e-4 (Zheng et al. 2025)."""
    from s2d_cli.grpo import GRPOConfig

    cfg = GRPOConfig(model="m", out="o", dataset="d", loss=loss)
    cfg.validate()
    assert (cfg.clip_low, cfg.clip_high) == (low, high)


def test_overlong_penalty_by_hand():
    from s2d_cli.grpo import overlong_penalty

    # budget 16, buffer 4: 0 up to 12 tokens, then (12 - L) / 4 down to -1 at 16 (a cost, never a bonus)
    assert [overlong_penalty(n, 16, 4) for n in (1, 12, 13, 14, 16)] == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(20, 16, 4) == -1.0 and overlong_penalty(16, 16, 0) == 0.0


def test_overlong_penalty_lowers_the_trained_reward(tiny_model_dir, tmp_path):
    """--max-new-tokens 3 with a 2-token buffer: a 2-token completion costs 0.5, a 3-token one 1.
    The reward the step trains on (reward_mean) is the verifier's minus that cost, per record."""
    run = tmp_path / "run"
    grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 1,
         "-G", 4, "-P", 2, "--max-new-tokens", 3, "--set", "overlong_buffer=2", "--lr", 1e-3, "--out", run)
    (m,) = metrics(run)
    records = read_records(run / "rollouts")
    pens = [r.get("overlong_penalty", 0.0) for r in records]
    assert pens == [{1: 0.0, 2: -0.5, 3: -1.0}[len(r["completion_ids"])] for r in records]
    assert min(pens) == -1.0
    assert m["reward_mean"] == pytest.approx(sum(r["reward"] + p for r, p in zip(records, pens)) / len(records))


def test_update_epochs_train_against_the_log_probs_before_the_update(tiny_model_dir, fixed_rollouts, tmp_path,
                                                                     monkeypatch):
    """--set update_epochs=2: the second pass's ratio is pi_new / pi_old, pi_old being the log-probs of
    the same tokens before the first update. Seen through grpo.policy_loss: in the first pass old ==
    current (ratio 1), in the second old == the first pass's current, and current has moved (lr 1e-2),
    so the ratio is not 1 and the clip can act. Without stored old log-probs the ratio would stay 1."""
    import s2d_cli.grpo as grpo_module

    calls = []
    real = grpo_module.policy_loss

    def spy(cfg, logp_BT, old_BT, adv_B, mask_BT, *rest, **kw):
        calls.append((logp_BT.detach().clone(), old_BT.detach().clone(), mask_BT.clone()))
        return real(cfg, logp_BT, old_BT, adv_B, mask_BT, *rest, **kw)

    monkeypatch.setattr(grpo_module, "policy_loss", spy)
    path, _ = fixed_rollouts
    grpo("--model", tiny_model_dir, "--rollouts", path, "--steps", 1, "-G", G, "-P", 4, "--lr", 1e-2,
         "--set", "update_epochs=2", "--set", "micro_batch_tokens=60", "--out", tmp_path / "run")
    n = len(calls) // 2
    assert len(calls) == 2 * n and n >= 2                   # two passes over the same micro-batches
    moved = 0.0
    for (lp0, old0, m0), (lp1, old1, m1) in zip(calls[:n], calls[n:]):
        assert torch.equal(m0, m1)
        m = m0.bool()
        torch.testing.assert_close(old0[m], lp0[m], rtol=0, atol=1e-5)     # pass 1: on-policy
        torch.testing.assert_close(old1[m], lp0[m], rtol=0, atol=1e-5)     # pass 2: the pre-update log-probs
        moved = max(moved, (lp1[m] - old1[m]).abs().max().item())
    assert moved > 0.05


# ------------------------------------------------------------------------------------------------
# 6b. the KL to the reference, through grpo.policy_loss (what the run's loss function calls)

def kl_cfg(loss: str, estimator: str, beta: float = 0.5, max_new_tokens: int = 4):
    from s2d_cli.grpo import GRPOConfig

    cfg = GRPOConfig(model="m", out="o", dataset="d", loss=loss, beta=beta, kl_estimator=estimator,
                     max_new_tokens=max_new_tokens)
    cfg.validate()
    return cfg


LN2 = math.log(2)
# two sequences (2 and 3 tokens, then padding), advantages 0 so only the KL term is left, on-policy:
#   ref - logp = [ln 2, 0 | -ln 2, -ln 2, 0]  ->  k3 = e^x - x - 1 = [1 - ln 2, 0 | ln 2 - 1/2, ln 2 - 1/2, 0]
#   k3 sums: seq 0  1 - ln 2 = 0.306853, seq 1  2 ln 2 - 1 = 0.386294, all  ln 2; 5 tokens
KL_BY_HAND = {   # beta = 0.5, max_new_tokens = 4
    "grpo": 0.5 * ((1 - LN2) / 2 + (2 * LN2 - 1) / 3) / 2,     # 0.0705478: token mean per sequence, mean
    "gspo": 0.5 * ((1 - LN2) / 2 + (2 * LN2 - 1) / 3) / 2,     # as grpo (TRL: sequence level, loss_type grpo)
    "dapo": 0.5 * LN2 / 5,                                     # 0.0693147: over the batch's tokens
    "dr_grpo": 0.5 * LN2 / (2 * 4),                            # 0.0433217: over B x max_new_tokens
}


def kl_batch():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.5, -0.5, -3.0]], dtype=torch.float64)
    ref = logp + torch.tensor([[LN2, 0.0, 5.0], [-LN2, -LN2, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logp.requires_grad_(), ref, mask


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("estimator", ["k3", "k3_is", "k1"])
def test_kl_to_the_reference_takes_the_loss_types_normaliser(loss, estimator):
    from s2d_cli.grpo import policy_loss

    logp, ref, mask = kl_batch()
    adv = torch.zeros(2, dtype=torch.float64)
    value, m = policy_loss(kl_cfg(loss, estimator), logp, logp.detach(), adv, mask, None, 2.0, 5.0, ref)
    if estimator == "k1":
        # the reward -beta k1 = -0.5 (logp - ref) = [0.5 ln 2, 0 | -0.5 ln 2, -0.5 ln 2, 0] at ratio 1:
        # loss = -sum A under the normaliser -- grpo/gspo -(ln2/4 - ln2/3)/2 = ln 2 / 24, dapo ln 2 / 10,
        # dr_grpo ln 2 / 16
        expected = {"grpo": LN2 / 24, "gspo": LN2 / 24, "dapo": LN2 / 10, "dr_grpo": LN2 / 16}[loss]
    else:
        expected = KL_BY_HAND[loss]
    assert value.item() == pytest.approx(expected, abs=1e-12)
    assert m["kl_ref"] == pytest.approx(LN2 / 5, abs=1e-12)          # k3's token mean, whatever trains
    # no reference: no KL, and the surrogate of a zero advantage is 0
    assert policy_loss(kl_cfg(loss, estimator), logp, logp.detach(), adv, mask, None, 2.0, 5.0)[0].item() == 0.0


def test_an_unknown_kl_estimator_is_one_line(tiny_model_dir, tmp_path):
    result = grpo("--model", tiny_model_dir, "--dataset", "toy:split=train", "--beta", 0.1, "--kl-estimator", "k2",
                  "--out", tmp_path / "run", ok=False)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "s2d: error: --kl-estimator: expected one of k3, k3_is, k1, got 'k2'"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_kl_gradients_through_policy_loss_by_exact_enumeration(loss):
    """A categorical policy over 5 tokens, sequences of one token: E_{y ~ pi}[grad policy_loss(y)],
    summed exactly over y, against the gradients of the two KLs (times the normaliser, 1 / max_new for
    dr_grpo). The old `k1` -- a loss term -- had E[grad] = 0 (issue 19: 1e-16 against 0.16)."""
    from s2d_cli.grpo import policy_loss

    g = torch.Generator().manual_seed(4)
    theta = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    ref_V = torch.log_softmax(2 * torch.randn(5, generator=g, dtype=torch.float64), -1)
    logp_V = torch.log_softmax(theta, -1)
    pi_V = logp_V.exp().detach()
    reverse = torch.autograd.grad((logp_V.exp() * (logp_V - ref_V)).sum(), theta, retain_graph=True)[0]
    forward = torch.autograd.grad((ref_V.exp() * (ref_V - logp_V)).sum(), theta, retain_graph=True)[0]
    scale = 1 / 4 if loss == "dr_grpo" else 1.0
    for estimator, follows in [("k3", forward), ("k3_is", reverse), ("k1", reverse)]:
        cfg = kl_cfg(loss, estimator, beta=1.0)
        expected_grad = torch.zeros(5, dtype=torch.float64)
        for y in range(5):
            lp = logp_V[y].view(1, 1)
            value, _ = policy_loss(cfg, lp, lp.detach(), torch.zeros(1, dtype=torch.float64), torch.ones(1, 1),
                                   None, 1.0, 1.0, ref_V[y].view(1, 1))
            expected_grad += pi_V[y] * torch.autograd.grad(value, theta, retain_graph=True)[0]
        torch.testing.assert_close(expected_grad, scale * follows, rtol=0, atol=1e-12)
    assert (reverse - forward).abs().max() > 0.05


# ------------------------------------------------------------------------------------------------
# 7. the recipe's GRPO stages

@pytest.mark.parametrize("stage, model", [("1-teacher-grpo.yaml", "Qwen/Qwen3-8B"),
                                          ("3-student-grpo.yaml", "runs/student-opd/model")])
def test_stage_configs_resolve(stage, model):
    from s2d_cli.config import resolve
    from s2d_cli.grpo import GRPOConfig

    path = REPO / "stages" / stage
    header = path.read_text().splitlines()[0]
    assert header.startswith(f"# s2d grpo --config stages/{stage} "), header
    cfg = resolve(GRPOConfig, config_file=str(path),
                  flags={"model": model, "dataset": "math-train.jsonl", "out": "runs/x", "max_labels": 1000})
    assert (cfg.lr, cfg.group_size, cfg.temperature, cfg.beta) == (1e-6, 8, 1.0, 0.0)
    assert (cfg.loss, cfg.clip_low, cfg.clip_high) == ("dapo", 0.2, 0.28)
    assert cfg.save_every > 0 and cfg.steps * cfg.prompts_per_step >= 1000


# ------------------------------------------------------------------------------------------------
# 8. vLLM backend (last: an in-process vLLM engine leaves process-wide settings behind)

@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
@pytest.mark.parametrize("arch", ["qwen3", "granite", "cohere"])
def test_vllm_backend_trains_and_syncs_weights(tokenizer_dir, scaled_head_dirs, tmp_path, monkeypatch, arch):
    """Two steps at lr 5e-2 with --backend vllm. In-run sync: the trainer's log-probs of the tokens
    vLLM sampled at step 2 match vLLM's own (mismatch_kl ~ 0), which only holds if step 1's update
    reached the engine. After the run the engine (kept open here) decodes greedily exactly what HF
    decodes from out/model, and not what the starting model decodes. Granite and Cohere: vLLM applies
    their logit scale as transformers does, and takes their weights by the same names."""
    from s2d_cli.engines import SamplingConfig
    from s2d_cli.engines.hf import HFEngine
    from s2d_cli.engines.vllm import VLLMEngine
    from s2d_cli.models import build_tiny_model, load_model, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    # vLLM's CPU attention wants head_dim 32 or more: 2 heads of 32
    start = build_tiny_model(tmp_path / "start", arch="qwen3", tokenizer=tok, seed=0, hidden_size=64,
                             num_heads=2, num_kv_heads=1) if arch == "qwen3" else scaled_head_dirs[arch]
    engines: list[VLLMEngine] = []
    close = VLLMEngine.close
    monkeypatch.setattr(VLLMEngine, "close", lambda self: engines.append(self))
    run = tmp_path / "run"
    try:
        grpo("--model", start, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 2, "-G", 4, "-P", 2,
             "--max-new-tokens", 4, "--lr", 5e-2, "--backend", "vllm", "--set", "dtype=fp32", "--out", run)
        (engine,) = engines
        prompts = [tok.encode(f"Compute {a} + {b}.") for a, b in ((12, 30), (7, 5), (41, 9))]
        greedy = SamplingConfig(n=1, max_new_tokens=8, temperature=0.0)
        from_engine = [g[0].token_ids for g in engine.generate(prompts, greedy)]
    finally:
        for e in engines:
            close(e)
    assert json.loads((run / "manifest.json").read_text())["config"]["backend"] == "vllm"
    ms = metrics(run)
    assert [m["step"] for m in ms] == [1, 2]
    assert all(m["mismatch_kl"] < 1e-4 for m in ms), [m["mismatch_kl"] for m in ms]

    def hf_greedy(path):
        engine = HFEngine(load_model(str(path), dtype="fp32", device="cpu"), tokenizer=tok)
        return [g[0].token_ids for g in engine.generate(prompts, greedy)]

    assert from_engine == hf_greedy(run / "model")
    assert from_engine != hf_greedy(start)


# ----------------------------------------------------------------------------------------------
# heads with a constant logit scale (Granite, Cohere)

@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_scaled_heads_give_the_trainer_the_models_own_logprobs(scaled_head_dirs, arch):
    """Granite divides its logits by logits_scaling (4), Cohere multiplies them by logit_scale (2): the
    trainer's chunked token log-probs (`Policy` over `hidden_at`, chunks of 3; grpo's reference model
    and old log-probs take the same path) and their gradient equal log_softmax of transformers' own
    forward, gathered at the targets. Without the scale they are off by more than 0.05."""
    from s2d_cli.losses import chunked_token_logprobs
    from s2d_cli.models import check_plain_head, head_scale, load_model
    from s2d_cli.trainer import Policy, Sequence, hidden_at, pack

    lm = load_model(str(scaled_head_dirs[arch]), dtype="fp32", device="cpu")
    check_plain_head(lm, arch)                                # accepted, no longer refused
    assert head_scale(lm) == {"granite": 0.25, "cohere": 2.0}[arch]
    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(3, lm.config.vocab_size, (p,), generator=g).tolist(),
                     torch.randint(3, lm.config.vocab_size, (c,), generator=g).tolist())
            for p, c in ((5, 7), (9, 3), (2, 6))]

    direct = {}
    for s in seqs:
        ids, p, c = torch.tensor([s.prompt_ids + s.completion_ids]), len(s.prompt_ids), len(s.completion_ids)
        logp_TV = lm(ids).logits[0, p - 1:p - 1 + c].float().log_softmax(-1)
        direct[id(s)] = logp_TV.gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
    torch.cat(list(direct.values())).sum().backward()
    direct_grads = {n: q.grad.clone() for n, q in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)

    (mb,) = pack(seqs, 10_000)
    logp_M = Policy(lm)(mb, lambda h, w: chunked_token_logprobs(h, w, mb.targets, chunk_size=3)[0])
    logp_M.sum().backward()
    for k, s in enumerate(mb.sequences):
        torch.testing.assert_close(logp_M.detach()[mb.seq_idx == k], direct[id(s)].detach(), atol=1e-5, rtol=0)
    for n, q in lm.named_parameters():
        torch.testing.assert_close(q.grad, direct_grads[n], atol=1e-5, rtol=1e-4)

    with torch.no_grad():                                     # the scale matters at these sizes
        unscaled_M, _ = chunked_token_logprobs(hidden_at(lm, mb) / head_scale(lm),
                                               lm.get_output_embeddings().weight, mb.targets)
    assert (unscaled_M - logp_M.detach()).abs().max() > 0.05


# every model type of models.LOGIT_SCALES, with its scale away from 1 (and what its config needs to be tiny)
SCALED_TYPES = {
    "granite": {"logits_scaling": 4.0}, "granite_swa": {"logits_scaling": 4.0},
    "granitemoe": {"logits_scaling": 4.0, "num_local_experts": 2, "num_experts_per_tok": 1},
    "granitemoe_swa": {"logits_scaling": 4.0, "num_local_experts": 2, "num_experts_per_tok": 1},
    "granitemoeshared": {"logits_scaling": 4.0, "num_local_experts": 2, "num_experts_per_tok": 1,
                         "shared_intermediate_size": 32},
    "granitemoehybrid": {"logits_scaling": 4.0, "layer_types": ["attention"], "num_local_experts": 2,
                         "num_experts_per_tok": 1, "mamba_n_heads": 2, "mamba_d_head": 32},
    "minicpm3": {"dim_model_base": 8},                        # logits_scaling = hidden_size / dim_model_base
    "hyperclovax": {"logits_scaling": 3.0},                   # multiplies
    "cohere": {"logit_scale": 2.0}, "cohere2": {"logit_scale": 2.0}, "cohere2_moe": {"logit_scale": 2.0},
    "falcon_h1": {"lm_head_multiplier": 3.0},
}


def test_scaled_types_are_the_table_and_other_scales_are_refused(tiny_model_dir):
    """The test below covers every type s2d folds a scale in for; a scale field on any other type (a
    remote-code model, say) is refused, since which way it applies is not known."""
    from s2d_cli.errors import UsageError
    from s2d_cli.models import LOGIT_SCALES, check_plain_head, load_model

    assert set(SCALED_TYPES) == set(LOGIT_SCALES)
    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    check_plain_head(lm, "m")
    lm.config.output_multiplier = 0.2
    with pytest.raises(UsageError, match="m: qwen3 has output_multiplier=0.2, which s2d's training heads"):
        check_plain_head(lm, "m")


@pytest.mark.parametrize("model_type", sorted(SCALED_TYPES))
def test_every_logit_scale_the_heads_fold_in_is_the_models_own(model_type):
    """For each model type with a constant logit scale, hidden_at + the chunked head give log_softmax of
    transformers' own forward (which multiplies or divides, each type its own way) at the targets."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from s2d_cli.losses import chunked_token_logprobs
    from s2d_cli.models import check_plain_head, head_scale
    from s2d_cli.trainer import Sequence, hidden_at, pack

    cfg = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16, **SCALED_TYPES[model_type])
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    check_plain_head(lm, model_type)
    assert head_scale(lm) != 1.0
    seqs = [Sequence([5, 6, 7], [8, 9, 10, 11]), Sequence([12, 13], [14, 15, 16])]
    with torch.no_grad():
        (mb,) = pack(seqs, 10_000)
        logp_M, _ = chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets)
        for k, s in enumerate(mb.sequences):
            ids, p, c = torch.tensor([s.prompt_ids + s.completion_ids]), len(s.prompt_ids), len(s.completion_ids)
            logp_TV = lm(ids).logits[0, p - 1:p - 1 + c].float().log_softmax(-1)
            expected = logp_TV.gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
            torch.testing.assert_close(logp_M[mb.seq_idx == k], expected, atol=1e-5, rtol=0)


def test_grpo_trains_granite_on_its_own_sampled_logprobs(scaled_head_dirs, tmp_path):
    """grpo on a Granite model (refused before: logits_scaling 4): the log-probs the hf engine sampled
    with (the model's own forward) and the trainer's recomputed ones agree, mismatch_kl ~ 0 at both
    steps (with the scale left out of the trainer's head it is ~1e-2)."""
    run = tmp_path / "run"
    grpo("--model", scaled_head_dirs["granite"], "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 2,
         "-G", 4, "-P", 2, "--max-new-tokens", 6, "--lr", 1e-2, "--backend", "hf", "--out", run)
    ms = metrics(run)
    assert [m["step"] for m in ms] == [1, 2]
    assert all(0 <= m["mismatch_kl"] < 1e-6 for m in ms), [m["mismatch_kl"] for m in ms]


# ----------------------------------------------------------------------------------------------
# padded micro-batches: where pack cuts a length-sorted batch

def test_pack_cuts_where_padding_saved_exceeds_the_overhead():
    from s2d_cli.trainer import Sequence, pack

    def seqs(lengths):
        return [Sequence(prompt_ids=[1], completion_ids=[2] * (n - 1)) for n in lengths]

    def shapes(micro):
        return sorted(tuple(mb.input_ids.shape) for mb in micro)

    batch = seqs([10, 100, 10, 100])
    # one bin: 4 x 100 = 400 padded + 50; two bins: 2 x 100 + 2 x 10 = 220 + 2 x 50 = 320
    assert shapes(pack(batch, 10_000, overhead_tokens=50)) == [(2, 10), (2, 100)]
    # overhead 200: two bins cost 220 + 400 = 620 > 400 + 200 = 600
    assert shapes(pack(batch, 10_000, overhead_tokens=200)) == [(4, 100)]
    # the token budget still binds: at most 2 rows of 100
    assert shapes(pack(seqs([100] * 5), 250, overhead_tokens=10_000)) == [(1, 100), (2, 100), (2, 100)]
    # every sequence lands in exactly one micro-batch, in its original relative order
    micro = pack(seqs([5, 9, 7, 30, 6, 31]), 10_000, overhead_tokens=8)
    assert sorted(len(s) for mb in micro for s in mb.sequences) == [5, 6, 7, 9, 30, 31]
    assert shapes(micro) == [(2, 31), (4, 9)]


def test_micro_batch_overhead_is_the_gpu_launch_time_in_tokens(tiny_model_dir):
    from s2d_cli import batching as B
    from s2d_cli.models import load_model

    lm = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    params, layers = sum(p.numel() for p in lm.parameters()), lm.config.num_hidden_layers
    assert B.micro_batch_overhead_tokens(lm, torch.device("cpu")) == B.MICRO_BATCH_OVERHEAD_TOKENS == 512
    # on a GPU: 0.006 s per layer x 1.8e14 FLOP/s / (6 x params) tokens, never below the CPU constant
    expected = int(0.006 * layers * 1.8e14 / (6 * params))
    assert expected > 512
    assert B.micro_batch_overhead_tokens(lm, torch.device("cuda")) == expected
    # a model so large that the launch time buys fewer tokens than the CPU constant: the constant
    lm.config.num_hidden_layers = 0
    assert B.micro_batch_overhead_tokens(lm, torch.device("cuda")) == 512


# ----------------------------------------------------------------------------------------------
# which prompts a step reads, and their encoding

def test_prompt_schedule_reads_seeded_epoch_permutations():
    from s2d_cli.grpo import prompt_schedule

    def epoch(seed, e):                                       # the permutation, worked out directly
        perm = list(range(5))
        random.Random(seed * 7919 + e).shuffle(perm)
        return perm

    read = [i for step in range(5) for i in prompt_schedule(5, 3, step, seed=4)]     # 15 = 3 epochs of 5
    assert read == epoch(4, 0) + epoch(4, 1) + epoch(4, 2)
    assert all(sorted(read[e * 5:(e + 1) * 5]) == list(range(5)) for e in range(3))
    assert read != [i for step in range(5) for i in prompt_schedule(5, 3, step, seed=5)]


def test_encode_examples_renders_each_problem_once_per_memo(tokenizer_dir, monkeypatch):
    from s2d_cli import rollout
    from s2d_cli.data import Example
    from s2d_cli.models import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    examples = [Example(id=str(i), problem=p, answer=None) for i, p in enumerate(["1+1?", "2+3?", "1+1?"])]
    plain = rollout.encode_examples(tok, examples, rollout.PromptFields())
    calls = []
    render = rollout.render_prompt
    monkeypatch.setattr(rollout, "render_prompt", lambda *a, **k: calls.append(a[1]) or render(*a, **k))
    memo: dict = {}
    first = rollout.encode_examples(tok, examples, rollout.PromptFields(), memo)
    again = rollout.encode_examples(tok, examples[::-1], rollout.PromptFields(), memo)
    assert first == plain and again == (plain[0][::-1], plain[1][::-1])
    assert calls == ["1+1?", "2+3?"]
    again[1][0].append(-1)                    # the caller's lists are its own
    assert rollout.encode_examples(tok, examples, rollout.PromptFields(), memo) == plain
