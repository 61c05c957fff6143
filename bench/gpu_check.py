"""GPU check of the lm-head fast path in s2d_cli.losses: bf16 GEMM with float32 output vs the upcast GEMM.

    python bench/gpu_check.py          # run by bench/gpu.sh before the comparisons; needs CUDA

At the Qwen3-0.6B head shape (V = 151,936, H = 1,024, bf16) it runs `chunked_token_logprobs` (forward
+ backward) and `chunked_kl` (forward KL, forward + backward) twice: with `HALF_MM_FP32_OUT` on (the
default on a GPU) and off (hidden and head upcast to float32 inside each chunk, the code before the
change). It prints the differences (max |logp| difference; relative L2 error of the gradients) and the
median time of each over 5 runs after 2 warm-ups.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import s2d_cli.losses as L  # noqa: E402


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
