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


if __name__ == "__main__":
    sys.exit(main())
