"""GPU check of the lm-head fast path in s2d_cli.losses: bf16 GEMM with float32 output vs the upcast GEMM.

    python bench/gpu_check.py          # run by bench/gpu.sh before the comparisons; needs CUDA

At the Qwen3-0.6B head shape (V = 151,936, H = 1,024, bf16) it runs `chunked_token_logprobs` (forward
+ backward) and `chunked_kl` (forward KL, forward + backward) twice: with `HALF_MM_FP32_OUT` on (the
default on a GPU) and off (hidden and head upcast to float32 inside each chunk, the code before the
change). It prints the differences (max |logp| difference; relative L2 error of the gradients) and the
median time of each over 5 runs after 2 warm-ups.

Then packed rows on sdpa (`s2d_cli.attention.packed_attention`, torch's own flash-attention varlen
kernel, which runs only on CUDA): whether `kernel_agrees` accepts the kernel at the Qwen3-0.6B head shape,
and, on a random-init Qwen3-0.6B shape in bf16 with GRPO-update-like rows (64 sequences, 29-token
prompts, completions of 40..256 tokens), the token log-probs of one packed row against those of padded
rows (max |difference|) and the forward + backward time of each layout.

Then the speed switches of `s2d_cli.kernels` (`switches_check`): on a Qwen3-0.6B shape cut to 4 layers,
bf16, 4 x 512 tokens through the training path (`hidden_at` + `chunked_token_logprobs`, backward), each
path against the plain one (the default CUDA path: fused norms, no switch): activation checkpointing,
regional torch.compile (inductor), liger-kernel (RoPE, SwiGLU, RMSNorm) and liger + compile. It prints the
max |log-prob difference| and the relative L2 error of all gradients, next to the plain bf16 path's own
error against float32 (the size of bf16 rounding), and each path's forward + backward milliseconds.
`python bench/gpu_check.py switches` runs that part alone (on a CPU: float32, 2 layers, compile with
aot_eager, no liger: a smoke run of the script).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import s2d_cli.heads as L  # noqa: E402


def timed(fn, repeats: int = 5) -> tuple[float, object]:
    for _ in range(2):
        out = fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device, nothing to check")
        return 0
    torch.manual_seed(0)
    n, h, v = 8192, 1024, 151_936
    dev = torch.device("cuda")
    hidden = (torch.randn(n, h, device=dev) * 1.0).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=dev) * 0.05).to(torch.bfloat16).requires_grad_()
    t_hidden = torch.randn(n, h, device=dev).to(torch.bfloat16)
    t_weight = (torch.randn(v, h, device=dev) * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=dev)

    def logprobs():
        hidden.grad = weight.grad = None
        logp, _ = L.chunked_token_logprobs(hidden, weight, targets, chunk_size=1024)
        logp.sum().backward()
        return logp.detach(), hidden.grad.clone(), weight.grad.clone()

    def kl():
        hidden.grad = weight.grad = None
        kl_n = L.chunked_kl(hidden, weight, t_hidden, t_weight, direction="forward", chunk_size=1024)
        kl_n.sum().backward()
        return kl_n.detach(), hidden.grad.clone(), weight.grad.clone()

    flops = 4 * 2 * n * h * v     # forward, checkpoint recompute, two backward GEMMs
    print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, N={n} H={h} V={v} bf16\n")
    print("| function | path | ms (fwd+bwd) | head TFLOP/s | max abs diff of values | grad hidden rel err | grad head rel err |")
    print("|---|---|---|---|---|---|---|")
    for name, fn in (("chunked_token_logprobs", logprobs), ("chunked_kl forward", kl)):
        results = {}
        for fast in (False, True):
            L.HALF_MM_FP32_OUT = fast
            results[fast] = timed(fn)
        (t_slow, ref), (t_fast, got) = results[False], results[True]
        for fast, (t, out) in ((False, results[False]), (True, results[True])):
            diff = f"{float((out[0] - ref[0]).abs().max()):.2e}" if fast else "(reference)"
            e_h = f"{rel(out[1], ref[1]):.2e}" if fast else ""
            e_w = f"{rel(out[2], ref[2]):.2e}" if fast else ""
            label = "bf16 GEMM, fp32 out (new)" if fast else "upcast to fp32 (old)"
            print(f"| {name} | {label} | {t:.1f} | {flops * (1.5 if 'kl' in name else 1) / t / 1e9:.0f} | {diff} | {e_h} | {e_w} |")
        print(f"| {name} | speed-up | {t_slow / t_fast:.2f}x | | | | |")
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    L.HALF_MM_FP32_OUT = True
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    packed_check(dev)
    torch.cuda.empty_cache()
    switches_check(dev)
    return 0


def packed_check(dev: torch.device, layers: int = 28) -> None:
    import random

    from transformers import AutoModelForCausalLM, Qwen3Config

    from s2d_cli import attention
    from s2d_cli.trainer import Sequence, hidden_at, pack

    agrees = attention.kernel_agrees(str(dev), torch.bfloat16, 16, 8, 128)
    print(f"\npacked rows on sdpa: torch varlen kernel agrees with sdpa at 16/8 heads, head_dim 128: {agrees}")
    if not agrees:
        return
    cfg = Qwen3Config(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, intermediate_size=3072, vocab_size=151_936, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(dev)
    attention.enable(lm)                   # padded rows still take sdpa; packed rows the varlen kernel
    rng = random.Random(0)
    seqs = []
    for _ in range(8):
        prompt = [rng.randrange(3, 150_000) for _ in range(29)]
        seqs += [Sequence(prompt, [rng.randrange(3, 150_000) for _ in range(rng.randint(40, 256))]) for _ in range(8)]
    head = lm.get_output_embeddings().weight
    rows = {}
    for layout in ("padded", "packed"):
        (mb,) = pack(seqs, 1 << 30, layout=layout, device=dev, overhead_tokens=1 << 30)

        def step(mb=mb):
            lm.zero_grad(set_to_none=True)
            logp, _ = L.chunked_token_logprobs(hidden_at(lm, mb), head, mb.targets, chunk_size=4096)
            logp.sum().backward()
            return logp.detach()

        ms, logp = timed(step)
        rows[layout] = (ms, mb.input_ids.numel(), {id(s): logp[mb.seq_idx == i] for i, s in enumerate(mb.sequences)})
    diff = max(float((rows["packed"][2][id(s)] - rows["padded"][2][id(s)]).abs().max()) for s in seqs)
    real = sum(len(s) for s in seqs)
    print(f"Qwen3-0.6B shape, bf16, {len(seqs)} sequences, {real} real tokens; max |logp packed - padded| {diff:.2e}\n")
    print("| layout | tokens computed | ms (fwd+bwd) | real tokens / s |")
    print("|---|---|---|---|")
    for layout, (ms, tokens, _) in rows.items():
        print(f"| {layout} | {tokens} | {ms:.1f} | {real / ms * 1e3:,.0f} |")
    print(f"| packed / padded | | {rows['padded'][0] / rows['packed'][0]:.2f}x faster | |")


def switches_check(dev: torch.device, layers: int = 4, batch: int = 4, seq: int = 512) -> None:
    import copy
    import importlib.util
    import os
    import time

    from transformers import AutoModelForCausalLM, Qwen3Config

    from s2d_cli import kernels
    from s2d_cli.models import fuse_rms_norms
    from s2d_cli.trainer import Sequence, hidden_at, pack

    gpu = dev.type == "cuda"
    if not gpu:
        layers, batch, seq = 2, 2, 64
    shape = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151_936) if gpu else dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=4096)
    cfg = Qwen3Config(num_hidden_layers=layers, tie_word_embeddings=True, use_cache=False, **shape)
    torch.manual_seed(0)
    ref32 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(dev).train()
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g).tolist()
    (mb,) = pack([Sequence(r[:16], r[16:]) for r in rows], batch * seq, layout="padded", device=dev)
    w_M = torch.linspace(0.1, 1.0, len(mb.targets), device=dev)

    def run(lm):
        lm.zero_grad(set_to_none=True)
        logp, _ = L.chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets)
        (logp * w_M).sum().backward()
        return logp.detach().float(), {n: p.grad.float() for n, p in lm.named_parameters()}

    def timed_run(lm):
        out = run(lm)                                   # warm-up (compilation happens here)
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            out = run(lm)
        if gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 3 * 1e3, out

    def err(a, b):
        return float((a[0] - b[0]).abs().max()), rel(torch.cat([x.flatten() for x in a[1].values()]),
                                                     torch.cat([x.flatten() for x in b[1].values()]))

    want32 = run(ref32)
    dtype = torch.bfloat16 if gpu else torch.float32
    base = copy.deepcopy(ref32).to(dtype)
    if gpu:
        fuse_rms_norms(base)
    ms, plain = timed_run(base)
    results = [("plain (fused norms)", ms, err(plain, want32), None)]
    backend = "inductor" if gpu else "aot_eager"
    variants = [("checkpointing", {}, True), (f"compile ({backend})", {"S2D_COMPILE": backend}, False)]
    if gpu and importlib.util.find_spec("liger_kernel") is not None:
        # liger's RoPE replaces transformers' Qwen3 rotary function for the whole process: liger runs last
        variants += [("liger", {"S2D_LIGER": "1"}, False),
                     ("liger + compile", {"S2D_LIGER": "1", "S2D_COMPILE": backend}, False)]
    elif gpu:
        print("switches: liger-kernel not installed, its paths skipped")
    for name, env, ckpt in variants:
        os.environ.update(env)
        try:
            lm = copy.deepcopy(base)
            kernels.apply_liger(lm, dev)
            kernels.apply_training_switches(lm, dev, grad_checkpointing=ckpt)
            first = time.perf_counter()
            run(lm)                                     # the first call: compilation, if any
            first = time.perf_counter() - first
            ms, got = timed_run(lm)
            results.append((name, ms, err(got, plain), first))
        except Exception as e:                          # one failing path must not hide the others
            nan = float("nan")
            results.append((name, nan, (nan, nan), f"failed: {type(e).__name__}: {str(e)[:120]}"))
        finally:
            for k in env:
                os.environ.pop(k, None)
    print(f"\nspeed switches (s2d_cli.kernels), Qwen3-0.6B shape cut to {layers} layers, {str(dtype)[6:]}, "
          f"{batch} x {seq} tokens, training path forward + backward:\n")
    print("| path | ms (fwd+bwd) | max abs logp diff | grad rel err | against | first call s |")
    print("|---|---|---|---|---|---|")
    for name, ms, (d, e), first in results:
        against = "float32" if first is None else "plain"
        extra = "" if first is None else (first if isinstance(first, str) else f"{first:.1f}")
        print(f"| {name} | {ms:.1f} | {d:.2e} | {e:.2e} | {against} | {extra} |")


if __name__ == "__main__":
    if sys.argv[1:] == ["switches"]:
        switches_check(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        sys.exit(0)
    sys.exit(main())
