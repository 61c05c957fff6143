"""Fused RMSNorm (models.fuse_rms_norms) against transformers' own, on one forward + backward.

    python bench/gpu_norms.py            # Qwen3-0.6B shape, bf16, 64 x 180 tokens on a GPU; a 2-layer smoke run on a CPU

Prints, for each side, the median milliseconds of a training forward + backward (logits of the last
position only, so the vocabulary head is not what is timed), the kernels launched per step, peak memory,
and the largest difference of the final hidden states between the two.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from s2d_cli.models import fuse_rms_norms  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def main() -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    shape = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072) if GPU else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2, head_dim=16, intermediate_size=128)
    torch.manual_seed(0)
    with torch.device(DEV):
        ref = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=151_936, tie_word_embeddings=True, **shape),
                                               dtype=torch.bfloat16 if GPU else torch.float32)
    fused = copy.deepcopy(ref)
    n = fuse_rms_norms(fused)
    B, L = (64, 180) if GPU else (4, 32)
    ids = torch.randint(10, 150_000, (B, L), device=DEV, generator=torch.Generator(DEV).manual_seed(1))

    def step(model):
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state
        h.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        return h.detach()

    def sync():
        if GPU:
            torch.cuda.synchronize()

    out = {}
    for name, model in (("transformers", ref), ("fused", fused), ("transformers", ref), ("fused", fused)):
        model.train()
        step(model)
        if GPU:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            step(model)
            sync()
            times.append(1000 * (time.perf_counter() - t0))
        with torch.profiler.profile() as prof:
            h = step(model)
            sync()
        kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA") if GPU else 0
        peak = torch.cuda.max_memory_allocated() / 2**20 if GPU else 0
        out[name] = (statistics.median(times), kernels, peak, h)
    print(f"fwd+bwd of the trunk, {B} x {L} tokens, {n} norms fused, {torch.cuda.get_device_name() if GPU else 'cpu'}")
    for name, (ms, kernels, peak, _) in out.items():
        print(f"  {name:13s} {ms:8.2f} ms   {kernels:6d} kernels   peak {peak:8.0f} MiB")
    print(f"  speed-up {out['transformers'][0] / out['fused'][0]:.2f}x; final hidden states max |diff| "
          f"{(out['transformers'][3].float() - out['fused'][3].float()).abs().max().item():.3g} "
          f"(max |h| {out['transformers'][3].float().abs().max().item():.3g})")


if __name__ == "__main__":
    main()
