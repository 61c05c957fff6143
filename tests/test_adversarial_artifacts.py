"""Artifacts under attack: a kill at every instant of every commit, edited shards, lying manifests, leftovers.

Each kill test runs a command once to count the file-system steps of its commit (every rename, unlink,
rmdir, mkdir and fsync inside `ArtifactWriter.commit`, `Trainer.save_checkpoint` and `Trainer.finish`),
then, for each step k, runs it again from scratch with a `Killed` raised just before step k happens,
reruns the same command, and checks that the rerun succeeds and leaves exactly what an uninterrupted
run leaves: the same files, the same bytes (manifests apart from their `created` time), no staging,
no `.NAME.old-*`, no lock. `Killed` is a BaseException, which nothing in s2d catches: no undo runs, as
with SIGKILL (the `finally` that releases the flock stands for the kernel releasing it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from s2d_cli import artifacts, trainer
from s2d_cli.artifacts import (
    ArtifactWriter,
    iter_record_tensors,
    pack_token_tensors,
    read_manifest,
    read_records,
)
from s2d_cli.cli import app
from s2d_cli.errors import UsageError

TESTS = Path(__file__).parent
CONFIG = {"dataset": "toy", "n": 2, "seed": 0, "out": "ignored"}
STEPS = ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "fsync")


class Killed(BaseException):
    """Stands for SIGKILL at one instant of a commit."""


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(autouse=True)
def rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture
def killer(monkeypatch):
    """`killer.at = k` kills the command just before the k-th file-system step of a commit (0: never);
    `killer.steps` lists the steps the last run took, e.g. "replace manifest.json.tmp"."""
    class Killer:
        at, armed, paused, rmtree, steps = 0, 0, False, False, []

    k = Killer()
    for name in STEPS:
        real = getattr(os, name)

        def step(*args, _real=real, _name=name, **kwargs):
            # inside shutil.rmtree (calls relative to a dir_fd) only the first removal is an instant of its
            # own: every later one leaves the same state, a directory partly removed
            within_rmtree = kwargs.get("dir_fd") is not None and k.rmtree
            k.rmtree = kwargs.get("dir_fd") is not None
            no_op = _name == "mkdir" and os.path.exists(args[0])     # os.makedirs(exist_ok=True) on a directory
            if k.armed and not k.paused and not within_rmtree and not no_op:
                target = os.readlink(f"/proc/self/fd/{args[0]}") if _name == "fsync" else str(args[0])
                k.steps.append(f"{_name} {Path(target).name}")
                if len(k.steps) == k.at:
                    raise Killed(k.steps[-1])
            return _real(*args, **kwargs)
        monkeypatch.setattr(os, name, step)

    def arm(fn):
        def armed(*args, **kwargs):
            k.armed += 1
            try:
                return fn(*args, **kwargs)
            finally:
                k.armed -= 1
        return armed

    monkeypatch.setattr(ArtifactWriter, "commit", arm(ArtifactWriter.commit))
    monkeypatch.setattr(trainer.Trainer, "save_checkpoint", arm(trainer.Trainer.save_checkpoint))
    monkeypatch.setattr(trainer.Trainer, "finish", arm(trainer.Trainer.finish))
    return k


def s2d(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) -> its sha256; manifests without their clock fields."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        data = p.read_bytes()
        if p.name in ("manifest.json", "config.json") and p.parent.name != "model":
            # where the run was (`out`), when, how fast, and whether --force was given vary; what was made not
            m = json.loads(data.replace(str(root).encode(), b"ROOT"))
            for volatile in ("created", "wall_time_s"):
                m.pop(volatile, None)
            m.get("config", {}).pop("force", None)
            m["final_metrics"] = untimed(m.get("final_metrics", {}))
            data = json.dumps(m, sort_keys=True).encode()
        if p.name == "metrics.jsonl":
            data = json.dumps([untimed(json.loads(x)) for x in data.splitlines()]).encode()
        out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "time" not in k and "per_s" not in k}


def kill_at_every_step(killer, workdir: Path, run) -> list[str]:
    """Run `run(where)` uninterrupted, then killed at each commit step and rerun; every rerun leaves the
    same tree as the uninterrupted run. Returns the steps (so a test can say which instants it covered)."""
    killer.at, killer.steps = 0, []
    run(workdir / "straight")
    steps, reference = list(killer.steps), tree(workdir / "straight")
    assert steps, "the commit took no file-system step: nothing was killed"
    for k in range(1, len(steps) + 1):
        where = workdir / f"killed-{k}"
        killer.at, killer.steps = k, []
        with pytest.raises(Killed):
            run(where)
        killer.at, killer.steps = 0, []
        run(where)                                      # the rerun of the same command finishes
        assert tree(where) == reference, f"killed at step {k} ({steps[k - 1]})"
    return steps


def run_in(where: Path, *args):
    """`s2d ARGS` with its output (`{out}`) in `where`: each kill gets a fresh directory."""
    where.mkdir(parents=True, exist_ok=True)
    return s2d(*[str(a).replace("{out}", str(where / "out")) for a in args])


# ---------------------------------------------------------------------------------------------- kills at commit

@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("src") / "rollouts"
    s2d("rollout", "--model", tiny_model_dir, "--dataset", "toy:split=test,n=3", "--n", 2, "--max-new-tokens", 4,
        "--topk", 3, "--backend", "hf", "--set", "shard_size=2", "--out", out)
    return out


def test_a_kill_at_any_instant_of_a_rollout_commit_resumes_to_the_same_artifact(killer, tmp_path, tiny_model_dir):
    steps = kill_at_every_step(killer, tmp_path, lambda where: run_in(
        where, "rollout", "--model", tiny_model_dir, "--dataset", "toy:split=test,n=3", "--n", 2,
        "--max-new-tokens", 4, "--topk", 3, "--backend", "hf", "--set", "shard_size=2", "--out", "{out}"))
    # the instants covered: card and manifest written and renamed, staging.json dropped, the directory renamed
    assert steps == ["fsync README.md.tmp", "replace README.md.tmp", "fsync manifest.json.tmp",
                     "replace manifest.json.tmp", "unlink staging.json", "replace .out.partial"]


def test_a_kill_at_any_instant_of_a_forced_rollout_resumes_with_the_same_command(killer, tmp_path, tiny_model_dir):
    """--force over a finished output: the old output is renamed aside and removed; a kill between any two
    steps is finished by rerunning the same --force command, and nothing of the old output stays behind."""
    args = ["rollout", "--model", tiny_model_dir, "--dataset", "toy:split=test,n=2", "--n", 1, "--max-new-tokens", 3,
            "--backend", "hf", "--out", "{out}"]

    def run(where):
        if not where.exists():
            killer.paused = True                        # the first, finished output is not under attack
            try:
                run_in(where, *args, "--seed", 1)
            finally:
                killer.paused = False
        run_in(where, *args, "--force")

    steps = kill_at_every_step(killer, tmp_path, run)
    assert "replace out" in steps and "replace .out.partial" in steps
    assert steps[-1].startswith("rmdir .out.old-")     # the old output goes last, after the new one is in place


def test_a_kill_at_any_instant_of_a_verify_commit_resumes(killer, tmp_path, rollouts):
    kill_at_every_step(killer, tmp_path, lambda where: run_in(
        where, "verify", rollouts, "--workers", 1, "--set", "shard_size=4", "--out", "{out}"))


def test_a_kill_at_any_instant_of_an_eval_commit_resumes(killer, tmp_path, rollouts):
    steps = kill_at_every_step(killer, tmp_path, lambda where: run_in(
        where, "eval", "--rollouts", rollouts, "--workers", 1, "--out", "{out}"))
    assert "unlink staging.json" in steps


def test_a_kill_at_any_instant_of_a_grpo_commit_resumes_to_the_same_weights(killer, tmp_path, tiny_model_dir):
    """grpo commits out/rollouts, then its last checkpoint, out/model and the manifest: a kill at any step
    of those (or of the checkpoint after step 1) is finished by the rerun, weights bit for bit."""
    steps = kill_at_every_step(killer, tmp_path, lambda where: run_in(
        where, "grpo", "--model", tiny_model_dir, "--dataset", "toy:split=train,n=4", "--reward",
        "rewards_for_tests:starts_with_vowel", "--steps", 2, "--group-size", 2, "--prompts-per-step", 2,
        "--max-new-tokens", 4, "--set", "save_every=1", "--set", "keep_checkpoints=1", "--out", "{out}"))
    assert "replace .rollouts.partial" in steps and "replace manifest.json.tmp" in steps
    assert any(s.startswith("replace .step-000002.tmp") for s in steps)


# ---------------------------------------------------------------------------------------------- nested --force

def test_force_reaches_grpo_rollouts_staged_by_another_config(tmp_path, tiny_model_dir):

    args = ["grpo", "--model", tiny_model_dir, "--dataset", "toy:split=train,n=4", "--reward",
            "rewards_for_tests:starts_with_vowel", "--steps", 1, "--group-size", 2, "--prompts-per-step", 2,
            "--max-new-tokens", 4, "--out", tmp_path / "run"]
    s2d(*args)
    run = tmp_path / "run"
    reference = tree(run)
    for gone in ("manifest.json", "model", "checkpoints", "rollouts", "metrics.jsonl"):   # killed early on ...
        shutil.rmtree(run / gone) if (run / gone).is_dir() else (run / gone).unlink()
    stale = ArtifactWriter(run / "rollouts", kind="grpo-rollouts", config={"other": 1}, num_shards=1)
    stale.write_shard(0, [{"id": "x"}])                     # ... beside a partial out/rollouts of another config
    artifacts.release_locks()
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and f"{stale.staging}: a partial run with a different config" in result.stderr
    s2d(*args, "--force")                                   # --force reaches it
    assert tree(run) == reference


def test_grpo_adopts_its_rollouts_staged_unmarked_by_an_older_s2d(tmp_path, tiny_model_dir):
    """Before this fix a kill inside the commit could leave out/.rollouts.partial with neither staging.json nor
    a manifest, which every rerun refused, --force included: the rerun now takes it as its own."""
    args = ["grpo", "--model", tiny_model_dir, "--dataset", "toy:split=train,n=4", "--reward",
            "rewards_for_tests:starts_with_vowel", "--steps", 1, "--group-size", 2, "--prompts-per-step", 2,
            "--max-new-tokens", 4, "--out", tmp_path / "run"]
    s2d(*args)
    run = tmp_path / "run"
    reference = tree(run)
    (run / "manifest.json").unlink()
    shutil_copy(run / "rollouts", run / ".rollouts.partial")

    shutil.rmtree(run / "rollouts")
    for f in ("manifest.json", "README.md"):
        (run / ".rollouts.partial" / f).unlink()
    s2d(*args)
    assert tree(run) == reference


# ---------------------------------------------------------------------------------------------- edited shards

def small_artifact(out: Path, shards: int = 2, tensors: bool = False) -> Path:
    w = ArtifactWriter(out, kind="test", config=CONFIG, num_shards=shards)
    for i in range(shards):
        recs = [{"id": f"r{i}{j}", "completion": f"\\boxed{{{j}}}", "answer": str(j)} for j in range(4)]
        t = pack_token_tensors([{"topk_ids": torch.tensor([[j, j + 1]])} for j in range(4)]) if tensors else None
        w.write_shard(i, recs, tensors=t)
    w.commit()
    artifacts.release_locks()
    return out


def test_an_edited_shard_is_refused_when_read_and_when_fingerprinted(tmp_path):
    out = small_artifact(tmp_path / "a")
    shard = out / "data-00001-of-00002.jsonl"
    shard.write_text(shard.read_text().replace('"answer": "2"', '"answer": "7"'))      # same count, new bytes
    for use in (lambda: read_records(out), lambda: artifacts.input_entry(out),
                lambda: ArtifactWriter(tmp_path / "b", kind="test", config=CONFIG, num_shards=1, inputs=[out])):
        with pytest.raises(UsageError) as e:
            use()
        assert str(e.value).startswith(f"{shard}: sha256 ") and "\n" not in str(e.value)
        assert "is not the" in str(e.value) and "manifest.json lists" in str(e.value)


def test_a_manifest_claiming_999_records_for_a_4_record_shard_is_refused(tmp_path):
    out = small_artifact(tmp_path / "a", shards=1)
    m = read_manifest(out)
    m["shards"][0]["records"] = 999
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError) as e:
        read_records(out)
    assert str(e.value) == (f"{out / 'data-00000-of-00001.jsonl'}: holds 4 records, not the 999 records "
                            "manifest.json lists; the shard or the manifest was changed after the artifact was "
                            "written (rerun the command that made it)")
    m["shards"][0]["records"] = 3                         # and a shard running past its claimed count
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError) as e:
        read_records(out)
    assert "holds more than the 3 records" in str(e.value)


def test_an_edited_tensor_shard_and_a_manifest_without_hashes_are_refused(tmp_path):
    out = small_artifact(tmp_path / "a", shards=1, tensors=True)
    assert [t["topk_ids"].tolist() for t in iter_record_tensors(out)] == [[[0, 1]], [[1, 2]], [[2, 3]], [[3, 4]]]
    tfile = out / "data-00000-of-00001.safetensors"
    from safetensors.torch import save_file
    save_file({"offsets": torch.tensor([0, 1, 2, 3, 4]), "topk_ids": torch.tensor([[9, 9]] * 4)}, str(tfile))
    with pytest.raises(UsageError) as e:
        list(iter_record_tensors(out))
    assert str(e.value).startswith(f"{tfile}: sha256 ")
    with pytest.raises(UsageError) as e:
        artifacts.input_entry(out)
    assert str(e.value).startswith(f"{tfile}: sha256 ")
    m = read_manifest(out)
    del m["shards"][0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError) as e:
        read_records(out)
    assert "'sha256' is None, expected 64 hex digits" in str(e.value)


def test_verify_of_an_edited_rollout_is_not_already_complete(tmp_path, rollouts):
    """The stale "already complete" of issue 19: verify once, edit the input's shard, verify again."""

    src = tmp_path / "r"
    shutil.copytree(rollouts, src)
    s2d("verify", src, "--workers", 1, "--out", tmp_path / "v")
    shard = src / "data-00000-of-00002.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text(lines[1] + lines[0] + "".join(lines[2:]))
    result = CliRunner().invoke(app, ["verify", str(src), "--workers", "1", "--out", str(tmp_path / "v")])
    assert result.exit_code == 2 and f"{shard}: sha256 " in result.stderr
    assert "already complete" not in result.stderr


# ---------------------------------------------------------------------------------------------- lying manifests

def test_kl_warmup_never_reads_the_teacher_a_rollout_manifest_names(tmp_path, tiny_model_dir, tiny_llama_dir):
    """A manifest whose `model` names another directory: kl-warmup neither loads it nor records it."""
    src = tmp_path / "r"
    s2d("rollout", "--model", tiny_model_dir, "--dataset", "toy:split=test,n=2", "--n", 2, "--max-new-tokens", 4,
        "--backend", "hf", "--out", src)
    m = read_manifest(src)
    m["config"]["model"] = str(tmp_path / "elsewhere")
    shutil_copy(tiny_llama_dir, tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "config.json").write_text("{not json")    # reading it would fail loudly
    (src / "manifest.json").write_text(json.dumps(m))
    s2d("kl-warmup", "--student", tiny_model_dir, "--rollouts", src, "--targets", "sampled", "--steps", 1,
        "--batch-size", 2, "--out", tmp_path / "kl")
    manifest = read_manifest(tmp_path / "kl")
    assert manifest["teacher"] is None
    assert [e["path"] for e in manifest["inputs"]] == [str(tiny_model_dir), str(src), None, None]


def test_eval_rollouts_takes_sampling_from_its_input_alone(tmp_path, rollouts):
    """`eval --rollouts V` where V is a verify artifact: the sampling is what V itself recorded when it was
    made, not what the manifest at V's input path says now."""

    src = tmp_path / "r"
    shutil.copytree(rollouts, src)
    s2d("verify", src, "--workers", 1, "--out", tmp_path / "v")
    made = read_manifest(tmp_path / "v")["made_with"]
    assert (made["temperature"], made["max_new_tokens"], made["n"]) == (1.0, 4, 2)
    m = read_manifest(src)                                   # the input's manifest is changed afterwards
    m["config"]["temperature"] = 0.123
    (src / "manifest.json").write_text(json.dumps(m))
    metrics = json.loads(s2d("eval", "--rollouts", tmp_path / "v", "--workers", 1).stdout)
    assert metrics["sampling"]["temperature"] == 1.0 and metrics["sampling"]["max_new_tokens"] == 4


# ---------------------------------------------------------------------------------------------- leftovers

def test_the_next_run_of_an_output_removes_what_killed_runs_left(tmp_path):
    out = small_artifact(tmp_path / "a", shards=1)
    old = tmp_path / ".a.old-1234abcd"                       # a commit killed before removing the old output
    shutil_copy(out, old)
    staged = ArtifactWriter(tmp_path / "a", kind="test", config=CONFIG, num_shards=1, force=True)  # killed --force
    staged.write_shard(0, [{"id": "x"}])
    (staged.staging / "data-00000-of-00001.jsonl.tmp").write_text("half")
    artifacts.release_locks()
    assert ArtifactWriter(tmp_path / "a", kind="test", config=CONFIG, num_shards=1).complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]             # its lock released at once, too
    # ... but not while another live command holds the output's lock
    shutil_copy(out, old)
    artifacts.lock_output(tmp_path / "a")
    held = artifacts._locks.copy()
    artifacts._locks.clear()                                 # as if another process held it
    try:
        assert ArtifactWriter(tmp_path / "a", kind="test", config=CONFIG, num_shards=1).complete
        assert old.is_dir()
    finally:
        artifacts._locks.update(held)


def shutil_copy(src: Path, dst: Path) -> None:

    shutil.copytree(src, dst)


def test_a_trainer_rerun_removes_temporary_models_and_checkpoints(tmp_path, tiny_model_dir):
    args = ["grpo", "--model", tiny_model_dir, "--dataset", "toy:split=train,n=4", "--reward",
            "rewards_for_tests:starts_with_vowel", "--steps", 1, "--group-size", 2, "--prompts-per-step", 2,
            "--max-new-tokens", 4, "--out", tmp_path / "run"]
    s2d(*args)
    run = tmp_path / "run"
    reference = tree(run)
    (run / "manifest.json").unlink()                         # killed before the end, leaving all of these:
    for junk in (".model.tmp-1a2b3c4d", ".model.old-1a2b3c4d", "checkpoints/..step-000001.tmp.tmp-1a2b3c4d",
                 "checkpoints/.step-000001.tmp"):
        (run / junk).mkdir(parents=True)
        (run / junk / "model.safetensors").write_bytes(b"x" * 10)
    (run / "metrics.jsonl.tmp").write_text("{")
    s2d(*args)
    assert tree(run) == reference


def test_the_sha256_cache_is_created_when_absent(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    digest = artifacts.model_digest(tiny_model_dir)
    cache = tmp_path / "cache" / "s2d" / "sha256.json"
    known = json.loads(cache.read_text())
    weights = tiny_model_dir / "model.safetensors"
    assert known[next(k for k in known if k.startswith(f"{weights.resolve()}|"))] == \
        hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: pytest.fail(f"hashed {p} again"))
    assert artifacts.model_digest(tiny_model_dir) == digest


# ---------------------------------------------------------------------------------------------- as a dataset

def test_an_artifact_loads_with_datasets_and_keeps_text_answers(tmp_path, rollouts):
    """`datasets.load_dataset(DIR)` reads the records of every shard (not the manifest, not the tensors),
    even where a column is null in the first shard and text in a later one; the card changes no resume."""
    import datasets
    out = tmp_path / "a"
    w = ArtifactWriter(out, kind="test", config=CONFIG, num_shards=2)
    w.write_shard(0, [{"id": "a", "answer": "033", "extracted": None, "ids": [1, 2]}],
                  tensors=pack_token_tensors([{"topk_ids": torch.tensor([[1, 2]])}]))
    w.write_shard(1, [{"id": "b", "answer": "1/2", "extracted": "1", "ids": [3]}],
                  tensors=pack_token_tensors([{"topk_ids": torch.tensor([[3, 4]])}]))
    w.commit()
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.to_list() == [{"id": "a", "answer": "033", "extracted": None, "ids": [1, 2]},
                            {"id": "b", "answer": "1/2", "extracted": "1", "ids": [3]}]
    real = datasets.load_dataset(str(rollouts), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(real) == read_manifest(rollouts)["num_records"] == 6
    assert real["completion"] == [r["completion"] for r in read_records(rollouts)]
    assert ArtifactWriter(out, kind="test", config=CONFIG, num_shards=2).complete     # still "already complete"
    assert artifacts.input_entry(out)["sha256"] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
