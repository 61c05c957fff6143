"""s2d grpo — sparse sequence-level RL: sample a group per prompt, verify, clipped policy gradient.

    s2d grpo --model Qwen/Qwen3-8B --dataset math_train.jsonl --max-labels 2000 --out runs/teacher-grpo \\
             --config stages/1-teacher-grpo.yaml
    s2d grpo --model runs/toy/student --dataset toy:split=train --steps 40 --group-size 8 \\
             --prompts-per-step 8 --max-new-tokens 48 --lr 1e-5 --out runs/toy/student-grpo
    s2d grpo --model M --rollouts runs/verified --steps 1 --out runs/update   # update from existing rollouts

Each step takes P prompts (--prompts-per-step) x G completions (--group-size) from the current policy
through the rollout engine (hf: the live model itself; vllm: a running engine that receives the new
weights after every update), scores them with the verifier of `s2d verify` (or --reward mod:fn), and
turns rewards into group advantages. Loss variants (--loss):
  grpo     std-normalised advantages, token mean per sequence, mean over sequences
  dr_grpo  no std division, sum over tokens / (B x max_new_tokens)
  dapo     token mean over the batch, clip 0.2/0.28, groups with zero reward variance dropped
  gspo     one importance ratio per sequence (geometric mean), clip 3e-4/4e-4
PPO clipping over --update-epochs (mu) passes; truncated importance sampling when the engine's
log-probs differ from the trainer's (vllm). KL to a frozen reference only when --beta > 0 (no
reference model is loaded otherwise; with --lora-rank the reference is the frozen base itself,
its adapters switched off), inside each variant's own normaliser (as DeepSeekMath and TRL);
--kl-estimator says how it is trained. k1 and k3 both estimate KL(policy || ref) as values; the
gradients differ (exact expectations on-policy, tests/test_losses.py):
  k3     beta * k3 in each token's loss (DeepSeekMath's GRPO): follows grad KL(ref || policy)
  k3_is  beta * k3 * ratio, the ratio differentiable (DeepSeek-V3.2; TRL 1.16's default):
         follows grad KL(policy || ref)
  k1     -beta * (logp - ref_logp) per token in the advantage, detached (the KL in the reward):
         follows grad KL(policy || ref); k1 as a loss term would have zero expected gradient

The scarce-label setting: --max-labels N caps the distinct labelled prompts ever used; the manifest
records `labels_used`. Every step's rollouts, with rewards, are kept in out/rollouts (an artifact).
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass

import torch
import typer

from . import cliutil as cu
from . import losses as L
from .artifacts import ArtifactWriter, read_records
from .compat import token_ids
from .config import require_run_dir, resolve
from .data import Example
from .engines import sample_seed
from .errors import UsageError
from .grading import GradingFields
from .lora import LoraRankOpt, adapter_off, engine_weights
from .rollout import (
    PromptFields,
    SamplingFields,
    check_sampling,
    completion_records,
    encode_examples,
    load_fitting_prompts,
    sampling_config,
)
from .trainer import VOLATILE, Batch, Sequence, Trainer, TrainFields

CLIP_DEFAULTS = {"grpo": (0.2, 0.2), "dr_grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}
# which KL each estimator's gradient follows on-policy (values: k3 and k1 both estimate KL(policy || ref))
KL_ESTIMATORS = {
    "k3": "loss term beta*k3 (DeepSeekMath); gradient follows KL(ref || policy)",
    "k3_is": "loss term beta*k3*ratio (DeepSeek-V3.2, TRL's default); gradient follows KL(policy || ref)",
    "k1": "reward -beta*(logp - ref_logp) per token, detached; gradient follows KL(policy || ref)",
}


@dataclass
class GRPOConfig(PromptFields, SamplingFields, TrainFields, GradingFields):
    model: str = ""                  # policy to train (checkpoint directory or hub id)
    out: str = ""                    # run directory
    rollouts: str | None = None      # train on existing verified rollouts instead of sampling
    group_size: int = 8              # G completions per prompt
    prompts_per_step: int = 8        # P prompts per step (global, across processes)
    loss: str = "grpo"               # grpo | dr_grpo | dapo | gspo
    clip_low: float | None = None    # default per loss: grpo/dr_grpo 0.2, dapo 0.2, gspo 3e-4
    clip_high: float | None = None   # default per loss: grpo/dr_grpo 0.2, dapo 0.28, gspo 4e-4
    update_epochs: int = 1           # mu: PPO passes over each batch
    beta: float = 0.0                # KL-to-reference coefficient (0: no reference model loaded)
    kl_estimator: str = "k3"         # k3 | k3_is | k1: how the KL to the reference is trained (see KL_ESTIMATORS)
    is_cap: float = 2.0              # truncated importance-sampling cap for engine/trainer mismatch (0: off)
    mask_truncated: bool = False     # drop completions that hit max_new_tokens from the loss
    overlong_buffer: int = 0         # DAPO soft overlong penalty over the last N tokens of the budget (0: off)
    max_labels: int | None = None    # cap on distinct labelled prompts used (the scarce-label budget)
    reward: str = "math"             # math (the verifier) | module:function
    workers: int | None = None       # verifier processes (None or 0: one per CPU)
    timeout: float = 5.0             # verifier seconds per item
    temperature: float = 1.0
    max_new_tokens: int = 1024
    lr: float = 1e-6
    # colocated vllm (--backend vllm, or auto on a GPU host with vLLM): the engine shares each GPU with
    # training, so it takes a share of the memory, and sleeps (vLLM's sleep mode, GPU only) while the
    # update runs: 1 frees the KV cache and parks the weights in host memory, 2 drops the weights too
    # (every update resends them anyway), 0 keeps both
    gpu_memory_utilization: float = 0.3
    vllm_sleep_level: int = 1
    # --backend server: an `s2d rollout-server` on GPUs of its own samples; seconds per request / weight push;
    # how weights reach it: auto (nccl when trainer and server are both on CUDA, else gloo), gloo or nccl
    rollout_server: str = ""
    rollout_timeout: float = 600.0
    weight_backend: str = "auto"

    def validate(self) -> None:
        if not self.model:
            raise UsageError("missing required option --model")
        require_run_dir(self.out)
        if not self.dataset and not self.rollouts:
            raise UsageError("missing required option --dataset (or --rollouts DIR)")
        if self.group_size < 2:
            raise UsageError(f"--group-size: expected >= 2 (advantages compare samples within a group), "
                             f"got {self.group_size}")
        if self.prompts_per_step < 1:
            raise UsageError(f"--prompts-per-step: expected >= 1, got {self.prompts_per_step}")
        if self.loss not in CLIP_DEFAULTS:
            raise UsageError(f"--loss: expected one of {', '.join(CLIP_DEFAULTS)}, got {self.loss!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise UsageError(f"--kl-estimator: expected one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.max_labels is not None and self.max_labels < 1:
            raise UsageError(f"--max-labels: expected >= 1, got {self.max_labels}")
        if self.update_epochs < 1:
            raise UsageError(f"update_epochs: expected >= 1, got {self.update_epochs}")
        if self.vllm_sleep_level not in (0, 1, 2):
            raise UsageError(f"vllm_sleep_level: expected 0, 1 or 2, got {self.vllm_sleep_level}")
        check_sampling(self)
        from .verifier import check_pool_options
        check_pool_options(self.workers, self.timeout)   # before the run directory exists
        self.grading_rules()
        self.check_training()
        lo, hi = CLIP_DEFAULTS[self.loss]
        self.clip_low = lo if self.clip_low is None else self.clip_low
        self.clip_high = hi if self.clip_high is None else self.clip_high


# ----------------------------------------------------------------------------------------------
# small pure helpers

def prompt_schedule(num_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of `step`: epochs of seeded permutations, read in order."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, num_prompts)
        out.append(_epoch_order(num_prompts, seed, epoch)[pos])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(num_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    """One epoch's permutation, shuffled once (not once per prompt of every step: 8 shuffles of a
    7,500-prompt set cost a tiny model's step some 4 ms)."""
    perm = list(range(num_prompts))
    random.Random(seed * 7919 + epoch).shuffle(perm)
    return tuple(perm)


def labels_used(num_prompts: int, per_step: int, steps: int) -> int:
    return min(num_prompts, per_step * steps)


def overlong_penalty(length: int, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 until max - buffer, then linearly down to -1 at max."""
    if buffer <= 0 or length <= max_new_tokens - buffer:
        return 0.0
    return max(-1.0, (max_new_tokens - buffer - length) / buffer)


def policy_loss(cfg: GRPOConfig, logp_BT, old_BT, adv_B, mask_BT, is_BT, n_seq: float, n_tok: float,
                ref_BT=None):
    """The variant's surrogate with global normalisers (so micro-batches and processes add up), and,
    given the reference's log-probs `ref_BT` (beta > 0), the KL to the reference: k3 / k3_is as a term
    of each token's loss under the variant's own normaliser, k1 as a per-token reward in the advantage
    (`losses.kl_term`, `losses.kl_reward_advantages`). Metric `kl_ref` is the token mean of k3, an
    unbiased estimate of KL(policy || reference) per token, whichever estimator trains."""
    kw = {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high, "is_weight_BT": is_BT}
    adv, kl_ref = adv_B, None
    if ref_BT is not None:
        if cfg.kl_estimator == "k1":
            adv = L.kl_reward_advantages(adv_B, old_BT, ref_BT, mask_BT, beta=cfg.beta)
        else:
            kw["kl_term_BT"] = L.kl_term(logp_BT, old_BT, ref_BT, mask_BT, beta=cfg.beta, estimator=cfg.kl_estimator)
        kl_ref = L.masked_mean(L.kl_penalty(logp_BT.detach(), ref_BT, mask_BT, estimator="k3"), mask_BT)
    if cfg.loss == "grpo":
        loss, m = L.grpo_loss(logp_BT, old_BT, adv, mask_BT, num_sequences=n_seq, **kw)
    elif cfg.loss == "dr_grpo":
        loss, m = L.dr_grpo_loss(logp_BT, old_BT, adv, mask_BT, max_len=cfg.max_new_tokens, num_sequences=n_seq, **kw)
    elif cfg.loss == "dapo":
        loss, m = L.dapo_loss(logp_BT, old_BT, adv, mask_BT, num_tokens=n_tok, **kw)
    else:
        loss, m = L.gspo_loss(logp_BT, old_BT, adv, mask_BT, num_sequences=n_seq, **kw)
    if kl_ref is not None:
        m["kl_ref"] = kl_ref
    return loss, m


def group_sequences(records: list[dict], rewards: list[float], group_size: int, cfg: GRPOConfig,
                    rollout_logps: list[list[float] | None]) -> tuple[list[Sequence], dict[str, float]]:
    """Records (P x G, grouped) -> training sequences with advantages; plus batch statistics."""
    rewards_PG = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    scale = "none" if cfg.loss == "dr_grpo" else "std"
    adv_PG = L.group_advantages(rewards_PG, scale=scale)
    zero_var_P = L.zero_variance_groups(rewards_PG)
    seqs = []
    for i, rec in enumerate(records):
        p = i // group_size
        weight = 1.0
        if cfg.loss == "dapo" and bool(zero_var_P[p]):
            weight = 0.0
        if cfg.mask_truncated and rec.get("finish_reason") == "length":
            weight = 0.0
        s = Sequence(list(rec["prompt_ids"]), list(rec["completion_ids"]),
                     scalars={"adv": float(adv_PG.view(-1)[i]), "weight": weight})
        lp = rollout_logps[i]
        if lp is not None and len(lp) == len(rec["completion_ids"]):
            s.token_data["rollout_logp"] = torch.tensor(lp, dtype=torch.float32)
        if s.completion_ids:
            seqs.append(s)
    stats = {"zero_var_frac": float(zero_var_P.double().mean())}
    return seqs, stats


def check_stored(records: list[dict], source: str, vocab: int) -> None:
    """`--rollouts` records, before any training on them: non-empty prompts, token ids the model has,
    finite numeric rewards."""
    name = "<stdin>" if source == "-" else source
    for i, rec in enumerate(records):
        where = f"{name}: record {i + 1}"
        token_ids(rec["prompt_ids"], where, "prompt_ids", vocab=vocab, nonempty=True)
        token_ids(rec["completion_ids"], where, "completion_ids", vocab=vocab)
        r = rec["reward"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise UsageError(f"{where}: field 'reward': expected a finite number, got {r!r}")


def function_reward(reward_fn, spec: str, rec: dict) -> float:
    """`--reward module:function` on one record: a finite number (an int, a bool, a numpy or 0-d torch
    number count), else an error naming the record. A NaN reward would make its group's advantages,
    then every weight, NaN; an inf one, the same after the group's mean."""
    r = reward_fn(rec["completion"], rec["answer"])
    where = f"--reward {spec}: prompt {rec['id']!r} sample {rec['sample']}"
    try:
        x = float(r) if not isinstance(r, (str, bytes)) else None
    except (TypeError, ValueError, RuntimeError):   # None, a list, a tensor of several numbers
        x = None
    if x is None:
        raise UsageError(f"{where}: returned {type(r).__name__} {r!r:.60}; expected a finite number")
    if not math.isfinite(x):
        raise UsageError(f"{where}: returned {x}; expected a finite number")
    return x


# ----------------------------------------------------------------------------------------------

def run(cfg: GRPOConfig):
    from .models import load_model
    from .rewards import load_reward_fn

    reward_fn = load_reward_fn(cfg.reward)
    vllm = cfg.rollouts is None and use_vllm(cfg.backend)
    examples: list[Example] = []
    skipped = 0                                          # prompts left out by long_prompts=skip
    if cfg.rollouts is None:
        examples, skipped = load_fitting_prompts(cfg, cfg.model, require_answer=reward_fn is None)
        if cfg.max_labels is not None:
            rng = random.Random(cfg.seed)
            order = list(range(len(examples)))
            rng.shuffle(order)
            examples = [examples[i] for i in sorted(order[:cfg.max_labels])]
        used = labels_used(len(examples), cfg.prompts_per_step, cfg.steps)
    else:
        stored = read_records(cfg.rollouts, required=("id", "prompt_ids", "completion_ids", "reward"))
        groups: dict[str, list[dict]] = {}
        for r in stored:
            groups.setdefault(str(r["id"]), []).append(r)
        bad = [k for k, g in groups.items() if len(g) != cfg.group_size]
        if bad:
            raise UsageError(f"{cfg.rollouts}: prompt {bad[0]!r} has {len(groups[bad[0]])} samples, "
                             f"expected --group-size {cfg.group_size}")
        stored_groups = list(groups.values())
        # the stored rewards are the sparse signal (verified against labels): count the prompts read
        used = labels_used(len(stored_groups), cfg.prompts_per_step, cfg.steps)
    trainer = Trainer(cfg, model=cfg.model, out=cfg.out, kind="grpo", config=asdict(cfg),
                      inputs=[cfg.rollouts or cfg.dataset])
    if trainer.complete:
        print(cfg.out)
        return
    if cfg.prompts_per_step % trainer.world:
        raise UsageError(f"--prompts-per-step {cfg.prompts_per_step} must divide evenly over {trainer.world} processes")
    lm, tok = trainer.lm, trainer.tokenizer
    if cfg.rollouts is not None:
        check_stored(stored, cfg.rollouts, lm.get_input_embeddings().weight.shape[0])
    ref = None
    if cfg.beta > 0 and trainer.peft is not None:
        ref = lm           # LoRA: the base is the reference, scored with the adapters off (lora.adapter_off)
    elif cfg.beta > 0:
        ref = load_model(cfg.model, dtype=trainer.frozen_dtype, device=trainer.device,
                         trust_remote_code=cfg.trust_remote_code,
                         attn_implementation=cfg.attn_implementation).requires_grad_(False)
        trainer.adopt(ref, "reference model")
    engine = None
    if cfg.rollouts is None:
        if vllm:
            engine = colocated_engine(cfg, cfg.model, trainer)
        else:
            from .engines.hf import HFEngine
            engine = HFEngine(lm, tokenizer=tok, seed=cfg.seed, batch_size=cfg.batch_size,
                              lockstep=trainer.sharded)
    verifier = None
    if cfg.rollouts is None and reward_fn is None:
        from .verifier import Verifier
        verifier = Verifier(workers=cfg.workers, timeout=cfg.timeout, rules=cfg.grading_rules())
    # the trainer has claimed the run directory for this config, --force included: that reaches out/rollouts
    writer = ArtifactWriter(trainer.out / "rollouts", kind="grpo-rollouts", config=asdict(cfg), volatile=VOLATILE,
                            num_shards=cfg.steps, force=bool(cfg.force), nested=True) \
        if (trainer.acc.is_main_process and cfg.rollouts is None) else None
    local_p = cfg.prompts_per_step // trainer.world
    encoded: dict = {}                                   # problem -> (rendered text, ids), once per run

    def make_batch(step: int) -> Batch:
        if cfg.rollouts is not None:
            k = len(stored_groups)
            picks = [stored_groups[(step * cfg.prompts_per_step + j) % k] for j in range(cfg.prompts_per_step)]
            mine = picks[trainer.rank * local_p:(trainer.rank + 1) * local_p]
            records = [r for g in mine for r in g]
            rewards = [float(r["reward"]) for r in records]
            lps = [r.get("logprobs") for r in records]
        else:
            idx = prompt_schedule(len(examples), cfg.prompts_per_step, step, cfg.seed)
            first = trainer.rank * local_p
            mine = [examples[i] for i in idx[first:first + local_p]]
            texts, ids = encode_examples(tok, mine, cfg, encoded)
            sampling = sampling_config(cfg, seed=cfg.seed, logprobs=True, n=cfg.group_size)
            # seeds by (run seed, step, prompt), not by process: N processes sample what one does
            sampling.prompt_seeds = [sample_seed(cfg.seed, step, first + k) for k in range(local_p)]
            groups = engine.generate(ids, sampling)
            if engine.name == "vllm":
                engine.sleep()               # the KV cache (and weights) leave the GPU while training runs
            records = completion_records(mine, texts, groups, cfg.model, logprobs=True, prompt_ids=ids)
            if reward_fn is not None:
                rewards = [function_reward(reward_fn, cfg.reward, r) for r in records]
                for r, x in zip(records, rewards):
                    r["reward"], r["correct"] = x, x > 0
            else:
                verdicts = verifier.verify([(r["completion"], r["answer"]) for r in records])
                for r, v in zip(records, verdicts):
                    r.update(asdict(v))
                rewards = [v.reward for v in verdicts]
            for r in records:
                r["step"] = step + 1
                pen = overlong_penalty(len(r["completion_ids"]), cfg.max_new_tokens, cfg.overlong_buffer)
                if pen:
                    r["overlong_penalty"] = pen
            rewards = [x + r.get("overlong_penalty", 0.0) for x, r in zip(rewards, records)]
            lps = [r.get("logprobs") for r in records]
        seqs, stats = group_sequences(records, rewards, cfg.group_size, cfg, lps)
        n = len(records)
        sums = trainer.all_sum([n, sum(rewards), sum(x * x for x in rewards),
                                sum(bool(r.get("correct")) for r in records),
                                sum(len(r["completion_ids"]) for r in records),
                                sum(r.get("finish_reason") == "length" for r in records),
                                stats["zero_var_frac"] * local_p])
        total = max(sums[0], 1)
        mean = sums[1] / total
        metrics = {"reward_mean": mean, "reward_std": math.sqrt(max(sums[2] / total - mean * mean, 0.0)),
                   "accuracy": sums[3] / total, "completion_len": sums[4] / total,
                   "truncation_rate": sums[5] / total, "zero_var_frac": sums[6] / cfg.prompts_per_step}
        for r in records:
            r.pop("logprobs", None)
        return Batch(seqs, metrics, records)

    def on_batch(step: int, batch: Batch) -> None:
        if cfg.rollouts is not None:
            return
        # every process's records, in prompt order (rank r holds prompts [r P/N, (r+1) P/N)): the
        # artifact of an N-process run is the 1-process one
        records = trainer.gather_to_main(batch.records)
        if writer is not None and not writer.done(step):
            writer.write_shard(step, records)

    def loss_fn(policy, mb, info):
        logp_M, ent_M = trainer.token_logprobs(policy, mb, with_entropy=True)
        mask_BT = mb.mask_BT() & (mb.scalars["weight"][:, None] > 0)
        logp_BT = mb.to_BT(logp_M)
        old_BT = mb.to_BT(mb.token_data["old_logp"]) if "old_logp" in mb.token_data else logp_BT.detach()
        is_BT, mism = None, {}
        if "rollout_logp" in mb.token_data:
            roll_BT = mb.to_BT(mb.token_data["rollout_logp"])
            if cfg.is_cap > 0 and engine is not None and engine.name == "vllm":
                is_BT = L.truncated_is_weights(old_BT, roll_BT, mask_BT, cap=cfg.is_cap)
            mism = {"mismatch_kl": L.masked_mean(L.kl_penalty(old_BT, roll_BT, mask_BT, estimator="k3"),
                                                 mask_BT).detach()}
        n_seq, n_tok = info.num_sequences / info.world_size, info.num_tokens / info.world_size
        ref_BT = None
        if ref is not None:
            with torch.no_grad(), adapter_off(ref):
                ref_BT = mb.to_BT(trainer_ref_logprobs(ref, mb))
        loss, m = policy_loss(cfg, logp_BT, old_BT, mb.scalars["adv"].to(logp_BT.dtype), mask_BT, is_BT,
                              n_seq, n_tok, ref_BT)
        m["entropy"] = L.masked_mean(mb.to_BT(ent_M), mask_BT) if ent_M is not None and ent_M.numel() else 0.0
        return loss, {**m, **mism}

    def trainer_ref_logprobs(ref_model, mb):
        from .trainer import hidden_at
        return L.chunked_token_logprobs(hidden_at(ref_model, mb), ref_model.get_output_embeddings().weight,
                                        mb.targets, chunk_size=cfg.chunk_size)[0]

    def after_update(step: int) -> None:
        if engine is not None and engine.name == "vllm":
            engine.update_weights(engine_weights(lm))   # under FSDP: gathered one tensor at a time

    try:
        trainer.fit(make_batch, loss_fn, update_epochs=cfg.update_epochs, after_update=after_update,
                    on_batch=on_batch, display=("reward_mean", "accuracy", "loss"))
        if writer is not None:
            writer.commit()
        out = trainer.finish(extra={"labels_used": used, "max_labels": cfg.max_labels,
                                    "rollouts": "rollouts" if writer is not None else None,
                                    "skipped_long_prompts": skipped})
    finally:
        if verifier is not None:
            verifier.close()
        if engine is not None:
            engine.close()
    print(out)


def use_vllm(backend: str) -> bool:
    """--backend vllm (refused without vLLM), or auto on a GPU host with vLLM: sample with a colocated
    vLLM engine. Elsewhere the live hf model samples (no weight sync, exact)."""
    from .engines import auto_backend, vllm_available

    if backend == "server":              # a rollout server's vLLM: no vLLM needed in the trainer
        return True
    if backend == "vllm" and not vllm_available():
        raise UsageError("--backend vllm: vllm is not installed (pip install 's2d[vllm]')")
    return backend == "vllm" or (backend == "auto" and auto_backend() == "vllm")


def colocated_engine(cfg, model: str, trainer: Trainer):
    """A vLLM engine in this process (one per process, or per tensor-parallel group, under accelerate
    launch) that samples this process's share of each step, starting from the trainer's weights (a
    resumed run's included). --backend server: a client of `s2d rollout-server` (`rollout_server=URL`)
    instead, sent the same weights."""
    from .engines import make_engine

    if cfg.backend == "server":
        from .engines.served import ServedEngine

        if not cfg.rollout_server:
            raise UsageError("--backend server: missing --set rollout_server=http://host:port (an `s2d rollout-server`)")
        engine = ServedEngine(cfg.rollout_server, tokenizer=trainer.tokenizer, timeout=cfg.rollout_timeout,
                              weight_timeout=cfg.rollout_timeout, weight_backend=cfg.weight_backend,
                              vocab=trainer.lm.get_input_embeddings().weight.shape[0])
        engine.update_weights(engine_weights(trainer.lm))
        return engine

    engine = make_engine("vllm", model, tokenizer=trainer.tokenizer, seed=cfg.seed, dtype=cfg.dtype,
                         trust_remote_code=cfg.trust_remote_code, tensor_parallel_size=cfg.tensor_parallel_size,
                         gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                         sleep_level=cfg.vllm_sleep_level)
    engine.update_weights(engine_weights(trainer.lm))   # LoRA: the adapted blocks, merged
    return engine


def command(
    model: cu.ModelOpt = None, dataset: cu.DatasetOpt = None, out: cu.RunOutOpt = None,
    steps: int = typer.Option(None, "--steps", help="Optimizer steps."),
    group_size: int = typer.Option(None, "--group-size", "-G", help="Completions per prompt (G)."),
    prompts_per_step: int = typer.Option(None, "--prompts-per-step", "-P", help="Prompts per step (P)."),
    loss: str = typer.Option(None, "--loss", help="grpo, dr_grpo, dapo or gspo."),
    max_new_tokens: cu.MaxNewOpt = None, temperature: cu.TempOpt = None,
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    beta: float = typer.Option(None, "--beta", help="KL-to-reference coefficient (0: no reference model)."),
    kl_estimator: str = typer.Option(
        None, "--kl-estimator", help="How --beta's KL(policy || ref) is trained: k3 (loss term, DeepSeekMath; its "
        "gradient follows KL(ref || policy)), k3_is (k3 x the importance ratio, TRL's default; gradient follows "
        "KL(policy || ref)) or k1 (per-token reward -beta*(logp - ref_logp); gradient follows KL(policy || ref))."),
    max_labels: int = typer.Option(None, "--max-labels", help="Cap on distinct labelled prompts used."),
    rollouts: str = typer.Option(None, "--rollouts", help="Update from existing verified rollouts."),
    reward: str = typer.Option(None, "--reward", help="math (verifier) or module:function."),
    resume: bool = typer.Option(None, "--resume", help="Continue from the newest checkpoint."),
    lora_rank: LoraRankOpt = None,
    backend: cu.TrainBackendOpt = None, seed: cu.SeedOpt = None, limit: cu.LimitOpt = None,
    force: cu.ForceOpt = None, config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Sparse-reward RL (GRPO and variants) on verified math rewards.

    Example: s2d grpo --model runs/tiny --dataset toy:split=train --steps 20 --group-size 8 --prompts-per-step 8 --max-new-tokens 48 --lr 1e-5 --out runs/grpo
    """
    flags = cu.given(model=model, dataset=dataset, out=out, steps=steps, group_size=group_size,
                     prompts_per_step=prompts_per_step, loss=loss, max_new_tokens=max_new_tokens,
                     temperature=temperature, lr=lr, beta=beta, kl_estimator=kl_estimator, max_labels=max_labels,
                     rollouts=rollouts, reward=reward, resume=resume, lora_rank=lora_rank, backend=backend, seed=seed, limit=limit,
                     force=force)
    cu.execute(run, lambda: resolve(GRPOConfig, config_file=config, sets=set_, flags=flags))
