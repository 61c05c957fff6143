"""Where GPU time goes: decode-step timings of the hf engine's samplers, and a profile of one update step.

    python bench/gpu_probe.py decode                  # sampler timings + greedy agreement, Qwen3-0.6B shape
    python bench/gpu_probe.py check                   # float32: samplers vs generate and teacher forcing
    python bench/gpu_probe.py fixtures DIR [ROWS]     # the gpu profile's fixtures (default: update) -> DIR/spec.json
    python bench/gpu_probe.py row ROW s2d|trl DIR [k=v ...] [profile]   # 1 + 2 steps of one bench row (update,
                                                      # kl, opd, grpo); spec overrides k=v; overhead=N: the
                                                      # trainer's per-micro-batch overhead in tokens
    python bench/gpu_probe.py update s2d|trl DIR ...  # = row update s2d|trl DIR ...
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"          # off a GPU: a 2-layer smoke run of the same code


def qwen3_06b():
    from transformers import AutoModelForCausalLM, Qwen3Config

    shape = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072) if GPU else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2, head_dim=16, intermediate_size=128)
    cfg = Qwen3Config(vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device(DEV):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if GPU else torch.float32).eval()


def sync():
    if GPU:
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def decode() -> None:
    from s2d_cli.engines import SamplingConfig
    from s2d_cli.engines import decode as D
    from s2d_cli.engines.hf import HFEngine
    from s2d_cli.models import build_tokenizer

    model = qwen3_06b()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 150_000, (int(n),), generator=g).tolist() for n in torch.randint(60, 140, (8,), generator=g)]
    T, n = (256, 8) if GPU else (16, 2)
    print(f"decode: 8 prompts x n={n}, {T} new tokens, Qwen3-0.6B shape, {torch.cuda.get_device_name() if GPU else 'cpu'}")

    def s2d(static, graphs=True, greedy=False, T=T):
        D.CUDA_GRAPHS = graphs
        gen = torch.Generator(DEV).manual_seed(1)
        return D.sample(model, prompts, n=n, max_new_tokens=T, stop_ids=[151_935], pad_id=0,
                        temperature=0.0 if greedy else 1.0, logprobs=True, generator=gen, static=static)

    for name, kw in [("graph", dict(static=True)), ("graph (2nd call)", dict(static=True)),
                     ("static eager", dict(static=True, graphs=False)), ("fast eager", dict(static=False))]:
        if GPU:
            torch.cuda.reset_peak_memory_stats()
        dt, rows = timed(lambda kw=kw: s2d(**kw))
        toks = sum(len(r.token_ids) for r in rows)
        print(f"  s2d {name:18s} {dt:7.2f} s  {toks / dt:9.0f} tok/s  {1000 * dt / T:6.2f} ms/step  "
              f"peak {torch.cuda.max_memory_allocated() / 2**30 if GPU else 0:.1f} GiB")
    tok = build_tokenizer()
    eng = HFEngine(model, tokenizer=tok, decoder="generate", batch_size=8 * n)
    sc = SamplingConfig(n=n, max_new_tokens=T, temperature=1.0, logprobs=True, stop_token_ids=[151_935], seed=1)
    dt, groups = timed(lambda: eng.generate(prompts, sc))
    toks = sum(len(c.token_ids) for gr in groups for c in gr)
    print(f"  transformers generate   {dt:7.2f} s  {toks / dt:9.0f} tok/s  {1000 * dt / T:6.2f} ms/step")
    # greedy: the graph replays the eager static step's kernels, so the tokens must agree exactly
    T = min(T, 64)
    a, b = s2d(True, greedy=True, T=T), s2d(True, graphs=False, greedy=True, T=T)
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b))
    diff = max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x.logprobs, y.logprobs))
    print(f"  greedy graph vs static eager: {same}/{len(a)} rows equal, max |logprob diff| {diff:.2e}")
    c = s2d(False, greedy=True, T=T)
    agree = [next((i for i, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q), T) for x, y in zip(a, c)]
    print(f"  greedy graph vs fast eager (different attention shapes): first disagreement at step "
          f"min {min(agree)} / median {sorted(agree)[len(agree) // 2]} of {T}")


@torch.inference_mode()
def check() -> None:
    """float32 (no bf16 near-ties): greedy tokens of every sampler against transformers' generate, and
    sampled log-probs against a teacher-forced forward of the same tokens."""
    from s2d_cli.engines import SamplingConfig
    from s2d_cli.engines import decode as D
    from s2d_cli.engines.hf import HFEngine
    from s2d_cli.models import build_tokenizer

    model = qwen3_06b().float()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 150_000, (int(n),), generator=g).tolist() for n in torch.randint(20, 60, (8,), generator=g)]
    T, n = (32, 4) if GPU else (8, 2)
    ref = HFEngine(model, tokenizer=build_tokenizer(), decoder="generate").generate(
        prompts, SamplingConfig(n=1, max_new_tokens=T, temperature=0, stop_token_ids=[151_935]))
    ref = [gr[0].token_ids for gr in ref]
    print(f"check (float32, {T} tokens, 8 prompts, vs transformers generate):")
    for name, static, graphs in [("graph", True, True), ("static eager", True, False), ("fast eager", False, True)]:
        D.CUDA_GRAPHS = graphs
        rows = D.sample(model, prompts, n=1, max_new_tokens=T, stop_ids=[151_935], pad_id=0, temperature=0.0,
                        static=static)
        same = sum(r.token_ids == x for r, x in zip(rows, ref))
        rows = D.sample(model, prompts, n=n, max_new_tokens=T, stop_ids=[151_935], pad_id=0, temperature=1.0,
                        logprobs=True, generator=torch.Generator(DEV).manual_seed(3), static=static)
        err = 0.0
        for i, r in enumerate(rows):
            p = prompts[i // n]
            logits = model(torch.tensor([p + r.token_ids], device=DEV)).logits[0, len(p) - 1:-1].float()
            tf = logits.log_softmax(-1).gather(-1, torch.tensor(r.token_ids, device=DEV)[:, None])[:, 0]
            err = max(err, float((tf.cpu() - torch.tensor(r.logprobs)).abs().max()))
        print(f"  {name:13s} greedy rows equal to generate: {same}/8; sampled log-probs vs teacher-forced: "
              f"max |diff| {err:.2e}")
    D.CUDA_GRAPHS = True


def fixtures(root: str, rows: str = "update") -> None:
    import run

    specs = run.build_fixtures(run.PROFILES["gpu"], Path(root), rows.split(","), Path("/nonexistent"))
    (Path(root) / "spec.json").write_text(json.dumps(specs))


def one_row(row: str, side: str, root: str, overrides: list[str]) -> None:
    profiled = "profile" in overrides
    overrides = [x for x in overrides if x != "profile"]
    import child
    from torch.profiler import ProfilerActivity, profile

    spec = json.loads((Path(root) / "spec.json").read_text())[row]
    import s2d_cli.trainer as T

    for kv in overrides:
        k, v = kv.split("=")
        if k == "overhead":
            T.micro_batch_overhead_tokens = lambda lm, device, n=int(v): n
        else:
            spec[k] = int(v)
    spec["steps"] = 2
    tmp = Path(tempfile.mkdtemp())
    run = child.ROWS[row][0 if side == "s2d" else 1]
    if not profiled:
        out = run(spec, tmp)
        print(f"== {row} {side} {overrides}: layout {out.get('layout', '-')}, tokens computed "
              f"{out.get('tokens_computed', '-')}, step seconds {[round(x, 3) for x in out['seconds']]}, "
              f"tok/s {[round(x) for x in out['tok_per_s']]}, peak {out['peak_mb']:.0f} MiB")
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = run(spec, tmp)
    print(f"== {row} {side} {overrides} (profiled): layout {out.get('layout', '-')}, step seconds {[round(x, 3) for x in out['seconds']]}, "
          f"tok/s {[round(x) for x in out['tok_per_s']]}, peak {out['peak_mb']:.0f} MiB")
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "decode":
        decode()
    elif what == "check":
        check()
    elif what == "fixtures":
        fixtures(*sys.argv[2:4])
    elif what == "row":
        one_row(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        one_row("update", sys.argv[2], sys.argv[3], sys.argv[4:])
