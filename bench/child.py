"""One measurement in one process: `python bench/child.py ROW SIDE SPEC_JSON` prints one JSON line.

bench/run.py starts this once per (row, side, repeat), so no side inherits the other's threads, caches
or memory high-water mark. Every child warms up (one untimed optimizer step, or one untimed call) and
then times `spec["steps"]` more; it reports completion tokens per second per timed step and the
process's peak memory: `ru_maxrss` on a CPU (the whole process: interpreter, torch, models, optimizer
state and the step's activations), `torch.cuda.max_memory_allocated` on a GPU.

Rows (see bench/run.py for the shapes):
  grpo    one GRPO step, transformers generation on both sides: s2d `grpo.run` (backend hf) vs TRL
          GRPOTrainer(use_vllm=False); same prompts, P x G, max new tokens, loss "grpo", beta 0, reward.
  update  the GRPO update alone on the same fixed rollouts: s2d `grpo.run(rollouts=...)` vs TRL
          `GRPOTrainer.compute_loss` on the same padded batch + backward + clip + AdamW step (what
          `Trainer.training_step` does once `_prepare_inputs` has produced the batch).
  opd     on-policy distillation: s2d `opd.run` vs TRL DistillationTrainer(beta=1, reverse KL).
  kl      forward-KL warmup on teacher sequences with full-vocabulary targets: s2d
          `kl_warmup.run(targets="full")` vs TRL GKDTrainer(lmbda=0, beta=0), vocabulary 151,936.
  verify  answer checking: s2d `Verifier(workers=N)` vs math-verify `parse` + `verify` one by one,
          both warmed up first: bench/bench_verify.py's records, warm-up and `run_pool` /
          `run_sequential` (one timed pass per process).
  rollout generation only: s2d's hf engine vs its vllm engine (bench/bench_rollout.py's child).

TRL with liger (side "liger", rows update, opd and kl, CUDA only: liger-kernel is Triton): the same
peer with `use_liger_kernel=True`, TRL 1.16's liger option. Its GRPOTrainer then applies liger's layer
kernels (RMSNorm, RoPE, SwiGLU) and keeps its own chunked log-prob head (it refuses liger's fused linear
cross-entropy, and TRL 1.16 has no liger GRPO loss left to turn on); DistillationTrainer and GKDTrainer
get transformers' default liger set (fused linear cross-entropy included, unused by their losses, which
read the logits). `Trainer.train` applies the kernels; the update row calls the same
`apply_liger_kernel` itself, since it drives `compute_loss` without `train()`.

s2d children skip `Trainer.finish` (the final checkpoint and model save): the timed steps never
include it, and on a GPU it would spend tens of seconds writing optimizer state.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# ----------------------------------------------------------------------------------------------
# shared helpers

def reward_s2d(completion: str, answer: str | None) -> float:
    """A cheap deterministic reward with variance inside a group (so advantages are not all zero)."""
    return float(len(completion) % 3 == 0)


def reward_trl(completions, **kwargs) -> list[float]:
    return [reward_s2d(c, None) for c in completions]


def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def peak_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # KiB on Linux


def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def num_params(path: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    seen, total = set(), 0
    for p in model.parameters():      # tied embeddings count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def result(tokens: list[float], seconds: list[float], cpu: list[float] | None = None, **extra) -> dict:
    """Per timed step: tokens, wall seconds, and (where known) CPU seconds of this process, all threads."""
    out = {"tokens": tokens, "seconds": seconds, "tok_per_s": [t / s for t, s in zip(tokens, seconds)],
           "peak_mb": peak_mb(), **S2D_LAYOUT, **extra}
    S2D_LAYOUT.clear()                  # one s2d run's, reported once
    if cpu and not on_gpu():
        out["cpu_s"] = cpu
        out["tok_per_cpu_s"] = [t / c for t, c in zip(tokens, cpu)]
    return out


CPU_MARKS: list[float] = []     # process CPU time at the end of each s2d step (Trainer.log runs once per step)
S2D_LAYOUT: dict = {}           # s2d's micro-batch layout, and the tokens its timed steps computed (padding included)


def s2d_steps(out: Path, tokens_of) -> tuple[list[float], list[float], list[float]]:
    """Timed steps (all but the first) from an s2d run's metrics.jsonl, and their CPU seconds."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    S2D_LAYOUT["tokens_computed"] = [m.get("tokens_computed") for m in rows[1:]]
    cpu = [b - a for a, b in zip(CPU_MARKS, CPU_MARKS[1:])]
    return [tokens_of(m) for m in rows[1:]], [m["step_time_s"] for m in rows[1:]], cpu


@contextlib.contextmanager
def s2d_quiet():
    """No final checkpoint (see the module docstring); s2d's progress bar and prints go to stderr; the
    CPU clock is read at the end of every step."""
    from s2d_cli import trainer as T

    T.Trainer.finish = lambda self, extra=None: self.out
    log = T.Trainer.log

    def log_and_mark(self, metrics):
        CPU_MARKS.append(time.process_time())
        S2D_LAYOUT["layout"] = self.layout
        log(self, metrics)

    T.Trainer.log = log_and_mark
    with contextlib.redirect_stdout(sys.stderr):
        yield


def trl_clock():
    """A TrainerCallback recording the wall time at the end of each optimizer step, and the logs."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.cpu, self.logs = None, [], [], []

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs or logs and any(k.startswith("completions/") for k in logs):
                self.logs.append(dict(logs))

        def step_seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:])]   # the first step is the warm-up

        def step_cpu(self) -> list[float]:
            return [b - a for a, b in zip(self.cpu, self.cpu[1:])]

    return Clock()


def trl_common(spec: dict, out: str) -> dict:
    gpu = on_gpu()
    return dict(output_dir=out, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                max_steps=spec["steps"] + 1, learning_rate=spec["lr"], gradient_accumulation_steps=1,
                bf16=gpu, use_cpu=not gpu, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
                gradient_checkpointing=False,      # TRL defaults to True; s2d to False: same FLOPs both sides
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                model_init_kwargs={"dtype": "bfloat16" if gpu else "float32"},
                **({"use_liger_kernel": True} if spec.get("trl_liger") else {}))


def tokenizer_of(spec: dict, side: str = "left"):
    from s2d_cli.models import load_tokenizer

    tok = load_tokenizer(spec["model"])
    tok.padding_side = side
    return tok


# ----------------------------------------------------------------------------------------------
# row 1: one GRPO step with generation

def grpo_s2d(spec: dict, tmp: Path) -> dict:
    from s2d_cli.grpo import GRPOConfig, run

    P, G = spec["prompts"], spec["group"]
    cfg = GRPOConfig(model=spec["model"], out=str(tmp / "s2d"), dataset=spec["dataset"], steps=spec["steps"] + 1,
                     group_size=G, prompts_per_step=P, loss="grpo", max_new_tokens=spec["max_new_tokens"],
                     lr=spec["lr"], reward="child:reward_s2d", backend="hf", batch_size=P * G, temperature=1.0,
                     micro_batch_tokens=spec["micro_batch_tokens"])
    cfg.validate()
    with s2d_quiet():
        run(cfg)
    tokens, seconds, cpu = s2d_steps(tmp / "s2d", lambda m: m["completion_len"] * P * G)
    return result(tokens, seconds, cpu, params=num_params(spec["model"]))


def grpo_trl(spec: dict, tmp: Path) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    P, G = spec["prompts"], spec["group"]
    args = GRPOConfig(**trl_common(spec, str(tmp / "trl")), per_device_train_batch_size=P * G, num_generations=G,
                      max_completion_length=spec["max_new_tokens"], loss_type="grpo", beta=0.0, temperature=1.0,
                      top_p=1.0, top_k=0, log_completions=False)
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    clock = trl_clock()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward_trl, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer_of(spec), callbacks=[clock])
    trainer.train()
    lengths = [log["completions/mean_length"] for log in clock.logs if "completions/mean_length" in log]
    return result([n * P * G for n in lengths[1:]], clock.step_seconds(), clock.step_cpu(),
                  params=num_params(spec["model"]))


# ----------------------------------------------------------------------------------------------
# row 2: the update alone on fixed rollouts

def update_s2d(spec: dict, tmp: Path) -> dict:
    from s2d_cli.grpo import GRPOConfig, run

    records = [json.loads(line) for line in Path(spec["rollouts"]).read_text().splitlines()]
    cfg = GRPOConfig(model=spec["model"], out=str(tmp / "s2d"), rollouts=spec["rollouts"], steps=spec["steps"] + 1,
                     group_size=spec["group"], prompts_per_step=spec["prompts"], loss="grpo",
                     max_new_tokens=spec["max_new_tokens"], lr=spec["lr"],
                     micro_batch_tokens=spec["micro_batch_tokens"])
    cfg.validate()
    with s2d_quiet():
        run(cfg)
    n_tok = sum(len(r["completion_ids"]) for r in records)
    tokens, seconds, cpu = s2d_steps(tmp / "s2d", lambda m: n_tok)
    return result(tokens, seconds, cpu, params=num_params(spec["model"]))


def trl_grpo_batch(records: list[dict], group: int, pad_id: int, device) -> dict:
    """The batch dict `GRPOTrainer._generate_and_score_completions` hands to `compute_loss`: left-padded
    prompts, right-padded completions, group-normalised advantages (TRL's: unbiased std, eps 1e-4)."""
    import torch

    pl = max(len(r["prompt_ids"]) for r in records)
    cl = max(len(r["completion_ids"]) for r in records)
    prompt_ids = torch.full((len(records), pl), pad_id)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.full((len(records), cl), pad_id)
    completion_mask = torch.zeros_like(completion_ids)
    for i, r in enumerate(records):
        p, c = r["prompt_ids"], r["completion_ids"]
        prompt_ids[i, pl - len(p):] = torch.tensor(p)
        prompt_mask[i, pl - len(p):] = 1
        completion_ids[i, :len(c)] = torch.tensor(c)
        completion_mask[i, :len(c)] = 1
    rewards_PG = torch.tensor([float(r["reward"]) for r in records]).view(-1, group)
    adv = ((rewards_PG - rewards_PG.mean(1, keepdim=True)) / (rewards_PG.std(1, keepdim=True) + 1e-4)).view(-1)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask, "advantages": adv, "num_items_in_batch": completion_mask.sum()}
    return {k: v.to(device) for k, v in batch.items()}


def update_trl(spec: dict, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    records = [json.loads(line) for line in Path(spec["rollouts"]).read_text().splitlines()]
    P, G = spec["prompts"], spec["group"]
    args = GRPOConfig(**trl_common(spec, str(tmp / "trl")), per_device_train_batch_size=P * G, num_generations=G,
                      max_completion_length=spec["max_new_tokens"], loss_type="grpo", beta=0.0)
    tok = tokenizer_of(spec)
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward_trl, args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * P), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1   # set by Trainer.train's loop, which we do not enter
    if args.use_liger_kernel:                         # what Trainer.train does first (liger side)
        import transformers.integrations.liger as hf_liger

        hf_liger.apply_liger_kernel(trainer.model, args.liger_kernel_config)
    model = trainer.model
    model.train()
    optimizer = trainer.create_optimizer()
    batch = trl_grpo_batch(records, G, tok.pad_token_id, trainer.accelerator.device)
    n_tok = float(batch["completion_mask"].sum())
    seconds, cpu = [], []
    for step in range(spec["steps"] + 1):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, batch)
        trainer.accelerator.backward(loss)
        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)
        sync()
        if step:
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    del torch
    return result([n_tok] * len(seconds), seconds, cpu, params=num_params(spec["model"]))


# ----------------------------------------------------------------------------------------------
# row 3: on-policy distillation

def opd_s2d(spec: dict, tmp: Path) -> dict:
    from s2d_cli import opd

    cfg = opd.OPDConfig(student=spec["model"], teacher=spec["teacher"], dataset=spec["dataset"], out=str(tmp / "s2d"),
                        steps=spec["steps"] + 1, lr=spec["lr"], max_new_tokens=spec["max_new_tokens"],
                        micro_batch_tokens=spec["micro_batch_tokens"], **spec["s2d_opd"])
    cfg.validate()
    with s2d_quiet():
        opd.run(cfg)
    n = spec["prompts"] * spec["group"]
    tokens, seconds, cpu = s2d_steps(tmp / "s2d", lambda m: m["completion_len"] * n)
    return result(tokens, seconds, cpu, params=num_params(spec["model"]))


def opd_trl(spec: dict, tmp: Path) -> dict:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    n = spec["prompts"] * spec["group"]
    common = trl_common(spec, str(tmp / "trl"))
    args = DistillationConfig(**common, teacher_model_init_kwargs=dict(common["model_init_kwargs"]),
                              per_device_train_batch_size=n, max_completion_length=spec["max_new_tokens"],
                              beta=1.0, temperature=1.0, top_p=1.0, top_k=0, log_completions=False,
                              **spec.get("trl_opd", {}))
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    clock = trl_clock()
    trainer = DistillationTrainer(model=spec["model"], teacher_model=spec["teacher"], args=args,
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                                  processing_class=tokenizer_of(spec), callbacks=[clock])
    trainer.train()
    lengths = [log["completions/mean_length"] for log in clock.logs if "completions/mean_length" in log]
    return result([x * n for x in lengths[1:]], clock.step_seconds(), clock.step_cpu(),
                  params=num_params(spec["model"]))


# ----------------------------------------------------------------------------------------------
# row 4: KL warmup, full-vocabulary targets

def kl_s2d(spec: dict, tmp: Path) -> dict:
    from s2d_cli.kl_warmup import KLWarmupConfig, run

    records = [json.loads(line) for line in Path(spec["sequences"]).read_text().splitlines()]
    cfg = KLWarmupConfig(student=spec["model"], teacher=spec["teacher"], rollouts=spec["sequences"],
                         out=str(tmp / "s2d"), targets="full", steps=spec["steps"] + 1, batch_size=len(records),
                         lr=spec["lr"], micro_batch_tokens=spec["micro_batch_tokens"])
    cfg.validate()
    with s2d_quiet():
        run(cfg)
    n_tok = sum(len(r["completion_ids"]) for r in records)
    tokens, seconds, cpu = s2d_steps(tmp / "s2d", lambda m: n_tok)
    return result(tokens, seconds, cpu, params=num_params(spec["model"]))


def kl_trl(spec: dict, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    records = [json.loads(line) for line in Path(spec["sequences"]).read_text().splitlines()]
    tok = tokenizer_of(spec, side="right")
    common = trl_common(spec, str(tmp / "trl"))
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    args = GKDConfig(**common, per_device_train_batch_size=len(records), lmbda=0.0, beta=0.0, temperature=1.0,
                     seq_kd=False, max_length=None)

    def collate(rows: list[dict]) -> dict:
        """Right-padded prompt + completion; labels -100 outside the completion (what GKD's ChatML
        collator produces from chat messages, built here from the same token ids s2d trains on)."""
        width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            full = r["prompt_ids"] + r["completion_ids"]
            ids[i, :len(full)] = torch.tensor(full)
            mask[i, :len(full)] = 1
            labels[i, len(r["prompt_ids"]):len(full)] = torch.tensor(r["completion_ids"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=dtype)
    clock = trl_clock()
    trainer = GKDTrainer(model=spec["model"], teacher_model=teacher, args=args, data_collator=collate,
                         train_dataset=Dataset.from_list(records), processing_class=tok, callbacks=[clock])
    trainer.train()
    n_tok = sum(len(r["completion_ids"]) for r in records)
    seconds = clock.step_seconds()
    return result([n_tok] * len(seconds), seconds, clock.step_cpu(), params=num_params(spec["model"]))


# ----------------------------------------------------------------------------------------------
# row 5: verification, a short call of 500 and of 5,000 items (bench/bench_verify.py's methods)

def verify_s2d(spec: dict, tmp: Path) -> dict:
    from bench_verify import run_short_call, short_call_records

    records = short_call_records(Path(spec["data"]), spec["items"])
    r = run_short_call(records, spec["workers"])
    return result([len(records)], [r["wall"]], [r["cpu"]], correct=r["correct"], workers=spec["workers"])


def verify_peer(spec: dict, tmp: Path) -> dict:
    from bench_verify import run_plain_loop, short_call_records

    records = short_call_records(Path(spec["data"]), spec["items"])
    r = run_plain_loop(records)
    return result([len(records)], [r["wall"]], [r["cpu"]], correct=r["correct"])


# ----------------------------------------------------------------------------------------------
# row 6: rollout throughput, hf vs vllm engine (bench/bench_rollout.py's child)

def rollout_backend(backend: str, spec: dict) -> dict:
    import argparse

    import bench_rollout

    args = argparse.Namespace(child=backend, model=spec["model"], prompts_file=spec["rollout_prompts"],
                              n=spec["n"], max_new_tokens=spec["max_new_tokens"], repeats=spec["steps"],
                              dtype="bf16" if on_gpu() else "fp32")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench_rollout.child(args)
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    rates = out["tok_per_s"]
    return {"tok_per_s": rates, "tokens": [], "seconds": [], "peak_mb": peak_mb(), "startup_s": out["startup_s"]}


ROWS = {
    "grpo": (grpo_s2d, grpo_trl),
    "update": (update_s2d, update_trl),
    "opd": (opd_s2d, opd_trl),
    "kl": (kl_s2d, kl_trl),
    "verify": (verify_s2d, verify_peer),
    "verify5k": (verify_s2d, verify_peer),
    "rollout": (lambda spec, tmp: rollout_backend("vllm", spec), lambda spec, tmp: rollout_backend("hf", spec)),
}


LIGER_ROWS = ("update", "opd", "kl")       # side "liger": the TRL peer of these rows with use_liger_kernel=True


def main() -> None:
    row, side, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    import tempfile

    import torch

    torch.manual_seed(0)
    if side == "liger":
        if row not in LIGER_ROWS:
            sys.exit(f"child.py: no TRL + liger peer for row {row} (rows {', '.join(LIGER_ROWS)})")
        spec = {**spec, "trl_liger": True}
    fn = ROWS[row][0 if side == "s2d" else 1]
    tmp = Path(tempfile.mkdtemp(prefix=f"s2d-bench-{row}-{side}-"))
    try:
        out = fn(spec, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.update(row=row, side=side, threads=torch.get_num_threads(),
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
