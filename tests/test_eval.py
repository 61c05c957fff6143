"""s2d eval: end to end on a tiny model (hf, and vllm where installed), re-scoring known records, protocols."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2d_cli import evaluate
from s2d_cli.artifacts import read_manifest, read_records
from s2d_cli.cli import app
from s2d_cli.engines import vllm_available

S2D = str(Path(sys.executable).with_name("s2d"))
VERIFY_FIELDS = {"reward", "correct", "extracted", "verdict"}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------- hf end to end

@pytest.fixture(scope="module")
def hf_eval(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("eval") / "math500"
    args = ["eval", "--model", tiny_model_dir, "--dataset", "math500", "--limit", 4, "--n", 2,
            "--max-new-tokens", 8, "--backend", "hf", "--out", out]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return out, args, result


def test_eval_writes_metrics_and_per_sample_records(hf_eval, tiny_model_dir):
    out, _, result = hf_eval
    assert result.stdout == f"{out}\n"          # data (the path) on stdout, the table on stderr
    assert "accuracy (avg@2)" in result.stderr and "pass@2" in result.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert (m["dataset"], m["model"], m["n"], m["num_prompts"], m["num_samples"]) == (
        "math500", str(tiny_model_dir), 2, 4, 8)
    assert 0 <= m["accuracy"] <= 1
    lo, hi = m["accuracy_ci95"]
    assert 0 <= lo <= m["accuracy"] <= hi <= 1
    assert set(m["pass@k"]) == {"1", "2"}
    assert m["pass@k"]["1"] == pytest.approx(m["accuracy"])
    assert m["pass@k"]["1"] <= m["pass@k"]["2"] <= 1
    assert 0 <= m["maj@n"] <= 1
    # the first 4 MATH-500 problems: Precalculus L2, Intermediate Algebra L5, Algebra L3, Number Theory L3
    assert {k: v["num_prompts"] for k, v in m["by_subject"].items()} == {
        "Algebra": 1, "Intermediate Algebra": 1, "Number Theory": 1, "Precalculus": 1}
    assert all(0 <= v["accuracy"] <= 1 for v in [*m["by_subject"].values(), *m["by_level"].values()])
    assert {k: v["num_prompts"] for k, v in m["by_level"].items()} == {"2": 1, "3": 2, "5": 1}
    assert m["sampling"]["max_new_tokens"] == 8

    records = read_records(out)
    assert len(records) == 2 * 4
    assert len({(r["id"], r["sample"]) for r in records}) == 8
    for r in records:
        assert VERIFY_FIELDS <= set(r) and r["reward"] == float(r["correct"])
        assert 1 <= len(r["completion_ids"]) <= 8
    manifest = read_manifest(out)
    assert manifest["kind"] == "eval" and manifest["num_records"] == 8 and manifest["num_prompts"] == 4
    assert manifest["accuracy"] == m["accuracy"]
    assert manifest["config"]["n"] == 2 and manifest["config"]["backend"] == "hf"


def test_rescoring_an_eval_reports_how_its_rollouts_were_sampled(hf_eval, tmp_path):
    """`eval --rollouts DIR` takes sampling and dataset from the artifact that sampled them (it used to
    report its own defaults, temperature 1.0 and 1,024 tokens); a bare file's sampling is unknown."""
    out, _, _ = hf_eval
    m = json.loads(invoke("eval", "--rollouts", out, "--workers", 1).stdout)
    assert m["dataset"] == "math500"
    assert m["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 8, "seed": 0}
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps(r) + "\n" for r in read_records(out)))
    assert json.loads(invoke("eval", "--rollouts", flat, "--workers", 1).stdout)["sampling"] is None


def test_a_second_eval_is_a_no_op(hf_eval, monkeypatch):
    out, args, first = hf_eval
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_sampling(*a, **k):
        raise AssertionError("a finished eval must not sample again")

    monkeypatch.setattr(evaluate, "open_engine", no_sampling)
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout == f"{out}\n"
    note, *table = again.stderr.strip().splitlines()
    assert note == f"{out}: already complete, nothing to do (--force redoes it)"
    assert table == first.stderr.strip().splitlines()      # the same metrics table
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------- re-scoring

# 3 prompts x 4 samples, correct counts 3, 1, 0:
#   p1 (gold 5):  5, 5, 5, 4        c = 3, majority "5" (right)
#   p2 (gold 12): 12, 7, 7, none    c = 1, majority "7" (wrong)
#   p3 (gold 9):  1, 2, none, none  c = 0, majority "1" (wrong: a 1:1 tie goes to the earliest)
#   9 answers extracted ("ok"), 3 completions without one ("no_answer")
# accuracy = pass@1 = (3/4 + 1/4 + 0) / 3 = 1/3
# pass@2 = 1 - C(n-c,2)/C(4,2):  p1 1 - C(1,2)/6 = 1 - 0/6 = 1;  p2 1 - C(3,2)/6 = 1 - 3/6 = 1/2;  p3 0
#        -> (1 + 1/2 + 0) / 3 = 1/2
# pass@4: p1 1, p2 1 - C(3,4)/C(4,4) = 1 - 0 = 1, p3 0 -> 2/3
# maj@4 = 1/3
# 95% CI: per-prompt 3/4, 1/4, 0 around 1/3: squared deviations 25/144 + 1/144 + 16/144 = 42/144,
#        variance (42/144)/2 = 7/48, se = sqrt(7/48/3) = 0.22048, 1.96 se = 0.43214 -> [0 (clipped), 0.76547]
HANDMADE = {
    "p1": ("5", ["The answer is \\boxed{5}."] * 3 + ["\\boxed{4}"]),
    "p2": ("12", ["\\boxed{12}", "so \\boxed{7}", "\\boxed{7}", "I give up."]),
    "p3": ("9", ["\\boxed{1}", "\\boxed{2}", "no answer", "still none"]),
}


@pytest.fixture
def handmade_rollouts(tmp_path) -> Path:
    path = tmp_path / "rollouts.jsonl"
    with open(path, "w") as f:
        for pid, (gold, completions) in HANDMADE.items():
            for j, completion in enumerate(completions):
                f.write(json.dumps({"id": pid, "sample": j, "completion": completion, "answer": gold,
                                    "model": "handmade"}) + "\n")
    return path


def _check_handmade(m: dict) -> None:
    assert (m["n"], m["num_prompts"], m["num_samples"], m["model"]) == (4, 3, 12, "handmade")
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["pass@k"] == pytest.approx({"1": 1 / 3, "2": 1 / 2, "4": 2 / 3})
    assert m["maj@n"] == pytest.approx(1 / 3)
    se = math.sqrt(7 / 48 / 3)
    assert m["accuracy_ci95"] == pytest.approx([0.0, 1 / 3 + 1.96 * se])
    assert m["accuracy_ci95"][1] == pytest.approx(0.76547, abs=1e-5)
    assert m["verdicts"] == {"ok": 9, "no_answer": 3}


def test_rescore_rollouts_without_a_model(handmade_rollouts, tmp_path):
    # no --out: the metrics as JSON on stdout, nothing written
    result = invoke("eval", "--rollouts", handmade_rollouts, "--workers", 1)
    assert result.exit_code == 0, result.output
    _check_handmade(json.loads(result.stdout))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.jsonl"]

    out = tmp_path / "scored"
    result = invoke("eval", "--rollouts", handmade_rollouts, "--workers", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    _check_handmade(json.loads((out / "metrics.json").read_text()))
    records = read_records(out)
    assert [r["correct"] for r in records] == [True, True, True, False, True, False, False, False,
                                               False, False, False, False]
    assert [r["extracted"] for r in records[4:8]] == ["12", "7", "7", None]


@pytest.mark.parametrize("args, message", [
    (["--set", "timeout=0"], "--set: timeout: expected a finite number in (0, 86400], got 0.0"),
    (["--set", "timeout=-1"], "--set: timeout: expected a finite number in (0, 86400], got -1.0"),
    (["--set", "timeout=nan"], "--set: timeout: expected a finite number in (0, 86400], got nan"),
    (["--set", "timeout=inf"], "--set: timeout: expected a finite number in (0, 86400], got inf"),
    (["--workers", "-2"], "--workers: expected a process count >= 0"),
    (["--set", "shard_size=0"], "shard_size: expected >= 1, got 0"),
])
def test_rescore_refuses_bad_pool_options_in_one_line(handmade_rollouts, tmp_path, args, message):
    result = invoke("eval", "--rollouts", handmade_rollouts, *args, "--out", tmp_path / "scored")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.jsonl"]


def test_rescore_refuses_a_gold_that_is_a_list(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text(json.dumps({"id": "p1", "completion": "\\boxed{5}", "answer": ["5"]}) + "\n")
    result = invoke("eval", "--rollouts", path, "--out", tmp_path / "scored")
    assert result.exit_code == 2, result.output
    assert result.stderr == f's2d: error: {path}:1: field \'answer\': expected text or a number, got ["5"]\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.jsonl"]


# ---------------------------------------------------------------------------------------------- protocols

def test_protocol_resolves_the_paper_settings_and_flags_override_it():
    cfg = evaluate.build_config("aime24", None, None, {"model": "m"})
    assert (cfg.dataset, cfg.n, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.protocol) == (
        "aime24", 16, 16384, 0.6, 0.95, 20, "aime24")
    cfg = evaluate.build_config("aime24", None, ["temperature=1.0"], {"model": "m", "n": 4})
    assert (cfg.n, cfg.temperature, cfg.max_new_tokens) == (4, 1.0, 16384)
    assert evaluate.build_config("math500", None, None, {"model": "m"}).n == 4
    gsm = evaluate.build_config("gsm8k", None, None, {"model": "m"})
    assert (gsm.n, gsm.temperature, gsm.max_new_tokens) == (1, 0.0, 1024)


def test_protocol_from_the_command_line(monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate, "run", seen.append)   # resolve only: no generation
    result = invoke("eval", "--model", "runs/m", "--protocol", "aime25", "--n", 2)
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert (cfg.dataset, cfg.n, cfg.max_new_tokens, cfg.top_k, cfg.protocol) == ("aime25", 2, 16384, 20, "aime25")
    bad = invoke("eval", "--model", "runs/m", "--protocol", "aime26")
    assert bad.exit_code == 2 and "--protocol" in bad.stderr and len(bad.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- vllm

@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_eval_with_the_vllm_backend(tmp_path, tokenizer_dir):
    from s2d_cli.models import build_tiny_model, load_tokenizer

    # vLLM's CPU attention needs head_dim 32 or more: 2 heads of 32 (the shared tiny model has 4 of 16)
    model = build_tiny_model(tmp_path / "m", arch="qwen3", tokenizer=load_tokenizer(str(tokenizer_dir)), seed=0,
                             num_heads=2, num_kv_heads=1)
    out = tmp_path / "eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([S2D, "eval", "--model", str(model), "--dataset", "math500", "--limit", "2", "--n", "2",
                           "--max-new-tokens", "8", "--backend", "vllm", "--workers", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"{out}\n"
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["num_prompts"], set(m["pass@k"])) == (2, 2, {"1", "2"})
    records = read_records(out)
    assert len(records) == 4 and all(VERIFY_FIELDS <= set(r) for r in records)
    assert all(1 <= len(r["completion_ids"]) <= 8 for r in records)
    assert read_manifest(out)["config"]["backend"] == "vllm"
