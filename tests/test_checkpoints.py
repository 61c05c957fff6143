"""What a training run leaves for the tools after it: checkpoints that transformers and vLLM load as they
are (no fp32 masters among the weights, the KV cache on in the saved config), and a run directory given
where a model is expected answered with where its model is."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.trainer import MASTER_FILE, MASTER_PATH


def s2d(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def seqs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "seqs.jsonl"
    rows = [{"prompt": f"{a} + {b} =", "completion": f"{a + b}. The answer is \\boxed{{{a + b}}}."}
            for a, b in [(1, 2), (3, 4), (12, 5), (7, 8)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(student, data, out, *sets, ok: bool = True):
    return s2d("kl-warmup", "--student", student, "--rollouts", data, "--targets", "sampled", "--steps", 4,
               "--batch-size", 4, "--lr", 1e-3, *[x for kv in sets for x in ("--set", kv)], "--out", out, ok=ok)


def top_level_weights(folder: Path) -> dict[str, torch.Tensor]:
    """What vLLM reads from a model folder: every *.safetensors file at its top level."""
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


# ---------------------------------------------------------------------------------------------- checkpoints

def test_bf16_checkpoints_keep_the_masters_out_of_the_model_folder(tmp_path, tiny_model_dir, seqs):
    train(tiny_model_dir, seqs, tmp_path / "run", "dtype=bf16", "save_every=2")
    start = top_level_weights(Path(tiny_model_dir))
    for ckpt in sorted((tmp_path / "run" / "checkpoints").glob("step-*")):
        assert not (ckpt / MASTER_FILE).exists()
        weights = top_level_weights(ckpt)
        assert sorted(weights) == sorted(start)                  # the model's tensors and nothing else
        assert all(w.dtype == torch.bfloat16 for w in weights.values())
        masters = load_file(ckpt / MASTER_PATH)
        assert all(m.dtype == torch.float32 and torch.equal(m.to(torch.bfloat16), weights[k])
                   for k, m in masters.items())
    # the folder loads in transformers as it is
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ckpt)


def test_a_checkpoint_of_the_older_layout_still_resumes(tmp_path, tiny_model_dir, seqs):
    """Checkpoints written before the masters moved kept them beside the weights: resuming one gives the
    run that never stopped."""
    train(tiny_model_dir, seqs, tmp_path / "straight", "dtype=bf16", "save_every=2")
    run = tmp_path / "old"
    train(tiny_model_dir, seqs, run, "dtype=bf16", "save_every=2")
    (run / "manifest.json").unlink()
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-000004")
    step2 = run / "checkpoints" / "step-000002"
    (step2 / MASTER_PATH).rename(step2 / MASTER_FILE)
    (step2 / MASTER_PATH).parent.rmdir()
    state = json.loads((step2 / "trainer_state.json").read_text())
    del state["files"]                                     # (they recorded no digests either)
    (step2 / "trainer_state.json").write_text(json.dumps(state))
    result = train(tiny_model_dir, seqs, run, "dtype=bf16", "save_every=2")
    assert "step-000002 (step 2)" in " ".join(result.stderr.split())
    a, b = (load_file(tmp_path / d / "checkpoints" / "step-000004" / MASTER_PATH) for d in ("straight", "old"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_models_decode_with_the_kv_cache(tmp_path, tiny_model_dir, seqs):
    """Training turns the cache off on the live model; the configs written for decoding say use_cache: true."""
    assert json.loads((Path(tiny_model_dir) / "config.json").read_text())["use_cache"] is True
    train(tiny_model_dir, seqs, tmp_path / "run", "save_every=2")
    for folder in [tmp_path / "run" / "model", *sorted((tmp_path / "run" / "checkpoints").glob("step-*"))]:
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True, folder


# ---------------------------------------------------------------------------------------------- run dirs

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, seqs) -> Path:
    root = tmp_path_factory.mktemp("runs")
    train(tiny_model_dir, seqs, root / "kl", "save_every=2")
    return root / "kl"


@pytest.mark.parametrize("flag", ["rollout --model", "eval --model", "kl-warmup --student", "kl-warmup --teacher",
                                  "opd --student", "opd --teacher", "grpo --model"])
def test_a_run_directory_given_as_a_model_says_where_its_model_is(tmp_path, run_dir, tiny_model_dir, seqs, flag):
    command, option = flag.split()
    other = {"rollout": ["--dataset", "toy:n=2", "--out", tmp_path / "o"],
             "eval": ["--dataset", "toy:n=2", "--out", tmp_path / "o"],
             "kl-warmup": ["--rollouts", seqs, "--targets", "full", "--out", tmp_path / "o"],
             "opd": ["--dataset", "toy:n=2", "--out", tmp_path / "o"],
             "grpo": ["--dataset", "toy:split=train,n=2", "--out", tmp_path / "o"]}[command]
    models = {"--student": tiny_model_dir, "--teacher": tiny_model_dir}
    if command in ("kl-warmup", "opd"):
        models[option] = run_dir
        args = ["--student", models["--student"], "--teacher", models["--teacher"]]
    else:
        args = [option, run_dir]
    result = s2d(command, *args, *other, ok=False)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"s2d: error: {run_dir}: a training run directory, not a model; use {run_dir}/model\n"
    assert not (tmp_path / "o").exists()


def test_an_unfinished_run_points_at_its_newest_checkpoint(tmp_path, run_dir):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    shutil.rmtree(partial / "model")
    (partial / "manifest.json").unlink()
    result = s2d("rollout", "--model", partial, "--dataset", "toy:n=2", "--out", "-", ok=False)
    assert result.stderr == (f"s2d: error: {partial}: a training run directory, not a model; it has no model/ "
                             f"yet (unfinished); its newest checkpoint is {partial}/checkpoints/step-000004\n")


# ---------------------------------------------------------------------------------------------- damaged checkpoints

def unfinished(run: Path) -> Path:
    """The run as a kill after its last checkpoint leaves it: checkpoints, no model/, no manifest."""
    shutil.rmtree(run / "model")
    (run / "manifest.json").unlink()
    return run


def test_checkpoints_record_the_digest_of_every_file(tmp_path, run_dir):
    from s2d_cli.artifacts import sha256_file

    ckpt = run_dir / "checkpoints" / "step-000004"
    files = json.loads((ckpt / "trainer_state.json").read_text())["files"]
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                     if p.is_file() and p.name != "trainer_state.json")
    assert sorted(files) == on_disk and "model.safetensors" in files and "optimizer.pt" in files
    assert files["model.safetensors"] == sha256_file(ckpt / "model.safetensors")


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_way_on(tmp_path, run_dir, tiny_model_dir, seqs,
                                                                       damage):
    run = unfinished(Path(shutil.copytree(run_dir, tmp_path / "run")))
    ckpt = run / "checkpoints" / "step-000004"
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":               # one bit in the middle of a tensor: it would still load, silently wrong
        data[len(data) // 2 + 7] ^= 0x10
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights.unlink()
    result = train(tiny_model_dir, seqs, run, "save_every=2", ok=False)
    what = "is missing" if damage == "remove" else "is not the file that was saved (its sha256 differs)"
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"s2d: error: checkpoint {ckpt}: model.safetensors {what}; move it away to resume "
                             f"from step-000002, or start a new --out\n")
    assert not (run / "model").exists() and not (run / "manifest.json").exists()


def test_moving_the_damaged_checkpoint_away_resumes_from_the_one_before(tmp_path, run_dir, tiny_model_dir, seqs):
    run = unfinished(Path(shutil.copytree(run_dir, tmp_path / "run")))
    shutil.move(run / "checkpoints" / "step-000004", tmp_path / "aside")
    result = train(tiny_model_dir, seqs, run, "save_every=2")
    assert "step-000002 (step 2)" in " ".join(result.stderr.split())
    a, b = (load_file(d / "model" / "model.safetensors") for d in (run_dir, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_without_digests_that_fails_to_load_is_one_line(tmp_path, run_dir, tiny_model_dir, seqs):
    """Checkpoints of earlier versions carry no digests: a damaged file there still ends in one line."""
    run = unfinished(Path(shutil.copytree(run_dir, tmp_path / "run")))
    for ckpt in (run / "checkpoints").glob("step-*"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        del state["files"]
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    ckpt = run / "checkpoints" / "step-000004"
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:100])
    result = train(tiny_model_dir, seqs, run, "save_every=2", ok=False)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"s2d: error: checkpoint {ckpt}: cannot be loaded (")
    assert result.stderr.endswith("); move it away to resume from step-000002, or start a new --out\n")
    assert result.stderr.count("\n") == 1
