"""The training step alone: s2d's trunk + chunked head against transformers + liger-kernel, tokens/s, MFU, memory.

    python bench/bench_step.py --out $OUT/gpu_step.md             # GPU: Qwen3-0.6B shape, 8 x 2,048 and 16 x 2,048
    python bench/bench_step.py --repeats 3                         # min / median / max over 3 processes a side
    python bench/bench_step.py --variants plain,liger,compile,liger+compile   # s2d with its switches (s2d_cli/kernels.py)
    python bench/bench_step.py --child s2d --batch 2 --seq 64 --steps 1 --shape tiny   # one process, one JSON line

One step = forward, backward and a fused AdamW step on B rows of T random tokens (every row full, no
padding), next-token cross-entropy over all B x (T - 1) positions:
- s2d: `trainer.hidden_at` (the trunk, with `models.load_model`'s fused norms on CUDA and whatever
  S2D_LIGER / S2D_COMPILE / S2D_CHECKPOINT_LAYERS switch on, `kernels.apply_liger` and
  `kernels.apply_training_switches`), then `heads.chunked_token_logprobs`, the head every s2d loss uses
  (no [tokens, vocab] logits);
- peer: transformers' model with liger-kernel's Qwen3 kernels on the instance (RMSNorm, RoPE, SwiGLU and
  fused linear cross-entropy, the loss computed from the hidden states inside the model's forward with
  `labels`). liger-kernel is Triton: on a CPU the peer is plain transformers (its loss materialises the
  logits), which only tests this script's wiring.

Each side runs in its own process, one untimed warm-up step (compilation, if switched on, happens there and
is reported as `first_step_s`) and then `--steps` timed ones; the figure of a process is its median step.
MFU = 6 N x tokens/s / 989 TFLOP/s, N the parameters with the tied embedding counted once, 989 TFLOP/s the
H100 SXM's dense bf16 peak; 6N leaves out attention's own FLOPs (at T = 2,048 on this shape about 12 % more),
the same convention as the issue's liger figures (25.9 % at 71.7k tokens/s). Peak memory:
`torch.cuda.max_memory_allocated` (GPU) or ru_maxrss (CPU). Weights are bf16 on a GPU, float32 on a CPU;
random-init, no hub.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

H100_BF16_FLOPS = 989e12
SHAPES = {
    # Qwen3-0.6B: hidden 1024, 28 layers, 16 / 8 heads of 128, MLP 3072, vocabulary 151,936, tied embeddings
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151_936),
    # a scaled-down shape for CPUs, and the tests' one
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=256, vocab_size=8192),
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=64, vocab_size=96),
}


def mfu(params: int, tokens_per_s: float, peak_flops: float = H100_BF16_FLOPS) -> float:
    """Model FLOPs utilisation: 6 FLOPs per parameter per token (forward 2, backward 4) over the peak."""
    return 6 * params * tokens_per_s / peak_flops


def unique_params(model) -> int:
    """Parameters, a tied embedding / head counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build(shape: str, device):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(tie_word_embeddings=True, max_position_embeddings=4096, use_cache=False, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def child(side: str, shape: str, batch: int, seq: int, steps: int) -> dict:
    import torch
    from common import peak_bytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = build(shape, device)
    params = unique_params(lm)
    g = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(3, lm.config.vocab_size, (batch, seq), generator=g).to(device)
    peer = "transformers"
    if side == "s2d":
        from s2d_cli import kernels
        from s2d_cli.batching import Sequence, pack
        from s2d_cli.heads import chunked_token_logprobs
        from s2d_cli.models import FUSED_NORMS, fuse_rms_norms
        from s2d_cli.trainer import hidden_at

        if device == "cuda" and FUSED_NORMS:          # what models.load_model does
            fuse_rms_norms(lm)
        kernels.apply_liger(lm, device)
        switches = kernels.apply_training_switches(lm, torch.device(device), grad_checkpointing=False)
        # one sequence per row: a 1-token prompt, the rest completion, so every next-token position counts
        (mb,) = pack([Sequence(r[:1], r[1:]) for r in ids_BT.tolist()], batch * seq, layout="padded",
                     device=torch.device(device))
        head = lm.get_output_embeddings().weight

        def loss_fn():
            logp_M, _ = chunked_token_logprobs(hidden_at(lm, mb), head, mb.targets)
            return -logp_M.mean()
        fused = switches["fused_adamw"]
    else:
        switches = {}
        if device == "cuda":
            from liger_kernel.transformers import apply_liger_kernel_to_qwen3

            apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                        model=lm)
            peer = "transformers + liger-kernel"

        def loss_fn():
            return lm(input_ids=ids_BT, labels=ids_BT, use_cache=False).loss
        fused = True
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6, fused=fused)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    seconds, losses = [], []
    for _ in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        sync()
        seconds.append(time.perf_counter() - t0)
    tokens = batch * seq
    timed = statistics.median(seconds[1:])
    return {"side": side, "peer": peer, "shape": shape, "batch": batch, "seq": seq, "tokens": tokens,
            "params": params, "first_step_s": seconds[0], "step_s": seconds[1:], "tok_per_s": tokens / timed,
            "mfu": mfu(params, tokens / timed), "peak_mib": peak_bytes(device) / 2**20, "loss": losses,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "switches": switches}


# s2d variants: the switches of s2d_cli/kernels.py each s2d process runs with (on top of the caller's environment)
VARIANTS = {"plain": {}, "liger": {"S2D_LIGER": "1"}, "compile": {"S2D_COMPILE": "1"},
            "liger+compile": {"S2D_LIGER": "1", "S2D_COMPILE": "1"}}


def run_child(side: str, shape: str, batch: int, seq: int, steps: int, timeout: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--shape", shape, "--batch", str(batch), "--seq", str(seq),
           "--steps", str(steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        tail = [x for x in proc.stderr.strip().splitlines() if x.strip()][-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=("s2d", "peer"))
    gpu = torch.cuda.is_available()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b" if gpu else "small")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16] if gpu else [2])
    ap.add_argument("--seq", type=int, default=2048 if gpu else 256)
    ap.add_argument("--steps", type=int, default=5 if gpu else 2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default="plain", help=f"comma-separated s2d variants: {', '.join(VARIANTS)}")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.batch[0], args.seq, args.steps)), flush=True)
        return 0
    from common import emit

    switches = {k: v for k, v in os.environ.items() if k in ("S2D_LIGER", "S2D_COMPILE", "S2D_CHECKPOINT_LAYERS",
                                                            "S2D_FUSED_NORMS", "S2D_FUSED_ADAMW", "S2D_COMPILE_CACHE")}
    lines = [f"Training step alone (bench/bench_step.py), shape {args.shape} {SHAPES[args.shape]}, tied embeddings, "
             f"{'bf16 on ' + torch.cuda.get_device_name() if gpu else 'float32 on a CPU (wiring only: no liger)'}; "
             f"{args.steps} timed steps a process after one warm-up, {args.repeats} process(es) a side; environment: "
             f"{switches or 'no S2D_ switch'}. First step: the untimed warm-up (with S2D_COMPILE, the compilation; "
             "a later process finds the kernels in the cache).", "",
             "| tokens | side | tok/s min / med / max | MFU (med) | peak MiB | first step s (each process) | s2d / peer |",
             "|---|---|---|---|---|---|---|"]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown[0]!r}; expected {', '.join(VARIANTS)}")
    sides = ["peer"] + [f"s2d:{v}" for v in variants]
    ok = []
    for batch in args.batch:
        got = {side: [] for side in sides}
        for rep in range(args.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):       # alternate who runs first
                name, _, variant = side.partition(":")
                out = run_child(name, args.shape, batch, args.seq, args.steps, args.timeout, VARIANTS.get(variant))
                got[side].append(out)
                print(f"[step] {batch} x {args.seq} {side} #{rep + 1}: "
                      + (out.get("error") or f"{out['tok_per_s']:,.0f} tok/s, MFU {out['mfu']:.1%}, "
                                             f"{out['peak_mib']:,.0f} MiB, first step {out['first_step_s']:.1f} s"),
                      file=sys.stderr, flush=True)
        peer_med = None
        for side in sides:
            ok = [x for x in got[side] if "error" not in x]
            if not ok:
                lines.append(f"| {batch} x {args.seq} | {side} | {got[side][0]['error']} | | | | |")
                continue
            rates = sorted(x["tok_per_s"] for x in ok)
            med = statistics.median(rates)
            if side == "peer":
                peer_med, name, ratio = med, ok[0]["peer"], ""
            else:
                name = f"s2d trunk + chunked head, {side[4:]} ({', '.join(f'{k}={v}' for k, v in VARIANTS[side[4:]].items()) or 'defaults'})"
                ratio = f"**{med / peer_med:.2f}x**" if peer_med else "—"
            first = sorted(x["first_step_s"] for x in ok)
            lines.append(f"| {batch} x {args.seq} | {name} | {rates[0]:,.0f} / {med:,.0f} / {rates[-1]:,.0f} | "
                         f"{mfu(ok[0]['params'], med):.1%} | {statistics.median(x['peak_mib'] for x in ok):,.0f} | "
                         f"{' / '.join(f'{t:.1f}' for t in first)} | {ratio} |")
    lines += ["", f"MFU = 6 x {ok[0]['params'] if ok else 'N'} parameters (tied embedding once) x tok/s / 989 TFLOP/s "
              "(H100 SXM dense bf16 peak); attention FLOPs not counted."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
