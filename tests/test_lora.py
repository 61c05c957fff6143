"""LoRA (`--lora-rank`) on grpo, kl-warmup and opd, tiny random-init models on the CPU, values asserted.

  merge           out/model (merged) and PeftModel.from_pretrained(base, out/adapter) compute the adapter
                  model's logits; the adapters switched off compute the base's, bit for bit
  decode          the hf engine's fast step on merged weights samples what the model's own forward does
  learning        grpo raises the vowel reward; kl-warmup halves the held-out forward KL; opd runs and
                  lowers the reverse KL
  checkpoints     adapter + optimizer state only; SIGKILL + rerun == an uninterrupted run
  two processes   `accelerate launch` x2 == one process, LoRA and beta > 0; FSDP on two CPU processes too
  makefile        examples/qwen3's teacher-lora target: Stage 1 with LoRA on one GPU, a config that resolves
  bad input       rank < 0, a module the model lacks, the head, a LoRA change on a partial run
  vllm            the engine takes the merged weights of the adapted blocks and samples from them
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_grpo import (
    BIN,
    VOWEL,
    assert_same_weights,
    grpo,
    metrics,
    one_and_two_processes,
    subprocess_env,
    weights,
    write_rollouts,
)
from test_kl_warmup import exact_kl
from test_kl_warmup import s2d as s2d_cli
from typer.testing import CliRunner

from s2d_cli import lora
from s2d_cli.cli import app
from s2d_cli.engines import vllm_available
from s2d_cli.models import build_tiny_model, load_model, load_tokenizer, save_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(autouse=True)
def rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def louder_head(src: Path, out: Path, factor: float = 8.0) -> Path:
    """`src` with its output head x `factor`. LoRA adapts the blocks, never the head, and a random-init
    head (std 0.02, hidden 64) gives logits of std ~0.16 that no change of the trunk moves far: measured,
    16 grpo steps at lr 0.3 leave the vowel reward at ~0.15 and the entropy at 6.19 nats (full training
    moves the head itself). A head of a trained model's scale is one the trunk can steer."""
    model = load_model(str(src), device="cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return save_checkpoint(model, load_tokenizer(str(src)), out)


def blocks_changed(student: Path, out: Path) -> Path:
    """A teacher that differs from `student` in its blocks only (another seed's MLPs, scaled x4, attention
    output zeroed), head and embeddings shared: one that adapters on the blocks can reach."""
    model = load_model(str(student), device="cpu")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.08)
    return save_checkpoint(model, load_tokenizer(str(student)), out)


def wrapped(model_dir: Path, rank: int = 4, seed: int = 0, **fields):
    """The tiny model with rank-`rank` adapters whose B is random (at init B = 0: the adapter is a no-op)."""
    lm = load_model(str(model_dir), dtype="fp32", device="cpu")
    peft_model = lora.wrap(lm, lora.LoraFields(lora_rank=rank, **fields), name=str(model_dir), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora.lora_layers(lm):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return lm, peft_model


# ------------------------------------------------------------------------------------------------
# 1. merged weights, the adapter on disk, the adapters switched off

def test_merged_model_and_saved_adapter_compute_the_adapter_models_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel

    assert lora.block_linear_names(load_model(str(tiny_model_dir), device="cpu")) == TARGETS
    lm, peft_model = wrapped(tiny_model_dir)
    base = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    # rank 4, alpha 2r: 7 projections x 2 layers; A [4, in] + B [out, 4] each (hidden 64, kv 2 x 16, mlp 128)
    per_layer = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert lora.trainable_parameters(lm) == (2 * per_layer, sum(p.numel() for p in base.parameters()) + 2 * per_layer)
    assert lora.lora_layers(lm)[0].scaling["default"] == 2.0
    ids = torch.tensor([[5, 17, 230, 41, 9, 300, 77, 12], [8, 8, 100, 3, 450, 61, 2, 19]])
    with torch.no_grad():
        adapted = lm(ids).logits
        with lora.adapter_off(lm):
            off = lm(ids).logits
        plain = base(ids).logits
    assert torch.equal(off, plain)                         # the reference of --beta: the base itself
    assert (adapted - plain).abs().max() > 0.1             # and the adapter does change the logits

    save_checkpoint(lm, None, tmp_path / "model")
    merged = load_model(str(tmp_path / "model"), dtype="fp32", device="cpu")
    assert set(load_file(tmp_path / "model" / "model.safetensors")) == set(load_file(tiny_model_dir / "model.safetensors"))
    lora.save_adapter(peft_model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert (merged(ids).logits - adapted).abs().max() < 1e-5
        assert (reloaded(input_ids=ids).logits - adapted).abs().max() < 1e-5
    # a merged weight is W + (alpha / r) B A, by hand
    q = lm.model.layers[0].self_attn.q_proj
    by_hand = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, by_hand, atol=1e-6)
    assert torch.equal(lm.model.layers[0].self_attn.q_proj.base_layer.weight,
                       base.model.layers[0].self_attn.q_proj.weight)           # the base is never touched


def test_fast_decode_samples_what_the_adapter_model_computes(tiny_model_dir):
    """The fast decode step reads merged weights; the model's own forward computes base + adapter."""
    from s2d_cli.engines.decode import fast_decode_ok, sample

    lm, _ = wrapped(tiny_model_dir)
    assert fast_decode_ok(lm)
    prompts = [[5, 17, 230, 41], [8, 100, 3, 450, 61, 2]]
    kw = dict(n=3, max_new_tokens=12, stop_ids=[2], pad_id=0, logprobs=True)
    fast = sample(lm, prompts, fast=True, generator=torch.Generator().manual_seed(0), **kw)
    loop = sample(lm, prompts, fast=False, generator=torch.Generator().manual_seed(0), **kw)
    assert [r.token_ids for r in fast] == [r.token_ids for r in loop]
    worst = max(abs(a - b) for f, s in zip(fast, loop) for a, b in zip(f.logprobs, s.logprobs))
    assert worst < 1e-4, worst
    base = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    plain = sample(base, prompts, fast=True, generator=torch.Generator().manual_seed(0), **kw)
    assert [r.logprobs for r in plain] != [r.logprobs for r in fast]


def test_engine_weights_are_the_merged_adapted_blocks(tiny_model_dir):
    lm, _ = wrapped(tiny_model_dir, lora_targets=["q_proj", "v_proj"])
    sent = dict(lora.engine_weights(lm))
    base = load_file(tiny_model_dir / "model.safetensors")
    # whole blocks (vLLM fuses q/k/v and gate/up), no embeddings, final norm or head
    assert set(sent) == {k for k in base if ".layers." in k}
    q = lm.model.layers[1].self_attn.q_proj
    assert torch.allclose(sent["model.layers.1.self_attn.q_proj.weight"],
                          q.base_layer.weight + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight)
    assert torch.equal(sent["model.layers.1.self_attn.k_proj.weight"], base["model.layers.1.self_attn.k_proj.weight"])
    plain = load_model(str(tiny_model_dir), device="cpu")
    assert list(dict(lora.engine_weights(plain))) == list(plain.state_dict())   # full training: everything


# ------------------------------------------------------------------------------------------------
# 2. learning

def test_lora_grpo_raises_the_reward(tiny_model_dir, tmp_path):
    """test_grpo's vowel task (~16% of first tokens qualify at random init) with rank-8 adapters on the
    tiny model with a louder head (`louder_head`). Seen: steps 1-2 rewards .16 .16, steps 13-16 1.0 1.0
    1.0 .97."""
    start = louder_head(tiny_model_dir, tmp_path / "start")
    run = tmp_path / "run"
    grpo("--model", start, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 16,
         "--group-size", 8, "--prompts-per-step", 4, "--max-new-tokens", 2, "--lr", 3e-2, "--backend", "hf",
         "--lora-rank", 8, "--out", run)
    rewards = [m["reward_mean"] for m in metrics(run)]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-4:]) / 4
    assert 0.05 <= first <= 0.3, rewards
    assert last - first >= 0.3, rewards
    # out/model is a plain checkpoint: the weights outside the adapted projections are the base's, exactly
    start, final = load_file(start / "model.safetensors"), weights(run)
    assert set(final) == set(start)
    assert all(torch.equal(final[k], start[k]) for k in start if not any(t in k for t in TARGETS))
    assert any(not torch.equal(final[k], start[k]) for k in start if "q_proj" in k)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8
    ckpt = run / "checkpoints" / "step-000016"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "optimizer.pt", "trainer_state.json"]
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    moments = sum(s["exp_avg"].numel() for s in opt["state"].values())
    assert moments == sum(t.numel() for t in load_file(ckpt / "adapter_model.safetensors").values())
    assert json.loads((run / "manifest.json").read_text())["adapter"] == "adapter"


@pytest.fixture(scope="module")
def kl_world(tmp_path_factory, tokenizer_dir):
    from test_kl_warmup import read_records

    root = tmp_path_factory.mktemp("lora-kl")
    tok = load_tokenizer(str(tokenizer_dir))
    student = louder_head(build_tiny_model(root / "student-init", tokenizer=tok, seed=0, hidden_size=32,
                                           num_layers=2), root / "student")
    teacher = blocks_changed(student, root / "teacher")
    common = ["--model", teacher, "--max-new-tokens", 24, "--topk", 8, "--backend", "hf"]
    s2d_cli("rollout", *common, "--dataset", "toy:split=pool,n=48", "--n", 4, "--out", root / "train")
    s2d_cli("rollout", *common, "--dataset", "toy:split=test,n=8", "--n", 2, "--out", root / "heldout")
    return dict(student=student, teacher=teacher, train=root / "train", heldout=root / "heldout",
                heldout_records=read_records(root / "heldout"), root=root)


def test_lora_kl_warmup_lowers_the_forward_kl(kl_world, tmp_path):
    w = kl_world
    out = tmp_path / "kl"
    s2d_cli("kl-warmup", "--student", w["student"], "--teacher", w["teacher"], "--rollouts", w["train"],
            "--eval-rollouts", w["heldout"], "--targets", "full", "--steps", 20, "--lr", 1e-2, "--batch-size", 16,
            "--lora-rank", 8, "--set", "micro_batch_tokens=1024", "--out", out)
    before = exact_kl(w["student"], w["teacher"], w["heldout_records"])
    after = exact_kl(out / "model", w["teacher"], w["heldout_records"])
    print(f"LoRA kl-warmup: held-out forward KL {before:.3f} -> {after:.3f}")
    assert before > 0.5 and after <= 0.6 * before, (before, after)     # seen: 0.648 -> 0.338
    manifest = json.loads((out / "manifest.json").read_text())
    # the trainer's chunked, packed KL of the LoRA model is the merged checkpoint's plain one
    assert manifest["heldout_kl_start"] == pytest.approx(before, rel=1e-4)
    assert manifest["heldout_kl_end"] == pytest.approx(after, rel=1e-4)


def test_opd_with_a_lora_student_runs_and_lowers_the_reverse_kl(kl_world, tmp_path):
    w = kl_world
    prompts = w["root"] / "prompts.jsonl"
    from s2d_cli.toy import toy_records
    prompts.write_text("".join(json.dumps({"problem": r["problem"]}) + "\n" for r in toy_records("toy:split=pool,n=32")))
    out = tmp_path / "opd"
    s2d_cli("opd", "--student", w["student"], "--teacher", w["teacher"], "--dataset", prompts, "--loss", "full",
            "--steps", 12, "--n", 4, "--prompts-per-step", 4, "--max-new-tokens", 16, "--lr", 1e-2,
            "--lora-rank", 8, "--set", "micro_batch_tokens=1024", "--out", out)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    first = sum(r["reverse_kl_exact"] for r in rows[:3]) / 3
    last = sum(r["reverse_kl_exact"] for r in rows[-3:]) / 3
    print(f"LoRA opd: reverse KL {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first, (first, last)          # seen: 0.617 -> 0.442
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# 3. resume after SIGKILL, two processes

def test_killed_lora_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    steps = 6

    def args(out: Path) -> list[str]:
        return ["--model", str(tiny_model_dir), "--dataset", "toy:split=train", "--reward", VOWEL,
                "--steps", str(steps), "-G", "4", "-P", "4", "--max-new-tokens", "3", "--lr", "3e-2",
                "--backend", "hf", "--lora-rank", "4", "--beta", "0.05", "--set", "save_every=2", "--out", str(out)]

    run = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "s2d"), "grpo", *args(run)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "checkpoints" / "step-000002" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "checkpoints" / "step-000002" / "model.safetensors").exists()
    assert 2 <= len(metrics(run)) < steps

    grpo(*args(run))
    reference = tmp_path / "uninterrupted"
    grpo(*args(reference))
    resumed, ref = metrics(run), metrics(reference)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    for key in ("reward_mean", "loss", "grad_norm", "kl_ref", "entropy"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in ref], rel=1e-5, abs=1e-7), key
    assert ref[-1]["kl_ref"] > 1e-4          # the adapters moved the policy off the base
    assert_same_weights(weights(run), weights(reference), atol=1e-6)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, reference))
    assert_same_weights(a, b, atol=1e-6)


def test_two_processes_match_one_with_lora(tiny_model_dir, tmp_path):
    path = tmp_path / "rollouts.jsonl"
    write_rollouts(path, len(load_tokenizer(str(tiny_model_dir))))
    one, two = one_and_two_processes(
        ["--model", str(tiny_model_dir), "--rollouts", str(path), "--steps", "3", "-G", "4", "-P", "4",
         "--loss", "dapo", "--beta", "0.1", "--lr", "3e-2", "--lora-rank", "4", "--set", "micro_batch_tokens=40"],
        tmp_path)
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    m1, m2 = metrics(one), metrics(two)
    for key in ("loss", "kl_ref", "grad_norm", "entropy"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5, abs=1e-8), key
    assert m1[0]["kl_ref"] == 0.0 and m1[2]["kl_ref"] > 1e-4
    assert_same_weights(weights(one), weights(two), atol=1e-5)


FSDP_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: "no"
use_cpu: false
fsdp_config:
  fsdp_version: 1
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_use_orig_params: true
  fsdp_sync_module_states: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""


def test_fsdp_on_two_cpu_processes_matches_one_with_lora(tiny_model_dir, tmp_path):
    """examples/accelerate/fsdp-8gpu.yaml's settings on two gloo CPU processes, except what torch's FSDP
    cannot do on a CPU (sync_module_states, and cpu_ram_efficient_loading, which needs it): the same
    losses, merged model and adapter as one process."""
    from test_grpo import free_port

    path = tmp_path / "rollouts.jsonl"
    write_rollouts(path, len(load_tokenizer(str(tiny_model_dir))))
    config = tmp_path / "fsdp-cpu.yaml"
    config.write_text(FSDP_CPU)
    args = ["--model", str(tiny_model_dir), "--rollouts", str(path), "--steps", "2", "-G", "4", "-P", "4",
            "--lr", "3e-2", "--lora-rank", "4", "--set", "save_every=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port",
              str(free_port()), "-m", "s2d_cli.cli", "grpo", *args, "--out", str(two)]
    proc = subprocess.Popen(launch, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    grpo(*args, "--out", one)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    m1, m2 = metrics(one), metrics(two)
    for key in ("loss", "grad_norm", "entropy"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5, abs=1e-8), key
    assert_same_weights(weights(one), weights(two), atol=1e-5)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (one, two))
    # 1e-5 as for the merged weights: step 1 agrees to 1e-8, but A's first gradient comes at step 2 (B starts
    # at 0), where AdamW's g / sqrt(v) turns the reduce-scatter's rounding in a near-zero gradient into ~1e-6
    assert_same_weights(a, b, atol=1e-5)
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3      # trained, not the init


# ------------------------------------------------------------------------------------------------
# 4. bad input

def test_bad_lora_input_is_one_line(tiny_model_dir, tmp_path):
    base = ["--model", str(tiny_model_dir), "--dataset", "toy:split=train", "--reward", VOWEL, "-G", "2", "-P", "2",
            "--max-new-tokens", "2", "--backend", "hf"]

    def refused(*extra, out=tmp_path / "bad"):
        result = CliRunner().invoke(app, ["grpo", *base, "--steps", "1", *map(str, extra), "--out", str(out)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        return lines[0]

    assert "--lora-rank: expected 0 (full training) or a rank >= 1, got -1" in refused("--lora-rank", "-1")
    msg = refused("--lora-rank", "4", "--set", "lora_targets=q_proj,qkv_proj")
    assert "no linear module 'qkv_proj'; its linear modules: " + ", ".join(TARGETS) in msg
    assert "no linear module 'lm_head'" in refused("--lora-rank", "4", "--set", "lora_targets=lm_head")
    assert "lora_dropout" in refused("--lora-rank", "4", "--set", "lora_dropout=1.5")
    assert not (tmp_path / "bad").exists()

    # a partial run (a checkpoint, no manifest) continued with LoRA switched on, or off: a config change
    for first, second in (([], ["--lora-rank", "4"]), (["--lora-rank", "4"], []),
                          (["--lora-rank", "4"], ["--lora-rank", "8"])):
        out = tmp_path / f"partial-{len(first)}-{len(second)}-{second[-1:] or 0}"
        grpo(*base, "--steps", "2", *first, "--set", "save_every=1", "--out", out)
        (out / "manifest.json").unlink()
        msg = refused(*second, "--steps", "2", "--set", "save_every=1", out=out)
        assert "a partial run with a different config" in msg and "lora_rank" in msg, msg


# ------------------------------------------------------------------------------------------------
# 5. vLLM (last: an in-process vLLM engine leaves process-wide settings behind)

@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_vllm_engine_samples_from_the_merged_lora_weights(tokenizer_dir, tmp_path, monkeypatch):
    """Two LoRA steps with --backend vllm: mismatch_kl ~ 0 at step 2 (step 1's merged update reached the
    engine), and afterwards the engine decodes greedily what HF decodes from out/model."""
    from s2d_cli.engines import SamplingConfig
    from s2d_cli.engines.hf import HFEngine
    from s2d_cli.engines.vllm import VLLMEngine

    tok = load_tokenizer(str(tokenizer_dir))
    start = build_tiny_model(tmp_path / "start", arch="qwen3", tokenizer=tok, seed=0, hidden_size=64,
                             num_heads=2, num_kv_heads=1)
    engines: list[VLLMEngine] = []
    close = VLLMEngine.close
    monkeypatch.setattr(VLLMEngine, "close", lambda self: engines.append(self))
    run = tmp_path / "run"
    try:
        grpo("--model", start, "--dataset", "toy:split=train", "--reward", VOWEL, "--steps", 2, "-G", 4, "-P", 2,
             "--max-new-tokens", 4, "--lr", 1e-1, "--backend", "vllm", "--lora-rank", 8, "--set", "dtype=fp32",
             "--out", run)
        (engine,) = engines
        prompts = [tok.encode(f"Compute {a} + {b}.") for a, b in ((12, 30), (7, 5), (41, 9))]
        greedy = SamplingConfig(n=1, max_new_tokens=8, temperature=0.0)
        from_engine = [g[0].token_ids for g in engine.generate(prompts, greedy)]
    finally:
        for e in engines:
            close(e)
    ms = metrics(run)
    assert all(m["mismatch_kl"] < 1e-4 for m in ms), [m["mismatch_kl"] for m in ms]

    def hf_greedy(path):
        engine = HFEngine(load_model(str(path), dtype="fp32", device="cpu"), tokenizer=tok)
        return [g[0].token_ids for g in engine.generate(prompts, greedy)]

    assert from_engine == hf_greedy(run / "model")
    assert from_engine != hf_greedy(start)


def test_qwen3_makefile_runs_stage_1_with_lora_on_one_gpu():
    """`make -n teacher-lora` prints one plain `s2d grpo` (no accelerate launch) with --lora-rank, and the
    stage YAML with its flags resolves to a valid config."""
    import shlex

    from s2d_cli.config import resolve
    from s2d_cli.grpo import GRPOConfig

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(["make", "--no-print-directory", "-n", "-C", str(root / "examples" / "qwen3"), "teacher-lora",
                          "S2D=s2d", f"MATH_TRAIN={root / 'README.md'}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (cmd,) = [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("s2d ")]
    assert cmd[:2] == ["s2d", "grpo"] and "accelerate" not in res.stdout
    flags = dict(zip(cmd[4::2], cmd[5::2]))      # after: s2d grpo --config FILE
    assert cmd[2] == "--config" and flags["--lora-rank"] == "64"
    cfg = resolve(GRPOConfig, config_file=cmd[3], sets=[flags["--set"]],
                  flags={"model": flags["--model"], "dataset": flags["--dataset"], "out": flags["--out"],
                         "lora_rank": 64, "lr": float(flags["--lr"]), "backend": flags["--backend"]})
    assert (cfg.lora_rank, cfg.lr, cfg.backend, cfg.gpu_memory_utilization) == (64, 1e-5, "vllm", 0.35)
    assert cfg.grad_checkpointing          # the stage YAML's, which the README's memory arithmetic assumes
