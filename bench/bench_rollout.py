"""Rollout throughput: the hf engine vs the vllm engine on the same tiny model and the same prompts.

    .venv/bin/python bench/bench_rollout.py                       # 64 prompts x n=4 x 32 tokens, tiny shape
    .venv/bin/python bench/bench_rollout.py --shapes tiny,small --threads 1 --out bench/results/rollout.md

Each backend runs in its own subprocess (so neither inherits the other's threads or memory), does one
warm-up call, then `--repeats` timed calls with a different seed each. Reported: completion tokens per
second (min / median / max over repeats) and vllm/hf of the medians. Sampling is temperature 1 with
per-token logprobs, as the trainers request it. Models are random-init, so completions run to the
token budget; vLLM's CPU attention needs head_dim >= 32, hence 2 heads at hidden 64.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {   # name -> build_tiny_model kwargs
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2),
}


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Compute {17 * i % 997} + {31 * i % 89}, then multiply by {i % 7 + 2}."
                                     + " Show each step." * (i % 4)}],
        add_generation_prompt=True, tokenize=False) for i in range(count)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def child(args) -> None:
    """Runs in the subprocess: one backend, warm-up + repeats; prints one JSON line."""
    import torch

    from s2d_cli.engines import SamplingConfig, make_engine

    prompts = json.loads(Path(args.prompts_file).read_text())
    start = time.perf_counter()
    engine = make_engine(args.child, args.model, dtype=args.dtype, seed=0)
    startup_s = time.perf_counter() - start
    sampling = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, logprobs=True)
    engine.generate(prompts[:4], sampling)                                  # warm-up
    rates = []
    for repeat in range(args.repeats):
        sampling.seed = repeat
        start = time.perf_counter()
        groups = engine.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        rates.append(sum(len(c.token_ids) for group in groups for c in group) / seconds)
    engine.close()
    print(json.dumps({"startup_s": startup_s, "tok_per_s": rates, "threads": torch.get_num_threads()}))


def run_backend(backend: str, model_dir: Path, prompts_file: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--model", str(model_dir),
           "--prompts-file", str(prompts_file), "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
           "--repeats", str(args.repeats), "--dtype", args.dtype]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{backend} child failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: fp32 on CPU, bf16 on GPU (both backends)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both children (1 keeps a shared, busy CPU host from "
                             "collapsing: 2 spin-waiting threads on 2 busy cores ran 20x slower here)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from s2d_cli.models import build_tiny_model, build_tokenizer, load_model, num_parameters

    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    backends = args.backends.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="s2d-bench-") as tmp:
        tokenizer = build_tokenizer()
        prompts = make_prompts(tokenizer, args.prompts)
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        for shape in args.shapes.split(","):
            model_dir = build_tiny_model(Path(tmp) / shape, arch="qwen3", tokenizer=tokenizer, seed=0,
                                         **SHAPES[shape])
            params = num_parameters(load_model(str(model_dir), device="cpu"))
            results = {}
            for backend in backends:
                print(f"[bench] {shape}: {backend} ...", file=sys.stderr, flush=True)
                results[backend] = run_backend(backend, model_dir, prompts_file, args)
            rows.append((shape, params, results))

    lines = [f"Rollout throughput, {args.prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens, "
             f"temperature 1, logprobs on, {args.dtype}, {device}, torch threads "
             f"{', '.join(sorted({str(r['threads']) for _, _, res in rows for r in res.values()}))}, "
             f"{args.repeats} repeats after a warm-up.",
             "",
             "| shape | params | backend | startup s | tok/s min | tok/s median | tok/s max | vllm/hf (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, params, results in rows:
        medians = {b: statistics.median(r["tok_per_s"]) for b, r in results.items()}
        ratio = f"{medians['vllm'] / medians['hf']:.2f}" if {"hf", "vllm"} <= medians.keys() else ""
        for backend, r in results.items():
            rates = r["tok_per_s"]
            lines.append(f"| {shape} | {params / 1e6:.2f}M | {backend} | {r['startup_s']:.1f} | {min(rates):,.0f} | "
                         f"{medians[backend]:,.0f} | {max(rates):,.0f} | {ratio if backend == 'vllm' else ''} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
