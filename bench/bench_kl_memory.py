"""Peak memory of the chunked full-vocabulary KL (`s2d_cli.losses.chunked_kl`) vs the naive computation.

    .venv/bin/python bench/bench_kl_memory.py --out bench/results/kl_memory.md
    .venv/bin/python bench/bench_kl_memory.py --device cuda --positions 16384      # on a GPU host

Both variants run forward + backward of the forward KL(p_teacher || p_student) over N positions and a
V-row lm head (defaults: Qwen3's V = 151,936, N = 4,096, hidden 1,024, float32), with gradients for
the student's hidden states and head. Each variant runs in a fresh subprocess so peaks do not mix:
on CPU the figure is the process's max RSS (`resource.getrusage`), on CUDA
`torch.cuda.max_memory_allocated`. "above inputs" subtracts what the process held once its inputs
were allocated (torch itself, the two heads and the hidden states), i.e. what the loss adds; it
includes the head's gradient (V x hidden), which both variants must hold; the chunked variant briefly
holds it twice (the accumulated gradient plus one chunk's contribution), so below some chunk_size its
peak stops falling. That floor is O(V x hidden); the naive peak grows with N.
This is a benchmark, not a test; it checks only that both variants give the same KL and gradient.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import emit, peak_bytes

GIB = 1024**3



def run_child(args: argparse.Namespace) -> dict:
    """One variant, in this process: build inputs, measure, run fwd+bwd, measure again."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from s2d_cli.losses import chunked_kl

    dev = torch.device(args.device)
    # Warm up on a tiny problem first: the first torch.utils.checkpoint call imports torch._dynamo
    # (~270 MB RSS, a one-off per process that any trainer pays anyway). Both variants do it, so it
    # lands in the baseline of both.
    tiny = torch.randn(4, 8, device=dev, requires_grad=True)
    chunked_kl(tiny, torch.randn(16, 8, device=dev), tiny.detach(), torch.randn(16, 8, device=dev),
               chunk_size=2).sum().backward()
    g = torch.Generator(device=dev).manual_seed(0)
    n, v, h = args.positions, args.vocab, args.hidden
    scale = 2.0 / h**0.5  # logits with std ~2, like a trained head's
    s_h = torch.randn(n, h, generator=g, device=dev).requires_grad_()
    s_w = (torch.randn(v, h, generator=g, device=dev) * scale).requires_grad_()
    t_h = torch.randn(n, h, generator=g, device=dev)
    t_w = torch.randn(v, h, generator=g, device=dev) * scale
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_bytes("cpu")

    start = time.perf_counter()
    if args.child == "naive":
        s_logp_NV = (s_h @ s_w.T).log_softmax(-1)
        with torch.no_grad():
            t_logp_NV = (t_h @ t_w.T).log_softmax(-1)
        kl_N = (t_logp_NV.exp() * (t_logp_NV - s_logp_NV)).sum(-1)
    else:
        kl_N = chunked_kl(s_h, s_w, t_h, t_w, direction="forward", chunk_size=args.chunk_size)
    kl_N.mean().backward()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_bytes(args.device)
    return {
        "variant": args.child, "chunk_size": args.chunk_size if args.child == "chunked" else None,
        "peak_bytes": peak, "base_bytes": base, "seconds": seconds,
        "kl_mean": kl_N.mean().item(), "grad_w_norm": s_w.grad.norm().item(),
        "grad_h_norm": s_h.grad.norm().item(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk-sizes", default="128,256,1024", help="comma-separated; one chunked run each")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    common = [f"--positions={args.positions}", f"--vocab={args.vocab}", f"--hidden={args.hidden}",
              f"--device={args.device}"]
    jobs = [["--child=naive"]] + [["--child=chunked", f"--chunk-size={c}"] for c in args.chunk_sizes.split(",")]
    results = []
    for job in jobs:
        print(f"running {' '.join(job)} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, *common, *job], capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            print(f"error: {' '.join(job)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    naive = results[0]
    for r in results[1:]:  # same numbers from both, or the comparison means nothing
        for key in ("kl_mean", "grad_w_norm", "grad_h_norm"):
            if abs(r[key] - naive[key]) > 1e-3 * max(abs(naive[key]), 1e-6):
                print(f"error: chunked {key} {r[key]} != naive {naive[key]}", file=sys.stderr)
                return 1

    what = "max RSS" if args.device == "cpu" else "max_memory_allocated"
    lines = [
        f"KL(p_t || p_s) forward+backward, N={args.positions:,} positions, V={args.vocab:,}, "
        f"hidden={args.hidden}, float32, {args.device} ({what}, one subprocess per variant).",
        "",
        "| variant | peak (GiB) | above inputs (GiB) | peak / naive | above inputs / naive | time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    naive_extra = naive["peak_bytes"] - naive["base_bytes"]
    for r in results:
        name = "naive [N, V] logits" if r["variant"] == "naive" else f"chunked_kl, chunk_size={r['chunk_size']}"
        extra = r["peak_bytes"] - r["base_bytes"]
        lines.append(f"| {name} | {r['peak_bytes'] / GIB:.2f} | {extra / GIB:.2f} | "
                     f"{r['peak_bytes'] / naive['peak_bytes']:.3f} | {extra / naive_extra:.3f} | {r['seconds']:.1f} |")
    lines += ["", f"One [N, V] float32 tensor is {args.positions * args.vocab * 4 / GIB:.2f} GiB; "
              f"KL mean {naive['kl_mean']:.5f} in both variants. Inputs (torch, two heads, hidden states) "
              f"hold {naive['base_bytes'] / GIB:.2f} GiB. The head's gradient is {args.vocab * args.hidden * 4 / GIB:.2f} "
              "GiB; chunked holds it twice while adding one chunk's contribution, a floor that does not "
              "shrink with chunk_size or grow with N."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
