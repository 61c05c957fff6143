"""Artifacts: atomic shards, staged directories, resume after SIGKILL, --force, pipes, manifests, top-K tensors.

The contract under test: a shard is written as `*.tmp` and renamed; a directory is complete exactly when it
holds a manifest; the staging directory `.NAME.partial` never reads as an artifact; a rerun of a killed
command keeps its finished shards (same inode, same mtime) and writes what an uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2d_cli import artifacts
from s2d_cli.artifacts import ArtifactWriter, iter_record_tensors, read_manifest, read_records, shard_name
from s2d_cli.cli import app
from s2d_cli.errors import UsageError

S2D = str(Path(sys.executable).with_name("s2d"))
# One thread per process: subprocess runs are then reproducible bit for bit and do not fight over 2 cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CONFIG = {"dataset": "toy", "n": 2, "seed": 0, "out": "ignored"}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def records_of(n: int, tag: str = "r") -> list[dict]:
    return [{"id": f"{tag}{i}", "completion": f"\\boxed{{{i}}}", "answer": str(i)} for i in range(n)]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- atomic writes

def test_shard_is_written_as_tmp_then_renamed(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        if dst.parent.name == ".out.partial":
            # at the moment of the rename the whole shard is in the .tmp file and the name is still free
            renames.append((src.name, dst.name, dst.exists(), src.read_bytes().count(b"\n")))
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", spy)
    w = ArtifactWriter(tmp_path / "out", kind="test", config=CONFIG, num_shards=2)
    w.write_shard(0, records_of(3))
    assert renames == [("staging.json.tmp", "staging.json", False, 0),
                       ("data-00000-of-00002.jsonl.tmp", "data-00000-of-00002.jsonl", False, 3)]
    assert not list((tmp_path / ".out.partial").glob("*.tmp"))


def test_a_write_killed_before_its_rename_leaves_no_shard(tmp_path, monkeypatch):
    out, staging = tmp_path / "out", tmp_path / ".out.partial"
    w = ArtifactWriter(out, kind="test", config=CONFIG, num_shards=3)
    w.write_shard(0, records_of(2, "a"))

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the .tmp and renaming it

    with monkeypatch.context() as m:
        m.setattr(artifacts.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            w.write_shard(1, records_of(2, "b"))
    assert (staging / "data-00001-of-00003.jsonl.tmp").is_file()
    assert not (staging / "data-00001-of-00003.jsonl").exists()

    # readers never take the staging directory (or the missing output) for an artifact
    with pytest.raises(UsageError) as e:
        read_records(out)
    assert "partial run is staged" in one_line(e)
    with pytest.raises(UsageError) as e:
        read_records(staging)
    assert "not a complete s2d artifact" in one_line(e) and "unfinished run" in str(e.value)
    with pytest.raises(UsageError):
        list(iter_record_tensors(staging))

    # the rerun sees shard 0 done, redoes 1 and 2, and the committed artifact holds no leftover .tmp
    again = ArtifactWriter(out, kind="test", config=CONFIG, num_shards=3)
    assert again.pending() == [1, 2] and again.num_done() == 1
    again.write_shard(1, records_of(2, "b"))
    again.write_shard(2, records_of(1, "c"))
    assert again.commit() == out
    assert not staging.exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", *(shard_name(i, 3) for i in range(3)), "manifest.json"]
    assert [r["id"] for r in read_records(out)] == ["a0", "a1", "b0", "b1", "c0"]


def test_all_shards_but_no_manifest_is_still_incomplete(tmp_path):
    w = ArtifactWriter(tmp_path / "out", kind="test", config=CONFIG, num_shards=1)
    w.write_shard(0, records_of(2))
    with pytest.raises(UsageError):
        read_records(tmp_path / ".out.partial")
    assert read_manifest(tmp_path / ".out.partial") is None
    w.commit()
    assert read_manifest(tmp_path / "out")["num_records"] == 2
    assert len(read_records(tmp_path / "out")) == 2


def test_force_discards_another_config_and_a_complete_output_but_resumes_its_own_partial(tmp_path):
    """A killed `--force` run is resumed by rerunning the same command, --force included; --force with
    another config discards the partial run."""
    partial = tmp_path / "partial"
    w = ArtifactWriter(partial, kind="test", config=CONFIG, num_shards=2)
    w.write_shard(0, records_of(1, "old"))
    assert ArtifactWriter(partial, kind="test", config=CONFIG, num_shards=2).pending() == [1]
    assert ArtifactWriter(partial, kind="test", config=CONFIG, num_shards=2, force=True).pending() == [1]
    other = {**CONFIG, "seed": 1}
    assert ArtifactWriter(partial, kind="test", config=other, num_shards=2, force=True).pending() == [0, 1]
    out = tmp_path / "out"
    w = ArtifactWriter(out, kind="test", config=CONFIG, num_shards=1)
    w.write_shard(0, records_of(1, "old"))
    w.commit()
    assert ArtifactWriter(out, kind="test", config=CONFIG, num_shards=1).complete  # same config: nothing to do
    w = ArtifactWriter(out, kind="test", config=CONFIG, num_shards=1, force=True)
    assert not w.complete and w.pending() == [0]
    assert [r["id"] for r in read_records(out)] == ["old0"]   # the old artifact stays readable until commit
    w.write_shard(0, records_of(1, "new"))
    w.commit()
    assert [r["id"] for r in read_records(out)] == ["new0"]


def test_a_different_config_is_refused_not_mixed(tmp_path):
    out = tmp_path / "out"
    w = ArtifactWriter(out, kind="test", config=CONFIG, num_shards=2)
    w.write_shard(0, records_of(1))
    with pytest.raises(UsageError) as e:
        ArtifactWriter(out, kind="test", config={**CONFIG, "seed": 1}, num_shards=2)
    assert "partial run with a different config" in one_line(e) and "--force" in str(e.value)
    w.write_shard(1, records_of(1))
    w.commit()
    with pytest.raises(UsageError) as e:
        ArtifactWriter(out, kind="test", config={**CONFIG, "seed": 1}, num_shards=2)
    assert "seed: 0 -> 1" in one_line(e)
    # where the output goes is not part of the fingerprint
    assert ArtifactWriter(out, kind="test", config={**CONFIG, "out": "elsewhere"}, num_shards=2).complete


def test_a_partial_run_that_finished_no_shard_gives_way(tmp_path):
    """A staging directory with no finished shard (a run that failed or was killed before its first)
    holds nothing to lose: another config replaces it instead of being refused."""
    ArtifactWriter(tmp_path / "out", kind="test", config=CONFIG, num_shards=2)
    assert (tmp_path / ".out.partial").is_dir()
    w = ArtifactWriter(tmp_path / "out", kind="test", config={**CONFIG, "seed": 1}, num_shards=3)
    assert w.pending() == [0, 1, 2]
    staged = json.loads((tmp_path / ".out.partial" / "staging.json").read_text())
    assert staged["fingerprint"] == w.fingerprint and staged["config"]["seed"] == 1


HOLD = """
import sys, time
from s2d_cli.artifacts import ArtifactWriter
ArtifactWriter(sys.argv[1], kind="test", config={"dataset": "toy", "n": 2, "seed": 0, "out": "x"}, num_shards=2)
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_command_on_the_same_out_stops_instead_of_taking_over(tmp_path):
    """While one command writes `out` (here: staged, no shard finished yet, e.g. still loading its model),
    another command on the same --out, even of another config, stops with one line naming the first
    one's pid and leaves its staging alone; once the first is gone, the same command runs."""
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert first.stdout.readline().strip() == "ready"
        staged = (tmp_path / ".out.partial" / "staging.json").read_text()
        with pytest.raises(UsageError) as e:
            ArtifactWriter(out, kind="test", config={**CONFIG, "seed": 1}, num_shards=3)
        assert f"another s2d command (pid {first.pid}) is writing it now" in one_line(e)
        assert (tmp_path / ".out.partial" / "staging.json").read_text() == staged
        source = tmp_path / "in.jsonl"
        source.write_text(json.dumps(records_of(1)[0]) + "\n")
        result = invoke("verify", source, "--out", out)
        assert result.exit_code == 2 and f"(pid {first.pid}) is writing it now" in result.output
        assert (tmp_path / ".out.partial" / "staging.json").read_text() == staged
    finally:
        first.kill()
        first.wait()
    result = invoke("verify", source, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(read_records(out)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]  # no lock file left behind


def test_the_output_lock_is_one_per_path_and_released(tmp_path):
    artifacts.lock_output(tmp_path / "a")
    artifacts.lock_output(tmp_path / "a")          # the same command asking again: already held
    artifacts.lock_output(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock", ".b.lock"]
    assert (tmp_path / ".a.lock").read_text() == f"{os.getpid()}\n"
    probe = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n" \
            "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\nexcept OSError: print('held')"
    held = subprocess.run([sys.executable, "-c", probe, tmp_path / ".a.lock"], capture_output=True, text=True)
    assert held.stdout.strip() == "held"
    artifacts.release_locks()
    assert list(tmp_path.iterdir()) == []


def test_a_finished_output_is_read_without_the_lock(tmp_path, monkeypatch):
    """Rerunning a finished command answers from its output without writing beside it: a results
    directory made read-only since (where no lock file can be made) still answers."""
    w = ArtifactWriter(tmp_path / "out", kind="eval", config={"a": 1}, num_shards=1)
    w.write_shard(0, [{"id": "x"}])
    w.commit()
    artifacts.release_locks()

    def cannot(out):
        raise UsageError(f"{out}: cannot write there (Permission denied)")
    monkeypatch.setattr(artifacts, "lock_output", cannot)
    again = ArtifactWriter(tmp_path / "out", kind="eval", config={"a": 1}, num_shards=1)
    assert again.complete and again.pending() == []
    with pytest.raises(UsageError, match="cannot write there"):      # anything to write still locks
        ArtifactWriter(tmp_path / "out", kind="eval", config={"a": 2}, num_shards=1, force=True)


def test_releasing_a_lock_never_fails_the_command(tmp_path, monkeypatch):
    """A lock file that cannot be removed (its directory made read-only meanwhile) is left, unlocked;
    release_locks runs in `execute`'s finally and must not turn a finished command into a traceback."""
    artifacts.lock_output(tmp_path / "a")
    artifacts.lock_output(tmp_path / "b")
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == ".a.lock":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)
    monkeypatch.setattr(Path, "unlink", unlink)
    artifacts.release_locks()
    assert artifacts._locks == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock"]
    probe = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n" \
            "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\nexcept OSError: print('held')"
    held = subprocess.run([sys.executable, "-c", probe, tmp_path / ".a.lock"], capture_output=True, text=True)
    assert held.stdout.strip() == "free"


def test_the_output_lock_is_one_per_directory_however_spelled(tmp_path):
    """--out through a symlink and --out the directory itself are one output: one lock."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    artifacts.lock_output(tmp_path / "real")
    hold = "import sys; from pathlib import Path; from s2d_cli.artifacts import lock_output\n" \
           "from s2d_cli.errors import UsageError\n" \
           "try: lock_output(Path(sys.argv[1])); print('got it')\nexcept UsageError as e: print(e)"
    other = subprocess.run([sys.executable, "-c", hold, tmp_path / "link"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(Path(artifacts.__file__).parents[1])})
    assert "another s2d command" in other.stdout, other.stdout + other.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".real.lock", "link", "real"]


def test_an_edited_input_is_not_answered_with_stale_shards(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(records_of(1)[0]) + "\n")
    w = ArtifactWriter(tmp_path / "out", kind="test", config=CONFIG, num_shards=1, inputs=[source])
    w.write_shard(0, records_of(1))
    w.commit()
    assert ArtifactWriter(tmp_path / "out", kind="test", config=CONFIG, num_shards=1, inputs=[source]).complete
    source.write_text(json.dumps(records_of(2)[1]) + "\n")
    with pytest.raises(UsageError) as e:
        ArtifactWriter(tmp_path / "out", kind="test", config=CONFIG, num_shards=1, inputs=[source])
    assert f"input {source} changed" in one_line(e)


def test_a_run_killed_between_manifest_and_rename_is_finished_by_the_rerun(tmp_path, monkeypatch):
    w = ArtifactWriter(tmp_path / "out", kind="test", config=CONFIG, num_shards=1)
    w.write_shard(0, records_of(2))

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "replace_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    monkeypatch.undo()
    assert (tmp_path / ".out.partial" / "manifest.json").is_file() and not (tmp_path / "out").exists()
    again = ArtifactWriter(tmp_path / "out", kind="test", config=CONFIG, num_shards=1)
    assert again.pending() == []
    again.commit()
    assert len(read_records(tmp_path / "out")) == 2 and not (tmp_path / ".out.partial").exists()


# ---------------------------------------------------------------------------------------------- a real rollout

@pytest.fixture(scope="module")
def topk_rollout(tmp_path_factory, tiny_model_dir):
    """5 prompts x 2 samples in 3 shards, with sampled logprobs and top-4 tensors; n and the budget from YAML."""
    root = tmp_path_factory.mktemp("topk")
    (root / "rollout.yaml").write_text("n: 2\nmax_new_tokens: 6\nbackend: hf\n")
    args = ["rollout", "--model", tiny_model_dir, "--dataset", "math500", "--limit", "5", "--config",
            root / "rollout.yaml", "--set", "shard_size=2", "--topk", "4", "--logprobs", "--seed", "1",
            "--out", root / "out"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(root / "out")
    return root / "out", args


def test_manifest_fields(topk_rollout, tiny_model_dir):
    out, _ = topk_rollout
    m = read_manifest(out)
    assert m["schema_version"] == artifacts.SCHEMA_VERSION == 1
    assert m["kind"] == "rollout"
    assert m["s2d_version"] == __import__("s2d_cli").__version__
    assert "command" in m   # the shell command line; set when run as `s2d ...` (checked in the resume test)
    cfg = m["config"]
    assert (cfg["n"], cfg["max_new_tokens"], cfg["shard_size"], cfg["topk"], cfg["seed"]) == (2, 6, 2, 4, 1)
    assert (cfg["model"], cfg["dataset"], cfg["limit"], cfg["logprobs"]) == (str(tiny_model_dir), "math500", 5, True)
    bundled = Path(artifacts.__file__).parent / "bundled" / "math500.jsonl"
    assert m["inputs"] == [{"path": "math500", "sha256": hashlib.sha256(bundled.read_bytes()).hexdigest()},
                           {"path": str(tiny_model_dir), "sha256": artifacts.model_digest(tiny_model_dir)}]
    assert m["num_prompts"] == 5 and m["num_records"] == 10
    assert [s["file"] for s in m["shards"]] == [shard_name(i, 3) for i in range(3)]
    assert [s["records"] for s in m["shards"]] == [4, 4, 2]
    for s in m["shards"]:
        data = (out / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and data.count(b"\n") == s["records"]
        tensors = out / s["tensors"]["file"]
        assert tensors.name == s["file"].replace(".jsonl", ".safetensors")
        assert hashlib.sha256(tensors.read_bytes()).hexdigest() == s["tensors"]["sha256"]
    assert not list(out.parent.glob(".out.partial"))


def test_records_and_topk_tensors_align(topk_rollout):
    out, _ = topk_rollout
    records = read_records(out)
    assert [(r["id"], r["sample"]) for r in records][:4] == [
        ("test/precalculus/807.json", 0), ("test/precalculus/807.json", 1),
        ("test/intermediate_algebra/1994.json", 0), ("test/intermediate_algebra/1994.json", 1)]
    tensors = list(iter_record_tensors(out))
    assert len(tensors) == len(records) == 10
    for rec, t in zip(records, tensors):
        ids_TK, logprobs_TK = t["topk_ids"], t["topk_logprobs"]
        T = len(rec["completion_ids"])
        assert 1 <= T <= 6 and len(rec["logprobs"]) == T
        assert ids_TK.shape == logprobs_TK.shape == (T, 4)
        assert (logprobs_TK <= 0).all()
        assert (logprobs_TK[:, :-1] >= logprobs_TK[:, 1:]).all(), "top-K logprobs must be sorted descending"
        # the sampled token's logprob is the top-K entry for that token when it is among them, else below
        for t_, (tok, lp) in enumerate(zip(rec["completion_ids"], rec["logprobs"])):
            row = ids_TK[t_].tolist()
            if tok in row:
                assert logprobs_TK[t_, row.index(tok)].item() == pytest.approx(lp, abs=1e-4)
            else:
                assert lp <= logprobs_TK[t_, -1].item() + 1e-4


def test_shards_load_with_datasets(topk_rollout, tmp_path):
    import datasets

    out, _ = topk_rollout
    files = [str(out / s["file"]) for s in read_manifest(out)["shards"]]
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 10
    assert {"id", "sample", "prompt", "completion", "answer", "completion_ids", "logprobs"} <= set(ds.column_names)
    assert ds[0]["completion_ids"] == read_records(out)[0]["completion_ids"]


def test_rerun_of_a_complete_rollout_is_a_no_op(topk_rollout, monkeypatch):
    out, args = topk_rollout
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_sampling(*a, **k):
        raise AssertionError("a complete artifact must not be sampled again")

    monkeypatch.setattr("s2d_cli.rollout.open_engine", no_sampling)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert f"{out}: already complete, nothing to do" in result.stderr    # says so, not a silent 8 s
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_different_config_on_an_existing_output_is_exit_2(topk_rollout):
    out, args = topk_rollout
    changed = [*args[:-2], "--seed", "2", *args[-2:]]   # a later flag wins
    result = invoke(*changed)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"s2d: error: {out}: already holds a rollout artifact") and "seed: 1 -> 2" in line
    assert "--force" in line and "Traceback" not in result.output
    assert not (out.parent / ".out.partial").exists()


# ---------------------------------------------------------------------------------------------- processes

def _s2d(*args) -> list[str]:
    return [S2D, *[str(a) for a in args]]


def test_resume_after_sigkill_keeps_finished_shards_and_loses_nothing(tmp_path, tiny_model_dir):
    out, staging = tmp_path / "out", tmp_path / ".out.partial"
    # 8 prompts / 2 per shard = 4 shards; 64 new tokens make a shard take long enough to kill mid-run
    cmd = _s2d("rollout", "--model", tiny_model_dir, "--dataset", "math500", "--limit", 8, "--n", 2,
               "--max-new-tokens", 64, "--backend", "hf", "--seed", 7, "--set", "shard_size=2", "--out", out)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = staging / shard_name(0, 4)
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert first.exists(), f"the first shard never appeared: {stderr.decode()[-2000:]}"
    assert not out.exists() and not (staging / "manifest.json").exists()
    finished = sorted(staging.glob("data-*.jsonl"))
    assert 1 <= len(finished) < 4, "the run was not killed mid-way"
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    with pytest.raises(UsageError):
        read_records(staging)

    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == f"{out}\n"
    assert f"resuming: {len(finished)}/4 shards already written" in resumed.stderr
    assert not staging.exists()
    for name, stat in stats.items():   # kept, not rewritten: the rename carries inode and mtime along
        assert (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) == stat, name
    records = read_records(out)
    prompt_ids = [json.loads(line)["unique_id"] for line in
                  (Path(artifacts.__file__).parent / "bundled" / "math500.jsonl").open()][:8]
    assert sorted((r["id"], r["sample"]) for r in records) == sorted((i, s) for i in prompt_ids for s in (0, 1))
    assert len(records) == 16
    manifest = read_manifest(out)
    assert manifest["command"].startswith("s2d rollout --model ") and manifest["command"].endswith(f"--out {out}")
    assert not list(out.glob("*.tmp"))

    # --force starts over: every shard is new, and (shard i sampled with seed + i) equal to the resumed run
    fresh = subprocess.run([*cmd, "--force"], env=ENV, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert "resuming" not in fresh.stderr
    for name, (inode, mtime) in stats.items():
        assert (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) != (inode, mtime), name
    assert read_records(out) == records


def test_rollout_to_stdout_piped_into_verify(tmp_path, tiny_model_dir):
    pipeline = (f"set -o pipefail; '{S2D}' rollout --model '{tiny_model_dir}' --dataset math500 --limit 2 --n 2 "
                f"--max-new-tokens 8 --backend hf --out - | '{S2D}' verify - --out - --workers 1")
    proc = subprocess.run(["bash", "-c", pipeline], env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    for line in lines:
        rec = json.loads(line)
        assert {"id", "sample", "completion", "answer", "completion_ids"} <= set(rec)
        assert rec["reward"] in (0.0, 1.0) and isinstance(rec["correct"], bool)
        assert rec["verdict"] in ("ok", "no_answer", "timeout", "error") and "extracted" in rec
    assert list(tmp_path.iterdir()) == []   # '-' writes no directory


# ---------------------------------------------------------------------------------------------- inputs that changed

def test_a_rollout_is_not_answered_from_a_changed_model(tmp_path, tokenizer_dir):
    """The model is an input: its weights, config and tokenizer files are hashed (once, then cached by
    size and mtime), so rerunning a rollout after the model was remade is refused, not answered with the
    old records; a remade but identical model still finds its output complete."""
    model, prompts = tmp_path / "m", tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                               for i in range(3)))
    make = ["make-tiny", model, "--hidden-size", 32, "--layers", 1, "--tokenizer", tokenizer_dir]
    rollout = ["rollout", "-m", model, "-d", prompts, "--max-new-tokens", 4, "--backend", "hf", "--out",
               tmp_path / "r"]
    assert invoke(*make, "--seed", 0).exit_code == 0
    assert invoke(*rollout).exit_code == 0
    first = read_records(tmp_path / "r")
    assert read_manifest(tmp_path / "r")["inputs"][1]["sha256"] == artifacts.model_digest(model)
    assert invoke(*make, "--seed", 0).exit_code == 0      # the same weights, written again
    assert invoke(*rollout).exit_code == 0 and read_records(tmp_path / "r") == first
    assert invoke(*make, "--seed", 5).exit_code == 0      # other weights
    result = invoke(*rollout)
    assert result.exit_code == 2 and f"(input {model} changed since)" in result.stderr
    assert read_records(tmp_path / "r") == first


def test_stdin_is_an_input_too(tmp_path):
    """`verify - --out DIR`: what came in on stdin is hashed, so other records on a rerun are refused
    rather than answered with the first run's output."""
    a, b = records_of(2, "a"), records_of(3, "b")
    out = tmp_path / "v"
    run = lambda recs: CliRunner().invoke(app, ["verify", "-", "--out", str(out)],   # noqa: E731
                                          input="".join(json.dumps(r) + "\n" for r in recs))
    assert run(a).exit_code == 0
    assert run(a).exit_code == 0 and [r["id"] for r in read_records(out)] == ["a0", "a1"]
    result = run(b)
    assert result.exit_code == 2 and "(input - changed since)" in result.stderr


def test_a_failed_run_leaves_no_staging_directory(tmp_path):
    """A model that cannot load fails the rollout after its output was staged: the staging directory
    goes with it, and the corrected command then runs (it used to be refused as another config)."""
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    result = invoke("rollout", "-m", bad, "-d", prompts, "--backend", "hf", "--out", tmp_path / "r")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".r.partial").exists() and not (tmp_path / "r").exists()


def test_malformed_input_artifacts_are_one_line_errors(tmp_path):
    """A corrupt manifest, a missing shard and a training run (no shards) given as records: exit 2, one
    line naming the file."""
    w = ArtifactWriter(tmp_path / "a", kind="test", config=CONFIG, num_shards=2)
    w.write_shard(0, records_of(1))
    w.write_shard(1, records_of(1))
    w.commit()
    (tmp_path / "a" / shard_name(1, 2)).unlink()
    corrupt = tmp_path / "c"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text('{"kind": "verified", "shar')
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"kind": "grpo", "config": {}}))
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"not parquet at all")
    for source, message in [(tmp_path / "a", f"{tmp_path / 'a' / shard_name(1, 2)}: shard listed in manifest.json is missing"),
                            (corrupt, f"{corrupt / 'manifest.json'}: not a valid manifest (JSONDecodeError"),
                            (run, f"{run}: a grpo output, not an artifact of records (its manifest.json lists no "
                                  f"shards); its model is in {run / 'model'}"),
                            (parquet, f"{parquet}: not a readable Parquet file")]:
        result = invoke("verify", source, "--out", "-")
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (source, result.output)
        assert result.stdout == ""


def test_a_record_with_a_lone_surrogate_is_written_with_escapes_and_reads_back_unchanged():
    records = [{"completion": "caf\u00e9 \\boxed{5}\ud800", "n": 1}, {"completion": "caf\u00e9"}]
    data = artifacts.dumps_records(records)
    first, second = data.decode("utf-8").splitlines()
    assert first == '{"completion": "caf\\u00e9 \\\\boxed{5}\\ud800", "n": 1}'  # only this record is escaped
    assert second == '{"completion": "caf\u00e9"}'  # the others stay plain UTF-8
    assert [json.loads(line) for line in (first, second)] == records


def test_verify_keeps_a_completion_with_a_lone_surrogate(tmp_path):
    # the writing used to fail with UnicodeEncodeError after every item was verified, losing them all
    path = tmp_path / "in.jsonl"
    rows = [{"completion": "\\boxed{5}\ud800", "answer": "5"}, {"completion": "\\boxed{4}", "answer": "5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["verify", str(path), "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [(r["completion"], r["correct"]) for r in read_records(out)] == [("\\boxed{5}\ud800", True),
                                                                            ("\\boxed{4}", False)]
    result = CliRunner().invoke(app, ["verify", str(path), "--workers", "1", "--out", "-"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["completion"] for line in result.stdout.splitlines()] == [r["completion"] for r in rows]


def test_model_digest_covers_pytorch_bin_weights(tmp_path):
    """A model directory with .bin weights (s2d never loads them, but a digest that skipped them would
    call a retrained model unchanged)."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"old weights")
    before = artifacts.model_digest(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"new weights")
    assert artifacts.model_digest(tmp_path) != before


def test_out_cannot_be_an_input(tmp_path):
    """`--out` is replaced whole at commit: pointing it at the input (or a folder holding it) is refused,
    --force or not, before anything is written."""
    w = ArtifactWriter(tmp_path / "a", kind="test", config=CONFIG, num_shards=1)
    w.write_shard(0, records_of(1))
    w.commit()
    result = invoke("verify", tmp_path / "a", "--out", tmp_path / "a", "--force")
    assert result.exit_code == 2 and f"--out {tmp_path / 'a'}: is the input {tmp_path / 'a'}" in result.stderr
    result = invoke("verify", tmp_path / "a", "--out", tmp_path, "--force")
    assert result.exit_code == 2 and "(or holds it)" in result.stderr
    assert [r["id"] for r in read_records(tmp_path / "a")] == ["r0"]


def test_out_cannot_be_the_current_directory(tmp_path, monkeypatch):
    """`--out .` made a staging directory named `..partial` and then failed to rename the working
    directory (an internal error): it is refused in one line, and nothing is written."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(records_of(1)[0]) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        result = invoke("verify", source, "--out", out)
        assert result.exit_code == 2 and f"--out {out}: is the current directory" in result.stderr, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "work"] and not any(work.iterdir())


def _tensor_artifact(out: Path) -> Path:
    import torch

    from s2d_cli.artifacts import pack_token_tensors

    w = ArtifactWriter(out, kind="rollout", config=CONFIG, num_shards=1)
    w.write_shard(0, records_of(2), tensors=pack_token_tensors(
        [{"topk_ids": torch.zeros(2, 3, dtype=torch.int32)}, {"topk_ids": torch.ones(1, 3, dtype=torch.int32)}]))
    return w.commit()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"][0].update(file="/etc/passwd"), "shard file '/etc/passwd' is not a file name"),
    (lambda m: m["shards"][0].update(file="../x.jsonl"), "shard file '../x.jsonl' is not a file name"),
    (lambda m: m["shards"][0].update(file=5), "shard file 5 is not a file name"),
    (lambda m: m["shards"][0].update(tensors="x"), "'tensors' names no file"),
    (lambda m: m["shards"][0].update(tensors={"file": "/etc/passwd"}), "shard file '/etc/passwd' is not a file name"),
    (lambda m: m["shards"][0].update(records="2"), "'records' is '2', expected a count"),
    (lambda m: m.pop("shards"), "a rollout output, not an artifact of records"),
])
def test_a_damaged_manifest_is_one_line_for_records_and_tensors(tmp_path, edit, message):
    """A manifest naming a shard outside the artifact was followed there (/etc/passwd read as records), and
    a shard 'file' that is a number, a 'tensors' that is not an object or a manifest without shards given
    to `--targets topk` were internal errors (TypeError, KeyError: 'shards')."""
    from s2d_cli.artifacts import has_tensors

    out = _tensor_artifact(tmp_path / "a")
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for read in (read_records, lambda p: list(iter_record_tensors(p)), lambda p: has_tensors(p, "topk_ids")):
        with pytest.raises(UsageError) as e:
            read(out)
        assert message in one_line(e)


def test_a_corrupt_tensor_shard_is_one_line(tmp_path):
    from s2d_cli.artifacts import has_tensors

    out = _tensor_artifact(tmp_path / "a")
    tfile = out / shard_name(0, 1, "safetensors")
    tfile.write_bytes(tfile.read_bytes()[:40])
    with pytest.raises(UsageError) as e:        # changed since the manifest: refused before it is parsed
        list(iter_record_tensors(out))
    assert one_line(e).startswith(f"{tfile}: sha256 ")
    m = read_manifest(out)                      # a manifest that agrees: the bytes themselves are refused
    m["shards"][0]["tensors"]["sha256"] = hashlib.sha256(tfile.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))
    for read in (lambda p: list(iter_record_tensors(p)), lambda p: has_tensors(p, "topk_ids")):
        with pytest.raises(UsageError) as e:
            read(out)
        assert one_line(e).startswith(f"{tfile}: not a readable safetensors file")


@pytest.mark.parametrize("args, redirect, message", [
    (["verify", "-", "--out", "-"], "<&-", "<stdin>: closed"),
    (["verify", "{good}", "--out", "-"], ">&-", "--out -: stdout is closed"),
    (["toy", "--n", "2", "--out", "-"], ">&-", "--out -: stdout is closed"),
])
def test_a_closed_stdin_or_stdout_is_one_line(tmp_path, args, redirect, message):
    """Started with stdin or stdout closed, `-` was an internal AttributeError on sys.stdin/sys.stdout (None)."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in records_of(1)))
    command = " ".join([S2D, *(a.format(good=good) for a in args)])
    proc = subprocess.run(["bash", "-c", f"{command} {redirect}"], capture_output=True, text=True, env=ENV,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(f"s2d: error: {message}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_artifacts_cliutil_data_and_toy_import_no_circle():
    """`artifacts <-> cliutil` and `data -> toy -> artifacts -> data` were circles (imports inside functions
    included): each module of these reaches none that reaches it back."""
    import ast

    pkg = Path(artifacts.__file__).parent
    graph = {}
    for f in pkg.glob("*.py"):
        graph[f.stem] = {n.module for n in ast.walk(ast.parse(f.read_text()))
                         if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
        graph[f.stem] |= {a.name for n in ast.walk(ast.parse(f.read_text()))
                          if isinstance(n, ast.ImportFrom) and n.level == 1 and not n.module for a in n.names}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for name in ("artifacts", "cliutil", "data", "toy", "outputs", "evalsets"):
        assert name not in reaches(name), name
