"""GPU-hours and memory per GPU of each stage of examples/qwen3 on 8 x H100 80GB: arithmetic, not a run.

    python examples/plan.py            # the Markdown table of examples/PLAN.md

Every number comes from the constants below: the stage configs (stages/*.yaml), the model shapes,
figures measured in bench/RESULTS-gpu.md, and assumptions, each named. Change one and rerun.

Time per step = rollout + update + weight sync (+ teacher scoring for opd), in series (colocated
mode: the engine sleeps while the update runs and the update waits for the rollouts).
- update: tokens x FLOPs per token / (GPUs x MFU x peak); 8N FLOPs a token with gradient
  checkpointing (forward, recomputed forward, backward 2x), 2N for a no-grad teacher prefill.
- rollout (vLLM decode, memory-bound): each step reads the weights once and the KV cache of every
  running sequence; the running sequences are as many as the KV budget holds (gpu_memory_utilization
  x 80 GB minus the weights); decode tokens/s = running / step time, times a long-tail factor.
- memory: bf16 weights + fp32 master + AdamW moments + bf16 grads = 16 bytes a parameter, split over
  the GPUs under FSDP, whole on each under DDP; checkpointed activations = micro-batch tokens x hidden
  x layers x 2 bytes, plus one layer's recompute (taken as the same again); the engine's share while
  it samples (it sleeps during the update: level 1 moves its weights to host memory).
"""
from __future__ import annotations

from dataclasses import dataclass

GPUS = 8
PEAK = 989e12            # H100 dense bf16 FLOP/s
HBM = 3.35e12            # H100 SXM HBM3 bytes/s
GPU_MEM = 80e9

# assumptions (see examples/PLAN.md for where each comes from)
MFU_UPDATE = 0.25        # training MFU at 1.7B-8B: bench row 2 measured 13.5 % on the 0.6B shape (26 % with
                         # liger kernels, ENVIRONMENT.md); prime-rl reports 35 % for Qwen3-4B
DECODE_EFF = 0.5         # share of HBM bandwidth a vLLM decode step reaches
TAIL = 1.5               # rollout wall time / its bulk: the longest completions decode with few neighbours
COMPLETION = 3000        # mean completion tokens of Qwen3 thinking traces on MATH (budget 8,192 / 4,096)
PROMPT = 150             # mean rendered prompt tokens
SYNC_S = 5.0             # gather + push of the new weights into the engines, a step (bf16 8B: 16 GB)


@dataclass
class Model:
    name: str
    params: float        # parameters (embeddings included)
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_bytes_per_token(self) -> int:         # K and V, every layer, bf16
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


QWEN3_8B = Model("Qwen3-8B", 8.2e9, 4096, 36, 8, 128)
QWEN3_17B = Model("Qwen3-1.7B", 2.03e9, 2048, 28, 8, 128)


def decode_tokens_per_s(m: Model, util: float, completion: int, prompt: int, tp: int = 1) -> float:
    """One engine over `tp` GPUs, per GPU: running sequences fill the KV budget; a step reads the weights
    and every running sequence's cache (mean context: the prompt plus half the completion)."""
    weights = 2 * m.params / tp
    kv_budget = util * GPU_MEM - weights
    context = prompt + completion / 2
    running = max(1.0, kv_budget / (context * m.kv_bytes_per_token / tp))
    step_s = (weights + running * context * m.kv_bytes_per_token / tp) / (HBM * DECODE_EFF)
    return running / step_s / tp


def training_memory(m: Model, fsdp: bool, micro_tokens: int) -> float:
    state = 16 * m.params / (GPUS if fsdp else 1)
    activations = 2 * micro_tokens * m.hidden * m.layers * 2
    return state + activations


def stage(name: str, m: Model, *, steps: int, sequences: int, fsdp: bool, util: float, sample: bool,
          teacher: Model | None = None, teacher_fsdp: bool = False, completion: int = COMPLETION) -> dict:
    tokens = sequences * (PROMPT + completion)                       # trained tokens a step
    update_s = tokens * 8 * m.params / (GPUS * MFU_UPDATE * PEAK)
    rollout_s = sync_s = score_s = 0.0
    if sample:
        rate = decode_tokens_per_s(m, util, completion, PROMPT)
        rollout_s = TAIL * sequences * completion / (GPUS * rate)
        sync_s = SYNC_S * m.params / QWEN3_8B.params
    if teacher is not None:
        score_s = tokens * 2 * teacher.params / (GPUS * MFU_UPDATE * PEAK)
    step_s = rollout_s + update_s + sync_s + score_s
    train_mem = training_memory(m, fsdp, 16384)
    teacher_mem = 0.0 if teacher is None else 2 * teacher.params / (GPUS if teacher_fsdp else 1)
    resident = 16 * m.params / (GPUS if fsdp else 1) + teacher_mem
    peak = max(train_mem + teacher_mem, resident + (util * GPU_MEM if sample else 0.0))
    return {"stage": name, "model": m.name, "steps": steps, "step_s": step_s, "rollout_s": rollout_s,
            "update_s": update_s + score_s, "gpu_hours": steps * step_s * GPUS / 3600,
            "tok_s_gpu": tokens / step_s / GPUS, "mfu": tokens * 6 * m.params / step_s / (GPUS * PEAK),
            "mem_gb": peak / 1e9}


def plan() -> list[dict]:
    return [
        stage("1 teacher-grpo", QWEN3_8B, steps=300, sequences=256, fsdp=True, util=0.5, sample=True),
        stage("2a student-kl (topk)", QWEN3_17B, steps=400, sequences=64, fsdp=False, util=0.0, sample=False),
        stage("2b student-opd", QWEN3_17B, steps=150, sequences=256, fsdp=False, util=0.3, sample=True,
              teacher=QWEN3_8B, completion=2000),
        stage("3 student-grpo", QWEN3_17B, steps=300, sequences=256, fsdp=False, util=0.4, sample=True),
    ]


def main() -> None:
    rows = plan()
    print("| stage | model | steps | s/step (rollout + update) | GPU-hours | trained tok/s/GPU | end-to-end MFU "
          "| peak GB/GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['model']} | {r['steps']} | {r['step_s']:.0f} ({r['rollout_s']:.0f} + "
              f"{r['update_s']:.0f}) | {r['gpu_hours']:.0f} | {r['tok_s_gpu']:,.0f} | {100 * r['mfu']:.0f} % "
              f"| {r['mem_gb']:.0f} |")
    print(f"| total | | | | {sum(r['gpu_hours'] for r in rows):.0f} | | | |")


if __name__ == "__main__":
    main()
