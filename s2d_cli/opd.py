"""s2d opd — stage 2b: on-policy distillation. The student samples, the teacher scores every token.

    s2d opd --config stages/2b-opd.yaml --student runs/student-kl/model --teacher runs/teacher-grpo/model \\
            --dataset prompts.jsonl --out runs/student-opd
    s2d opd --student runs/toy/student-kl/model --teacher runs/toy/teacher --dataset toy:split=pool \\
            --steps 40 --n 4 --prompts-per-step 8 --max-new-tokens 48 --lr 1e-4 --out runs/toy/student-opd
    s2d opd ... --alpha 0.5 --dataset toy:split=train        # dense + 0.5 x group-normalised verifier reward

Each step: P prompts (--prompts-per-step) x n completions from the current student (hf: the live model;
vllm: an engine that receives the new weights after every update), then, per packed micro-batch, one
no-grad prefill of the teacher (in-process transformers) and one student forward + backward.
Losses (--loss), all of the per-token reverse KL(student || teacher) on the student's own samples:
  sampled  the sampled reverse KL as a per-token advantage (tinker-cookbook's OPD):
           a_t = -(logp_s(y_t) - logp_t(y_t)), loss = -sum_t r_t A_t / #tokens, A_t = a_t (+ discounted
           future a_s with --discount), r_t = 1 on-policy (one update per batch)
  full     exact over the whole vocabulary at every position
  topk     exact on the student's top-K support (--topk-k) plus one tail bucket per side
Reward density (--alpha): A_t += alpha x group-normalised verifier reward of the sequence (GRPO's group
advantage over the n samples of a prompt); for full/topk the same term is added as a policy-gradient
surrogate. alpha 0 (the default) reads no label: the manifest's `labels_used` counts the distinct
prompts whose labels trained the student (0 at alpha 0). Accuracy is reported whenever the prompts
have answers.

Metrics: reverse_kl (token mean of logp_s - logp_t at the sampled tokens: the Monte-Carlo reverse KL,
the same for every loss), reverse_kl_exact (full) / reverse_kl_topk (topk), accuracy, completion_len,
truncation_rate. The teacher is frozen: eval mode, requires_grad False, never in the optimizer; it and
the student must share a tokenizer (`s2d_cli.compat`), and with --allow-vocab-size-mismatch every KL
uses the first min(V_s, V_t) head rows.

Deliberately left out: PPO epochs over a batch (on-policy, one update per batch, so the sampling
log-probs are the training forward's, detached: no extra pass), importance weights for a vllm sampler
whose bf16 distribution differs slightly from the trainer's (grpo's --is-cap; here the trainer's
log-probs stand for the sampler's), a reference-model KL, and storing the rollouts (use `s2d rollout`
on a checkpoint to inspect them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import typer

from . import cliutil as cu
from . import losses as L
from .compat import (
    AllowMismatchOpt,
    StudentOpt,
    TeacherOpt,
    check_loaded_rows,
    check_pair,
    in_vocab_prefix,
    load_teacher,
)
from .config import require_run_dir, resolve
from .errors import UsageError
from .grpo import labels_used, prompt_schedule
from .lora import LoraRankOpt, engine_weights
from .rollout import (
    PromptFields,
    SamplingFields,
    check_sampling,
    completion_records,
    encode_examples,
    load_prompts,
    sampling_config,
)
from .trainer import Batch, Sequence, Trainer, TrainFields, hidden_at

LOSSES = ("sampled", "full", "topk")


@dataclass
class OPDConfig(PromptFields, SamplingFields, TrainFields):
    student: str = ""                # model to train (checkpoint directory or hub id)
    teacher: str = ""                # frozen teacher that scores the student's samples
    out: str = ""                    # run directory
    loss: str = "sampled"            # sampled | full | topk
    prompts_per_step: int = 8        # P prompts per step (global, across processes)
    n: int = 4                       # completions per prompt (the group of --alpha's advantages)
    alpha: float = 0.0               # weight of the group-normalised verifier reward (0: no labels used)
    discount: float = 0.0            # sampled loss: A_t sums future per-token advantages with this discount
    topk_k: int = 64                 # topk loss: K of the student's support
    allow_vocab_size_mismatch: bool = False  # teacher/student embedding rows may differ (tokenizers must agree)
    workers: int | None = None       # verifier processes (None or 0: one per CPU)
    timeout: float = 5.0             # verifier seconds per item
    temperature: float = 1.0         # sampling temperature (1: exactly on-policy)
    max_new_tokens: int = 1024
    lr: float = 1e-6

    def validate(self) -> None:
        if not self.student:
            raise UsageError("missing required option --student")
        if not self.teacher:
            raise UsageError("missing required option --teacher")
        if not self.dataset:
            raise UsageError("missing required option --dataset (prompts; answers only needed with --alpha)")
        require_run_dir(self.out)
        if self.loss not in LOSSES:
            raise UsageError(f"--loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.prompts_per_step < 1:
            raise UsageError(f"--prompts-per-step: expected >= 1, got {self.prompts_per_step}")
        if self.alpha < 0:
            raise UsageError(f"--alpha: expected >= 0, got {self.alpha}")
        if self.alpha > 0 and self.n < 2:
            raise UsageError(f"--alpha needs --n >= 2 (rewards are compared within a prompt's group), got {self.n}")
        if not 0.0 <= self.discount <= 1.0:
            raise UsageError(f"--discount: expected a value in [0, 1], got {self.discount}")
        if self.discount > 0 and self.loss != "sampled":
            raise UsageError(f"--discount applies to --loss sampled only (the {self.loss} loss is exact per position)")
        if self.topk_k < 1:
            raise UsageError(f"--topk-k: expected >= 1, got {self.topk_k}")
        check_sampling(self)
        from .verifier import check_pool_options
        check_pool_options(self.workers, self.timeout)   # before the run directory exists
        self.check_training()


# ----------------------------------------------------------------------------------------------
# small pure helpers

def sequence_advantages(rewards: list[float], n: int, alpha: float) -> list[float]:
    """alpha x GRPO group advantage (std-normalised within each prompt's n samples), one per completion."""
    if alpha == 0:
        return [0.0] * len(rewards)
    rewards_PG = torch.tensor(rewards, dtype=torch.float64).view(-1, n)
    return (alpha * L.group_advantages(rewards_PG, scale="std")).view(-1).tolist()


def sparse_surrogate(logp_BT: torch.Tensor, alpha_adv_B: torch.Tensor, mask_BT: torch.Tensor,
                     num_tokens: float) -> torch.Tensor:
    """-sum_t r_t (alpha A_b) / #tokens with r = exp(logp - sg(logp)) = 1: REINFORCE on the sequence
    advantage, normalised like the dense term so alpha means the same for every loss."""
    ratio_BT = torch.where(mask_BT, logp_BT - logp_BT.detach(), 0.0).exp()
    return -L.masked_sum(ratio_BT * alpha_adv_B.to(ratio_BT.dtype)[:, None], mask_BT) / num_tokens


def full_loss(hidden_MH: torch.Tensor, weight_VH: torch.Tensor, teacher_hidden_MH2: torch.Tensor,
              teacher_weight_VH2: torch.Tensor, mb, alpha_adv_B: torch.Tensor | None, num_tokens: float,
              chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """--loss full: sum_t KL_t(student || teacher) / #tokens (+ `sparse_surrogate`) in one fused head pass.

    The surrogate -sum_t r_t alpha A_b / #tokens with r_t = exp(logp_t - sg(logp_t)) = 1 has the value
    sum_t c_t and the gradient of sum_t c_t logp_t, c_t = -alpha A_b / #tokens: the fused head adds that
    gradient (`logp_weight_N`), and the value is corrected here. Returns (loss, kl_M, logp_M,
    teacher_logp_M), the last three detached."""
    dtype = torch.promote_types(hidden_MH.dtype, torch.float32)     # the head's compute dtype
    weight_M = torch.full_like(mb.targets, 1.0 / num_tokens, dtype=dtype)
    c_M = None if alpha_adv_B is None else -alpha_adv_B.to(dtype)[mb.seq_idx] / num_tokens
    loss, kl_M, logp_M, teacher_logp_M = L.fused_kl_loss(
        hidden_MH, weight_VH, teacher_hidden_MH2, teacher_weight_VH2, weight_M, mb.targets, direction="reverse",
        chunk_size=chunk_size, logp_weight_N=c_M)
    if c_M is not None:
        loss = loss + (c_M.to(logp_M.dtype) * (1.0 - logp_M)).sum()
    return loss, kl_M, logp_M, teacher_logp_M


# ----------------------------------------------------------------------------------------------

def run(cfg: OPDConfig):
    from .models import load_tokenizer

    examples = load_prompts(cfg, require_answer=cfg.alpha > 0)
    if cfg.backend == "vllm":
        from .engines import vllm_available

        if not vllm_available():
            raise UsageError("--backend vllm: vllm is not installed (pip install 's2d[vllm]')")
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    pair = check_pair(cfg.student, cfg.teacher, student_tok=tok,
                      allow_vocab_size_mismatch=cfg.allow_vocab_size_mismatch,
                      trust_remote_code=cfg.trust_remote_code)
    vocab = pair.vocab
    if cfg.loss == "topk" and cfg.topk_k > vocab:
        raise UsageError(f"--topk-k: expected <= {vocab} (the vocabulary), got {cfg.topk_k}")
    has_answers = all(ex.answer for ex in examples)
    used = labels_used(len(examples), cfg.prompts_per_step, cfg.steps) if cfg.alpha > 0 else 0
    trainer = Trainer(cfg, model=cfg.student, out=cfg.out, kind="opd", config=asdict(cfg),
                      inputs=[cfg.dataset, cfg.teacher])
    if trainer.complete:
        print(cfg.out)
        return
    if cfg.prompts_per_step % trainer.world:
        raise UsageError(f"--prompts-per-step {cfg.prompts_per_step} must divide evenly over {trainer.world} processes")
    lm, tok = trainer.lm, trainer.tokenizer
    check_loaded_rows(lm, pair.student_rows, "student")
    teacher = load_teacher(cfg.teacher, dtype=trainer.frozen_dtype, device=trainer.device,
                           trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    check_loaded_rows(teacher, pair.teacher_rows, "teacher")
    trainer.adopt(teacher)
    teacher_weight = teacher.get_output_embeddings().weight
    engine = verifier = None
    local_p = cfg.prompts_per_step // trainer.world
    encoded: dict = {}                                   # problem -> (rendered text, ids), once per run

    def make_batch(step: int) -> Batch:
        idx = prompt_schedule(len(examples), cfg.prompts_per_step, step, cfg.seed)
        mine = [examples[i] for i in idx[trainer.rank * local_p:(trainer.rank + 1) * local_p]]
        texts, ids = encode_examples(tok, mine, cfg, encoded)
        seed = (cfg.seed * 1_000_003 + step) * trainer.world + trainer.rank
        groups = engine.generate(ids, sampling_config(cfg, seed=seed, n=cfg.n))
        records = completion_records(mine, texts, groups, cfg.student, logprobs=False, prompt_ids=ids)
        rewards, correct = [0.0] * len(records), [False] * len(records)
        if verifier is not None:   # answers exist: accuracy always, the reward only when alpha > 0
            verdicts = verifier.verify([(r["completion"], r["answer"]) for r in records])
            rewards, correct = [v.reward for v in verdicts], [v.correct for v in verdicts]
        adv = sequence_advantages(rewards, cfg.n, cfg.alpha)
        seqs = []
        for rec, a in zip(records, adv):
            end = in_vocab_prefix(rec["completion_ids"], vocab)   # < len only from an untrained padding row
            if end:
                seqs.append(Sequence(list(rec["prompt_ids"]), rec["completion_ids"][:end], scalars={"alpha_adv": a}))
        sums = trainer.all_sum([len(records), sum(correct), sum(len(r["completion_ids"]) for r in records),
                                sum(r["finish_reason"] == "length" for r in records)])
        total = max(sums[0], 1)
        metrics = {"completion_len": sums[2] / total, "truncation_rate": sums[3] / total}
        if verifier is not None:
            metrics["accuracy"] = sums[1] / total
        return Batch(seqs, metrics)

    def loss_fn(policy, mb, info):
        n_tok = info.num_tokens / info.world_size      # global normaliser: micro-batches and processes add up
        mask_BT = mb.mask_BT()
        with torch.no_grad():                            # the teacher's one prefill for this micro-batch
            teacher_h_MH = hidden_at(teacher, mb)
        alpha_adv_B = mb.scalars["alpha_adv"] if cfg.alpha > 0 else None
        if cfg.loss == "full":
            # one fused pass gives the gradient, the exact KL and both models' log-probs of the sampled
            # tokens (no checkpoint recompute, no separate metric passes)
            loss, kl_M, logp_M, teacher_logp_M = policy(mb, lambda h, w: full_loss(
                h, w[:vocab], teacher_h_MH, teacher_weight, mb, alpha_adv_B, n_tok, cfg.chunk_size))
            return loss, {"reverse_kl": (logp_M - teacher_logp_M).mean().detach(),
                          "reverse_kl_exact": kl_M.mean().detach()}
        if cfg.loss == "sampled":
            with torch.no_grad():
                teacher_logp_M = L.chunked_token_logprobs(teacher_h_MH, teacher_weight[:vocab], mb.targets,
                                                          chunk_size=cfg.chunk_size)[0]
            logp_M = policy(mb, lambda h, w: L.chunked_token_logprobs(h, w[:vocab], mb.targets,
                                                                      chunk_size=cfg.chunk_size)[0])
            logp_BT = mb.to_BT(logp_M)
            # on-policy, one update per batch: the sampling log-probs are this forward's, detached
            loss, m = L.opd_sampled_loss(logp_BT, logp_BT.detach(), mb.to_BT(teacher_logp_M), mask_BT,
                                         alpha_adv_B=alpha_adv_B, discount=cfg.discount, num_tokens=n_tok)
            return loss, {"reverse_kl": m["reverse_kl"]}

        # --loss topk: the KL and both models' log-probs of the sampled tokens from the same head passes
        # (the log-probs: the surrogate's input when alpha > 0, else a metric)
        kl_M, logp_M, teacher_logp_M = policy(mb, lambda h, w: L.reverse_kl_topk_and_logprobs(
            h, w[:vocab], teacher_h_MH, teacher_weight, mb.targets, k=cfg.topk_k, chunk_size=cfg.chunk_size))
        loss = kl_M.sum() / n_tok
        if alpha_adv_B is not None:
            loss = loss + sparse_surrogate(mb.to_BT(logp_M), alpha_adv_B, mask_BT, n_tok)
        return loss, {"reverse_kl": (logp_M.detach() - teacher_logp_M).mean(),
                      "reverse_kl_topk": kl_M.detach().mean()}

    def after_update(step: int) -> None:
        if engine.name == "vllm":
            engine.update_weights(engine_weights(lm))

    try:
        if cfg.backend == "vllm":
            from .engines import make_engine

            if trainer.world > 1:
                raise UsageError("--backend vllm runs with one training process; use --backend hf under "
                                 "accelerate launch")
            engine = make_engine("vllm", cfg.student, tokenizer=tok, seed=cfg.seed, dtype=cfg.dtype,
                                 trust_remote_code=cfg.trust_remote_code, tensor_parallel_size=cfg.tensor_parallel_size,
                                 gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len)
            engine.update_weights(engine_weights(lm))  # a resumed run: the engine starts from our weights
        else:  # auto: the live hf model needs no weight sync and is exact; vllm is opt-in for training
            from .engines.hf import HFEngine

            engine = HFEngine(lm, tokenizer=tok, seed=cfg.seed, batch_size=cfg.batch_size)
        if has_answers:
            from .verifier import Verifier
            from .verify import warm_up_golds

            verifier = Verifier(workers=cfg.workers, timeout=cfg.timeout,
                                warm_up=warm_up_golds(ex.answer for ex in examples if ex.answer is not None))
        trainer.fit(make_batch, loss_fn, after_update=after_update,
                    display=("reverse_kl", "accuracy", "loss") if has_answers else ("reverse_kl", "loss"))
        out = trainer.finish(extra={"loss": cfg.loss, "teacher": cfg.teacher, "vocab": vocab, "alpha": cfg.alpha,
                                    "labels_used": used, "num_prompts": len(examples)})
    finally:
        if verifier is not None:
            verifier.close()
        if engine is not None:
            engine.close()
    print(out)


def command(
    student: StudentOpt = None, teacher: TeacherOpt = None, dataset: cu.DatasetOpt = None, out: cu.RunOutOpt = None,
    steps: int = typer.Option(None, "--steps", help="Optimizer steps."),
    loss: str = typer.Option(None, "--loss", help="sampled, full or topk."),
    alpha: float = typer.Option(None, "--alpha", help="Weight of the group-normalised verifier reward (0: none)."),
    n: cu.NOpt = None,
    prompts_per_step: int = typer.Option(None, "--prompts-per-step", "-P", help="Prompts per step (P)."),
    max_new_tokens: cu.MaxNewOpt = None, temperature: cu.TempOpt = None,
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    topk_k: int = typer.Option(None, "--topk-k", help="K of the topk loss's support."),
    discount: float = typer.Option(None, "--discount", help="sampled loss: discount of future per-token advantages."),
    allow_vocab_size_mismatch: AllowMismatchOpt = None,
    resume: bool = typer.Option(None, "--resume", help="Continue from the newest checkpoint."),
    lora_rank: LoraRankOpt = None,
    backend: cu.TrainBackendOpt = None, seed: cu.SeedOpt = None, limit: cu.LimitOpt = None,
    force: cu.ForceOpt = None, config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Stage 2b: on-policy distillation, per-token reverse KL to the teacher on the student's samples.

    Example: s2d opd --student runs/kl/model --teacher runs/grpo/model --dataset toy:split=pool --steps 40 --n 4 --prompts-per-step 8 --max-new-tokens 48 --lr 1e-4 --out runs/opd
    """
    flags = cu.given(student=student, teacher=teacher, dataset=dataset, out=out, steps=steps, loss=loss,
                     alpha=alpha, n=n, prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens,
                     temperature=temperature, lr=lr, topk_k=topk_k, discount=discount,
                     allow_vocab_size_mismatch=allow_vocab_size_mismatch, resume=resume, backend=backend,
                     lora_rank=lora_rank, seed=seed, limit=limit, force=force)
    cu.execute(run, lambda: resolve(OPDConfig, config_file=config, sets=set_, flags=flags))
