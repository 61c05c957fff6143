"""s2d opd — stage 2b: on-policy distillation. The student samples, the teacher scores every token.

    s2d opd --config stages/2b-opd.yaml --student runs/student-kl/model --teacher runs/teacher-grpo/model \\
            --dataset prompts.jsonl --out runs/student-opd
    s2d opd --student runs/toy/student-kl/model --teacher runs/toy/teacher --dataset toy:split=pool \\
            --steps 40 --n 4 --prompts-per-step 8 --max-new-tokens 48 --lr 1e-4 --out runs/toy/student-opd
    s2d opd ... --alpha 0.5 --dataset toy:split=train        # dense + 0.5 x group-normalised verifier reward
    s2d opd --student S --teacher http://127.0.0.1:8000/v1 --loss topk --topk-k 20 ...   # a served teacher

Each step: P prompts (--prompts-per-step) x n completions from the current student (hf: the live model;
vllm: an engine that receives the new weights after every update), then, per packed micro-batch, one
no-grad prefill of the teacher (in-process transformers) and one student forward + backward; a served
teacher (--teacher http://host:port/v1, `s2d_cli.served_teacher`) instead scores the step's samples
over HTTP before the update, through vLLM's prompt log-probs, and never enters training memory.
Losses (--loss), all of the per-token reverse KL(student || teacher) on the student's own samples:
  sampled  the sampled reverse KL as a per-token advantage (tinker-cookbook's OPD):
           a_t = -(logp_s(y_t) - logp_t(y_t)), loss = -sum_t r_t A_t / #tokens, A_t = a_t (+ discounted
           future a_s with --discount), r_t = 1 on-policy (one update per batch)
  full     exact over the whole vocabulary at every position
  topk     exact on a top-K support (--topk-k) plus one tail bucket per side: the student's top-K ids
           (topk_support=student, the default with an in-process teacher) or the teacher's
           (topk_support=teacher: all a served teacher returns, and its default there)
A served teacher gives per position the sampled token's log-prob and its own top-K, not the whole
vocabulary: --loss full and topk_support=student need an in-process teacher, and --alpha is kept to
in-process teachers too.
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
    embedding_rows,
    in_vocab_prefix,
    load_teacher,
)
from .config import require_run_dir, resolve
from .data import prompt_is_chat
from .engines import sample_seed
from .errors import UsageError
from .grading import GradingFields
from .grpo import colocated_engine, labels_used, prompt_schedule, use_vllm
from .lora import LoraRankOpt, engine_weights
from .rollout import (
    PromptFields,
    SamplingFields,
    check_sampling,
    completion_records,
    encode_examples,
    load_fitting_prompts,
    sampling_config,
)
from .served_teacher import TOKENIZER_PROBES, ServedTeacher, is_served
from .trainer import VOLATILE, Batch, Sequence, Trainer, TrainFields, hidden_at

LOSSES = ("sampled", "full", "topk")
SERVER_SETTINGS = ("teacher_timeout", "teacher_retries", "teacher_selftest_tol")   # a rerun with others resumes


@dataclass
class OPDConfig(PromptFields, SamplingFields, TrainFields, GradingFields):
    student: str = ""                # model to train (checkpoint directory or hub id)
    teacher: str = ""                # frozen teacher that scores the student's samples
    out: str = ""                    # run directory
    loss: str = "sampled"            # sampled | full | topk
    prompts_per_step: int = 8        # P prompts per step (global, across processes)
    n: int = 4                       # completions per prompt (the group of --alpha's advantages)
    alpha: float = 0.0               # weight of the group-normalised verifier reward (0: no labels used)
    discount: float = 0.0            # sampled loss: A_t sums future per-token advantages with this discount
    topk_k: int = 64                 # topk loss: K of the support
    topk_support: str = "auto"       # topk loss: student | teacher (whose top-K ids); auto: teacher when served
    teacher_timeout: float = 120.0   # served teacher: seconds per HTTP request
    teacher_retries: int = 3         # served teacher: retries (exponential backoff) before giving up
    teacher_selftest_tol: float = 0.02  # served teacher: largest log-prob difference of a repeated request
    allow_vocab_size_mismatch: bool = False  # teacher/student embedding rows may differ (tokenizers must agree)
    workers: int | None = None       # verifier processes (None or 0: one per CPU)
    timeout: float = 5.0             # verifier seconds per item
    temperature: float = 1.0         # sampling temperature (1: exactly on-policy)
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
        if self.alpha > 0 and self.n < 2:
            raise UsageError(f"--alpha needs --n >= 2 (rewards are compared within a prompt's group), got {self.n}")
        if self.discount > 0 and self.loss != "sampled":
            raise UsageError(f"--discount applies to --loss sampled only (the {self.loss} loss is exact per position)")
        if self.topk_k < 1:
            raise UsageError(f"--topk-k: expected >= 1, got {self.topk_k}")
        if self.topk_support not in ("auto", "student", "teacher"):
            raise UsageError(f"topk_support: expected auto, student or teacher, got {self.topk_support!r}")
        if is_served(self.teacher):
            why = "a served teacher returns the sampled token's log-prob and its top-K, not the whole vocabulary"
            if self.loss == "full":
                raise UsageError(f"--loss full needs an in-process teacher: {why}; use --loss sampled or topk")
            if self.loss == "topk" and self.topk_support == "student":
                raise UsageError(f"topk_support=student needs an in-process teacher: {why}, so the support is "
                                 "its top-K (topk_support=teacher)")
            if self.alpha > 0:
                raise UsageError("--alpha needs an in-process teacher: the served teacher scores the dense term "
                                 "only (opd with a server is the pure distillation stage); use --alpha 0")
            if self.teacher_retries < 0:       # the float keys are checked by config.FLOAT_RANGES
                raise UsageError(f"teacher_retries: expected >= 0, got {self.teacher_retries}")
        if self.vllm_sleep_level not in (0, 1, 2):
            raise UsageError(f"vllm_sleep_level: expected 0, 1 or 2, got {self.vllm_sleep_level}")
        check_sampling(self)
        from .verifier import check_pool_options
        check_pool_options(self.workers, self.timeout)   # before the run directory exists
        self.grading_rules()
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

    examples, skipped = load_fitting_prompts(cfg, cfg.student, require_answer=cfg.alpha > 0)
    vllm = use_vllm(cfg.backend)
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    served = None
    if is_served(cfg.teacher):   # its tokenizer is checked against the student's by the preflight below
        vocab = embedding_rows(cfg.student, trust_remote_code=cfg.trust_remote_code)
        served = ServedTeacher(cfg.teacher, vocab=vocab, k=cfg.topk_k if cfg.loss == "topk" else 0,
                               timeout=cfg.teacher_timeout, retries=cfg.teacher_retries)
    else:
        pair = check_pair(cfg.student, cfg.teacher, student_tok=tok,
                          allow_vocab_size_mismatch=cfg.allow_vocab_size_mismatch,
                          trust_remote_code=cfg.trust_remote_code)
        vocab = pair.vocab
    support = ("teacher" if served else "student") if cfg.topk_support == "auto" else cfg.topk_support
    if cfg.loss == "topk" and cfg.topk_k > vocab:
        raise UsageError(f"--topk-k: expected <= {vocab} (the vocabulary), got {cfg.topk_k}")
    has_answers = all(ex.answer for ex in examples)
    used = labels_used(len(examples), cfg.prompts_per_step, cfg.steps) if cfg.alpha > 0 else 0
    trainer = Trainer(cfg, model=cfg.student, out=cfg.out, kind="opd", config=asdict(cfg),
                      inputs=[cfg.dataset, cfg.teacher], volatile=VOLATILE + SERVER_SETTINGS)
    if trainer.complete:
        print(cfg.out)
        return
    if cfg.prompts_per_step % trainer.world:
        raise UsageError(f"--prompts-per-step {cfg.prompts_per_step} must divide evenly over {trainer.world} processes")
    lm, tok = trainer.lm, trainer.tokenizer
    teacher = teacher_weight = server_info = None
    if served is not None:       # before the first step: server up, same tokenizer, self-consistent
        texts, ids = encode_examples(tok, examples[:TOKENIZER_PROBES], cfg)
        server_info = served.preflight(tok, texts, ids, chat_rendered=prompt_is_chat(tok, cfg.chat),
                                       selftest_tol=cfg.teacher_selftest_tol)
    else:
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
        first = trainer.rank * local_p
        mine = [examples[i] for i in idx[first:first + local_p]]
        texts, ids = encode_examples(tok, mine, cfg, encoded)
        sampling = sampling_config(cfg, seed=cfg.seed, n=cfg.n)
        # seeds by (run seed, step, prompt), not by process: N processes sample what one does
        sampling.prompt_seeds = [sample_seed(cfg.seed, step, first + k) for k in range(local_p)]
        groups = engine.generate(ids, sampling)
        if engine.name == "vllm":
            engine.sleep()                   # the KV cache (and weights) leave the GPU while training runs
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
        if served is not None:   # the step's teacher scores in a few HTTP requests, carried as per-token data
            served.attach(seqs)
        sums = trainer.all_sum([len(records), sum(correct), sum(len(r["completion_ids"]) for r in records),
                                sum(r["finish_reason"] == "length" for r in records)])
        total = max(sums[0], 1)
        metrics = {"completion_len": sums[2] / total, "truncation_rate": sums[3] / total}
        if verifier is not None:
            metrics["accuracy"] = sums[1] / total
        return Batch(seqs, metrics)

    def teacher_scores(mb, teacher_h_MH, k: int):
        """(logp_M, topk_ids_MK, topk_logp_MK) of the teacher (the top-K None at k 0): the server's
        answer attached to the sequences, or the same numbers from the in-process teacher."""
        if served is not None:
            d = mb.token_data
            return d["teacher_logp"], d.get("teacher_topk_ids"), d.get("teacher_topk_logp")
        with torch.no_grad():
            if k:
                return L.topk_logprobs(teacher_h_MH, teacher_weight[:vocab], mb.targets, k=k, chunk_size=cfg.chunk_size)
            return L.chunked_token_logprobs(teacher_h_MH, teacher_weight[:vocab], mb.targets,
                                            chunk_size=cfg.chunk_size)[0], None, None

    def loss_fn(policy, mb, info):
        n_tok = info.num_tokens / info.world_size      # global normaliser: micro-batches and processes add up
        mask_BT = mb.mask_BT()
        teacher_h_MH = None
        if teacher is not None:
            with torch.no_grad():                        # the teacher's one prefill for this micro-batch
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
            teacher_logp_M = teacher_scores(mb, teacher_h_MH, 0)[0]
            logp_M = policy(mb, lambda h, w: L.chunked_token_logprobs(h, w[:vocab], mb.targets,
                                                                      chunk_size=cfg.chunk_size)[0])
            logp_BT = mb.to_BT(logp_M)
            # on-policy, one update per batch: the sampling log-probs are this forward's, detached
            loss, m = L.opd_sampled_loss(logp_BT, logp_BT.detach(), mb.to_BT(teacher_logp_M), mask_BT,
                                         alpha_adv_B=alpha_adv_B, discount=cfg.discount, num_tokens=n_tok)
            return loss, {"reverse_kl": m["reverse_kl"]}

        # --loss topk: the KL and both models' log-probs of the sampled tokens from the same head passes
        # (the log-probs: the surrogate's input when alpha > 0, else a metric)
        if support == "teacher":
            teacher_logp_M, ids_MK, teacher_logp_MK = teacher_scores(mb, teacher_h_MH, cfg.topk_k)
            kl_M, logp_M = policy(mb, lambda h, w: L.reverse_kl_on_support(
                h, w[:vocab], ids_MK, teacher_logp_MK, mb.targets, chunk_size=cfg.chunk_size))
        else:
            kl_M, logp_M, teacher_logp_M = policy(mb, lambda h, w: L.reverse_kl_topk_and_logprobs(
                h, w[:vocab], teacher_h_MH, teacher_weight, mb.targets, k=cfg.topk_k, chunk_size=cfg.chunk_size))
        loss = kl_M.sum() / n_tok
        if alpha_adv_B is not None:
            loss = loss + sparse_surrogate(mb.to_BT(logp_M), alpha_adv_B, mask_BT, n_tok)
        return loss, {"reverse_kl": (logp_M.detach() - teacher_logp_M).mean(),
                      "reverse_kl_topk": kl_M.detach().mean()}

    def after_update(step: int) -> None:
        if engine.name == "vllm":
            engine.update_weights(engine_weights(lm))   # under FSDP: gathered one tensor at a time

    try:
        if vllm:
            engine = colocated_engine(cfg, cfg.student, trainer)
        else:  # the live hf model samples: no weight sync, exact
            from .engines.hf import HFEngine

            engine = HFEngine(lm, tokenizer=tok, seed=cfg.seed, batch_size=cfg.batch_size,
                              lockstep=trainer.sharded)
        if has_answers:
            from .verifier import Verifier
            verifier = Verifier(workers=cfg.workers, timeout=cfg.timeout, rules=cfg.grading_rules())
        trainer.fit(make_batch, loss_fn, after_update=after_update,
                    display=("reverse_kl", "accuracy", "loss") if has_answers else ("reverse_kl", "loss"))
        out = trainer.finish(extra={"loss": cfg.loss, "teacher": cfg.teacher, "vocab": vocab, "alpha": cfg.alpha,
                                    "labels_used": used, "num_prompts": len(examples),
                                    "topk_support": support if cfg.loss == "topk" else None,
                                    "teacher_server": server_info, "skipped_long_prompts": skipped})
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
