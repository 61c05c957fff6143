"""The toy demo end to end in its reduced setting (SMALL=1), and the reproduction Makefiles' plans.

The demo is driven through make exactly as `make demo` does: every arm trained, every arm evaluated,
the table and the report written; then a second run redoes nothing, and deleting one artifact redoes
only what depends on it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy"
BIN = Path(sys.executable).parent
ARMS = ["student-base", "student-grpo", "student-sft-more", "teacher-base", "teacher-grpo", "bridge-base", "kl-rl", "opd-rl",
        "bridge-rl", "bridge-rl-grpo", "bridge-rl-replay"]


def make(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.fail("make is not installed; the demo and the reproductions are Makefiles")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "S2D_NO_COLOR": "1", **(env or {})}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=3600)


def demo(out: Path, *extra: str, target: str = "demo", env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    return make("-C", str(TOY), target, "SMALL=1", f"OUT={out}", f"S2D={BIN / 's2d'}", f"PY={sys.executable}",
                *extra, env=env)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    first = demo(out, "-j2")  # two independent s2d commands at a time, one thread each
    assert first.returncode == 0, first.stderr[-3000:]
    return out, first


def test_demo_runs_every_arm_and_writes_table_and_report(small_demo):
    out, first = small_demo
    run = out / "seed-0"
    table = json.loads((run / "table.json").read_text())
    assert [r["arm"] for r in table] == ARMS
    for r in table:
        m = json.loads((run / "eval" / r["arm"] / "metrics.json").read_text())
        assert r["accuracy"] == m["accuracy"] and 0.0 <= m["accuracy"] <= 1.0
        assert m["n"] == 1 and m["num_prompts"] == 12
        assert r["ci"][0] <= r["accuracy"] <= r["ci"][1]
        assert r["wall_s"] > 0 and r["steps"] > 0
    by_arm = {r["arm"]: r for r in table}
    # the label budget is spent by GRPO only: the bridge from the RL teacher carries the teacher's spend
    assert by_arm["student-base"]["labels"] == by_arm["bridge-base"]["labels"] == 0
    assert by_arm["teacher-grpo"]["labels"] == by_arm["bridge-rl"]["labels"] == by_arm["bridge-rl-grpo"]["labels"] == 8
    # Stage 3 and its replay control add the same number of steps to the same bridge
    assert by_arm["bridge-rl-grpo"]["steps"] == by_arm["bridge-rl-replay"]["steps"] > by_arm["bridge-rl"]["steps"]
    # the SFT-continuation control trains the student as many steps as the bridge's KL warmup and OPD
    assert by_arm["student-sft-more"]["labels"] == 0
    assert (by_arm["student-sft-more"]["steps"]
            == by_arm["bridge-rl"]["steps"] - by_arm["teacher-grpo"]["steps"] == by_arm["student-base"]["steps"] + 4)
    # every claim of the paper, paired over the 12 held-out problems of this seed
    claims = (run / "claims.md").read_text()
    assert claims.count("(12 pairs)") == 8 and claims.count("of 1 |") == 8 and claims in first.stderr
    assert all(v in ("holds", "does not hold", "undecided")
               for v in (line.rsplit("**", 2)[-2] for line in claims.splitlines() if "**" in line))
    grpo = json.loads((run / "teacher-grpo" / "manifest.json").read_text())
    assert grpo["kind"] == "grpo" and grpo["labels_used"] == 8
    assert (run / "table.md").read_text().count("\n") == 2 + len(ARMS)
    results = (run / "report" / "results.md").read_text()
    assert all(f"| {arm} |" in results for arm in ARMS)
    assert sorted(p.name for p in (run / "report").glob("*.png"))  # the plots are there
    assert str(run / "table.md") in first.stdout


def test_second_run_is_a_no_op_and_one_deletion_redoes_only_its_dependents(small_demo):
    out, _ = small_demo
    run = out / "seed-0"
    manifests = {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")}
    again = demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "s2d " not in again.stdout.replace(str(BIN / "s2d"), "s2d")  # no s2d command ran
    assert {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")} == manifests
    # delete the Stage 3 run: the dry run plans only it, its eval and the report
    shutil.rmtree(run / "bridge-rl-grpo")
    plan = demo(out, "-n").stdout
    planned = [line for line in plan.splitlines() if str(BIN / "s2d") in line]
    assert len(planned) == 3, plan
    assert "grpo" in planned[0] and f"{run}/bridge-rl-grpo" in planned[0]
    assert " eval " in planned[1] and " report " in planned[2]


def _records(eval_dir: Path) -> list[dict]:
    """An eval artifact's records without the model path (the one field that names the run directory)."""
    return [{k: v for k, v in json.loads(line).items() if k != "model"}
            for shard in sorted(eval_dir.glob("data-*.jsonl")) for line in shard.read_text().splitlines()]


def test_same_seed_gives_the_same_numbers_bit_for_bit(small_demo, tmp_path):
    """One cheap arm (student SFT, then GRPO, then its eval) rebuilt from nothing in another directory, with
    the caller asking for two threads and no -j: the Makefile pins one thread and the CPU kernels, so the
    weights, every sampled token and the metrics are the same bytes as the demo's own run."""
    out, _ = small_demo
    arm = tmp_path / "seed-0" / "eval" / "student-grpo" / "manifest.json"
    again = demo(tmp_path, target=str(arm), env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                                 "TOKENIZERS_PARALLELISM": "true"})
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = out / "seed-0", tmp_path / "seed-0"
    for weights in ("student-base/model/model.safetensors", "student-grpo/model/model.safetensors"):
        assert (first / weights).read_bytes() == (second / weights).read_bytes(), weights
    a, b = _records(first / "eval" / "student-grpo"), _records(second / "eval" / "student-grpo")
    assert len(a) == 12 and a == b
    m1, m2 = (json.loads((d / "eval" / "student-grpo" / "metrics.json").read_text()) for d in (first, second))
    m1.pop("model"), m2.pop("model")
    assert m1 == m2
    # the GRPO run's per-step metrics, all but its clock readings
    grpo1, grpo2 = ([{k: v for k, v in json.loads(r).items() if "time" not in k and "per_s" not in k}
                     for r in (d / "student-grpo" / "metrics.jsonl").read_text().splitlines()] for d in (first, second))
    assert grpo1 == grpo2


@pytest.mark.parametrize("example", ["qwen3", "llama", "smollm2"])
def test_reproduction_makefiles_print_their_plan(example):
    """`make -n` on a CPU machine prints the whole plan: every stage, each one s2d command."""
    res = make("-n", "-C", str(ROOT / "examples" / example), "all", "S2D=s2d")
    assert res.returncode == 0, res.stderr
    cmds = [line.strip() for line in res.stdout.splitlines() if line.strip().startswith(("s2d ", "accelerate "))]
    text = "\n".join(cmds)
    for stage in ("grpo", "kl-warmup", "opd", "eval"):
        assert f" {stage} " in text, (stage, text)
    if example in ("qwen3", "llama"):
        assert "--backend vllm" in text and "stages/" in text
