"""Token log-probs + entropy from the lm head (the GRPO update's head): s2d against TRL's functions.

    .venv/bin/python bench/bench_head.py --out bench/results/head.md
    .venv/bin/python bench/bench_head.py --loss topk --out bench/results/head_topk.md   # kl-warmup's top-K KL
    .venv/bin/python bench/bench_head.py --loss rtopk --k 64 --out bench/results/head_rtopk.md   # opd's
    python bench/bench_head.py --device cuda --positions 16384 --hidden 1024 --dtype bfloat16   # a GPU host

Both variants compute, for N positions with hidden states h and a V-row head W (default V = 151,936,
Qwen3's), the log-prob of each position's target token and the entropy of its distribution at
temperature 0.9, then backpropagate a weighted sum of the log-probs into h and W:

  s2d   `losses.chunked_token_logprobs(..., with_entropy=True)`: chunks of positions, one log-normaliser
        per position kept for backward (`heads._TokenLogprobHead`)
  trl   what TRL's GRPOTrainer does after its forward: the logits (`h @ W^T / T`, in the inputs' dtype) as
        [rows, N / rows, V] sequences, then `trl.trainer.utils.selective_log_softmax` and, under no_grad,
        `entropy_from_logits`

With `--loss topk`: kl-warmup's forward KL against the teacher's stored top-K log-probs plus a tail
bucket (`losses.forward_kl_topk`), against the same formula on the [N, V] logits under autograd. With
`--loss rtopk`: opd's reverse KL on the student's top-K ids plus a tail bucket, the teacher's head
applied to its own hidden states (`losses.reverse_kl_topk`), against the same formula on both models'
[N, V] logits under autograd.

Each variant runs in a fresh subprocess (peak memory does not mix), `--repeats` times after one warm-up
call; the table reports the median time and the peak: the process's max RSS on a CPU,
`torch.cuda.max_memory_allocated` on CUDA, and "above inputs", the peak minus what the process held
once its inputs were allocated. Both must give the same log-probs, entropies and gradients, or the
script fails. A benchmark, not a test.
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

from common import emit, peak_bytes

GIB = 1024**3
TEMPERATURE = 0.9
S2D_FUNCTION = {"logprobs": "chunked_token_logprobs", "topk": "forward_kl_topk", "rtopk": "reverse_kl_topk"}



def run_child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from s2d_cli.losses import chunked_token_logprobs

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    g = torch.Generator(device=dev).manual_seed(0)
    n, v, hd = args.positions, args.vocab, args.hidden
    h0 = torch.randn(n, hd, generator=g, device=dev).to(dtype)
    w0 = (torch.randn(v, hd, generator=g, device=dev) * (2.0 / hd**0.5)).to(dtype)   # logits with std ~2
    targets = torch.randint(0, v, (n,), generator=g, device=dev)
    coef = torch.rand(n, generator=g, device=dev)
    if args.loss == "topk":      # the teacher's stored top-K log-probs: K ids, K log-probs and a tail mass
        ids = torch.randint(0, v, (n, args.k), generator=g, device=dev)
        t_logp = (torch.randn(n, args.k + 1, generator=g, device=dev) * 3).log_softmax(-1)[:, :args.k]
    if args.loss == "rtopk":     # the teacher: its own hidden states and head
        t_h = torch.randn(n, hd, generator=g, device=dev).to(dtype)
        t_w = (torch.randn(v, hd, generator=g, device=dev) * (2.0 / hd**0.5)).to(dtype)

    if args.loss == "rtopk" and args.child == "naive":
        def step(h, w):
            s_all = ((h @ w.T).float() / TEMPERATURE).log_softmax(-1)
            with torch.no_grad():
                t_all = ((t_h @ t_w.T).float() / TEMPERATURE).log_softmax(-1)
                ids_k = s_all.topk(args.k, dim=-1).indices
                t_k = t_all.gather(-1, ids_k)
                del t_all
            s_k = s_all.gather(-1, ids_k)
            s_tail, t_tail = 1 - s_k.exp().sum(-1), 1 - t_k.exp().sum(-1)
            kl = (s_k.exp() * (s_k - t_k)).sum(-1) + s_tail * (s_tail.log() - t_tail.log())
            return kl, kl.detach()
    elif args.loss == "rtopk":
        from s2d_cli.losses import reverse_kl_topk

        def step(h, w):
            kl = reverse_kl_topk(h, w, t_h, t_w, k=args.k, chunk_size=args.chunk_size, temperature=TEMPERATURE)
            return kl, kl.detach()
    elif args.loss == "topk" and args.child == "naive":
        def step(h, w):
            s_logp = ((h @ w.T).float() / TEMPERATURE).log_softmax(-1).gather(-1, ids)
            p_t, p_t_tail = t_logp.exp(), 1 - t_logp.exp().sum(-1)
            kl = (p_t * (t_logp - s_logp)).sum(-1) + p_t_tail * (p_t_tail.log() - (1 - s_logp.exp().sum(-1)).log())
            return kl, kl.detach()
    elif args.loss == "topk":
        from s2d_cli.losses import forward_kl_topk

        def step(h, w):
            kl = forward_kl_topk(h, w, ids, t_logp, chunk_size=args.chunk_size, temperature=TEMPERATURE)
            return kl, kl.detach()
    elif args.child == "trl":
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        rows = args.rows if n % args.rows == 0 else 1

        def step(h, w):
            # [B, T, V] in the model's dtype, as TRL's lm head returns them (its bf16 log-softmax loops over B)
            logits = ((h @ w.T) / TEMPERATURE).view(rows, n // rows, v)
            logp = selective_log_softmax(logits, targets.view(rows, -1))
            with torch.no_grad():
                ent = entropy_from_logits(logits)
            return logp.reshape(-1), ent.reshape(-1)
    else:
        def step(h, w):
            return chunked_token_logprobs(h, w, targets, chunk_size=args.chunk_size, temperature=TEMPERATURE,
                                          with_entropy=True)

    def once():
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logp, ent = step(h, w)
        (logp * coef).sum().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, logp.detach(), ent, h.grad, w.grad

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_bytes("cpu")
    once()                                                   # warm-up (allocator, kernels)
    runs = [once() for _ in range(args.repeats)]
    _, logp, ent, gh, gw = runs[-1]
    return {
        "variant": args.child, "seconds": [r[0] for r in runs], "peak_bytes": peak_bytes(args.device),
        "base_bytes": base, "logp_sum": logp.double().sum().item(), "ent_mean": ent.double().mean().item(),
        "grad_h_norm": gh.double().norm().item(), "grad_w_norm": gw.double().norm().item(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--rows", type=int, default=64, help="TRL side: the positions as [rows, N / rows] sequences")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--loss", default="logprobs", choices=["logprobs", "topk", "rtopk"],
                   help="logprobs: token log-probs + entropy against TRL's; topk: kl-warmup's top-K forward KL, "
                        "rtopk: opd's top-K reverse KL, each against its formula on [N, V] logits under autograd")
    p.add_argument("--k", type=int, default=20, help="topk: teacher log-probs stored per position; rtopk: "
                                                     "the student's top-K ids")
    p.add_argument("--child", choices=["s2d", "trl", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    common = [f"--positions={args.positions}", f"--vocab={args.vocab}", f"--hidden={args.hidden}",
              f"--chunk-size={args.chunk_size}", f"--rows={args.rows}", f"--dtype={args.dtype}", f"--repeats={args.repeats}",
              f"--device={args.device}", f"--loss={args.loss}", f"--k={args.k}"]
    peer = "trl" if args.loss == "logprobs" else "naive"
    results = {}
    for variant in (peer, "s2d"):
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, *common, f"--child={variant}"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            print(f"error: {variant} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}", file=sys.stderr)
            return 1
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])

    trl, s2d = results[peer], results["s2d"]
    tol = 1e-3 if args.dtype == "float32" else 2e-2
    for key in ("logp_sum", "ent_mean", "grad_h_norm", "grad_w_norm"):
        if abs(s2d[key] - trl[key]) > tol * max(abs(trl[key]), 1e-6):
            print(f"error: s2d {key} {s2d[key]} != trl {trl[key]}", file=sys.stderr)
            return 1

    what = "max RSS" if args.device == "cpu" else "max_memory_allocated"
    med = {k: statistics.median(r["seconds"]) for k, r in results.items()}
    extra = {k: r["peak_bytes"] - r["base_bytes"] for k, r in results.items()}
    what_ran = {"logprobs": f"Token log-probs + entropy (T = {TEMPERATURE})",
                "topk": f"Forward KL against the teacher's top-{args.k} log-probs + tail bucket (T = {TEMPERATURE})",
                "rtopk": f"Reverse KL on the student's top-{args.k} ids + tail bucket, teacher head on its own "
                         f"hidden states (T = {TEMPERATURE})"}[args.loss]
    lines = [
        f"{what_ran}, forward + backward, N={args.positions:,} positions, "
        f"V={args.vocab:,}, hidden={args.hidden}, {args.dtype}, {args.device} ({what}; one subprocess per "
        f"variant; median of {args.repeats} after a warm-up).",
        "",
        "| variant | time (s) min / med / max | peak (GiB) | above inputs (GiB) |",
        "|---|---|---:|---:|",
    ]
    names = {"trl": f"TRL: [{args.rows}, N / {args.rows}, V] logits, selective_log_softmax, entropy_from_logits",
             "naive": "[N, V] logits, log_softmax, gather, tail = 1 - sum, under autograd",
             "s2d": f"s2d: {S2D_FUNCTION[args.loss]}, chunk_size={args.chunk_size}"}
    for k in (peer, "s2d"):
        r = results[k]
        lines.append(f"| {names[k]} | {min(r['seconds']):.2f} / {med[k]:.2f} / {max(r['seconds']):.2f} | "
                     f"{r['peak_bytes'] / GIB:.2f} | {extra[k] / GIB:.2f} |")
    same = "log-probs, entropies" if args.loss == "logprobs" else "KLs"
    lines += ["", f"s2d / {'TRL' if peer == 'trl' else 'naive'}: throughput {med[peer] / med['s2d']:.2f}x, memory "
              f"above inputs {extra['s2d'] / max(extra[peer], 1):.2f}. Same {same} and gradients (relative "
              f"tolerance {tol:g}); one [N, V] float32 tensor is {args.positions * args.vocab * 4 / GIB:.2f} GiB."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
