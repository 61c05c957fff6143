"""s2d kl-warmup — stage 2a: fit the student to the teacher's distribution on the teacher's own sequences.

    s2d kl-warmup --config stages/2a-kl-warmup.yaml --student Qwen/Qwen3-1.7B \\
                  --teacher runs/teacher-grpo/model --rollouts runs/teacher-rollouts --out runs/student-kl
    s2d rollout --model runs/toy/teacher --dataset toy:split=pool --n 2 --topk 16 --out runs/toy/teacher-rollouts
    s2d kl-warmup --student runs/toy/student --rollouts runs/toy/teacher-rollouts --targets topk \\
                  --steps 60 --lr 1e-3 --out runs/toy/student-kl
    s2d toy --split sft --n 2000 | s2d kl-warmup --student runs/toy/init --rollouts - --steps 300 \\
                  --lr 1e-3 --out runs/toy/base                                   # plain SFT on completions

Input (--rollouts): a rollout artifact, a JSONL/JSON/Parquet file, or '-' (stdin). Per record, the prompt
is `prompt_ids`, else `prompt` (text already rendered), else `problem` (rendered here with the student's
chat template, as `s2d rollout` renders it); the completion is `completion_ids`, else `completion`
tokenized with the eos token appended (unless finish_reason is "length").

Targets (--targets), all forward KL(teacher || student) per completion token, token mean over the batch:
  sampled  cross-entropy on the teacher's sampled tokens: the Monte-Carlo forward KL (+ the teacher's
           entropy, a constant); on any file with completions this is plain SFT
  topk     the teacher's stored top-K log-probs plus one tail bucket (`s2d rollout --topk K`)
  full     exact, over the whole vocabulary: the teacher is loaded here (eval mode, no gradient, never
           in the optimizer) and scores each micro-batch in one no-grad prefill
--temperature divides the logits: of both sides for full, of the student for sampled; topk accepts only
1 (the stored teacher log-probs are at temperature 1). With --allow-vocab-size-mismatch the student's
distribution is taken over the first V = min(V_s, V_t) head rows (see `s2d_cli.compat`).

Step k takes the next --batch-size sequences of a seeded shuffle (epochs over the data), so a resumed
run sees what an uninterrupted one would. --eval-rollouts R2 measures the mean per-token KL (CE for
sampled) on held-out teacher sequences before training and at the end: manifest `heldout_kl_start`,
`heldout_kl_end`; with --set eval_every=N also every N steps, a curve to choose --steps on: one line
{"step": k, "<metric>": value} per evaluation (step 0 the start, the last the end) in out/heldout.jsonl.
The teacher and student must share a tokenizer (`s2d_cli.compat`): --teacher is checked when given; the
rollouts' recorded tokenizer digest always (the model a manifest names is never read).
--teacher may also be the URL of a vLLM server (http://host:port/v1, as for `s2d opd`): its /tokenize
endpoint is checked against the student's tokenizer on the records' prompts and its model name goes into
the manifest; --targets full needs the teacher's whole distribution, which a server does not return, so it
needs a checkpoint.

Deliberately left out: reverse or mixed (JSD) objectives here (reverse KL lives in `s2d opd`), and
sequence-level distillation tricks (no filtering or reweighting of teacher samples).
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import typer

from . import cliutil as cu
from . import losses as L
from .artifacts import _write_atomic, has_tensors, iter_record_tensors, read_manifest, read_records
from .compat import (
    AllowMismatchOpt,
    StudentOpt,
    TeacherOpt,
    check_loaded_rows,
    check_pair,
    embedding_rows,
    in_vocab_prefix,
    load_teacher,
    token_ids,
)
from .config import require_run_dir, resolve
from .data import DEFAULT_INSTRUCTION, encode_prompt, prompt_is_chat, render_prompt
from .errors import UsageError
from .lora import LoraRankOpt
from .served_teacher import TOKENIZER_PROBES, ServedTeacher, is_served
from .trainer import Batch, Sequence, Trainer, TrainFields, hidden_at, pack

TARGETS = ("sampled", "topk", "full")
HELDOUT_START = "heldout_start.json"   # the start-of-run evaluation, kept for a resumed run's manifest
HELDOUT_CURVE = "heldout.jsonl"        # eval_every: the held-out value every N steps


@dataclass
class KLWarmupConfig(TrainFields):
    student: str = ""                   # model to train (checkpoint directory or hub id)
    teacher: str | None = None          # teacher checkpoint: needed by --targets full; always checked for compatibility
    rollouts: str = ""                  # teacher sequences: rollout artifact, JSONL/JSON/Parquet file or '-'
    eval_rollouts: str | None = None    # held-out teacher sequences: mean per-token KL at the start and the end
    eval_every: int = 0                 # with eval_rollouts: also every N steps, into out/heldout.jsonl (0: not)
    out: str = ""                       # run directory
    targets: str = "sampled"            # sampled | topk | full
    batch_size: int = 32                # sequences per optimizer step (global, across processes)
    temperature: float = 1.0            # softmax temperature of the KL (1: the distributions as they are)
    chat: str = "auto"                  # records with `problem`: auto | chat | plain (as in s2d rollout)
    instruction: str = DEFAULT_INSTRUCTION  # records with `problem`: appended to it (as in s2d rollout)
    enable_thinking: bool | None = None  # records with `problem`: Qwen3 thinking mode (None: template default)
    allow_vocab_size_mismatch: bool = False  # teacher/student embedding rows may differ (tokenizers must agree)
    # a record whose prompt + completion is longer than the models' context: "error" refuses it naming
    # the record, "skip" leaves it out and counts it (stderr, and skipped_long_prompts in the manifest)
    long_prompts: str = "error"
    lr: float = 1e-5

    def validate(self) -> None:
        if not self.student:
            raise UsageError("missing required option --student")
        if not self.rollouts:
            raise UsageError("missing required option --rollouts (artifact, JSONL file or '-')")
        require_run_dir(self.out)
        if self.targets not in TARGETS:
            raise UsageError(f"--targets: expected one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.targets == "full" and not self.teacher:
            raise UsageError("--targets full: needs --teacher (the teacher scores every batch)")
        if self.targets == "full" and is_served(self.teacher):
            raise UsageError("--targets full needs an in-process teacher (a checkpoint): a served teacher returns "
                             "top-K log-probs, not the whole vocabulary; use --targets topk on `s2d rollout --topk K`")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size: expected >= 1, got {self.batch_size}")
        if self.targets == "topk" and self.temperature != 1.0:
            raise UsageError("--temperature: topk targets are the teacher's stored log-probs at temperature 1; "
                             "use --targets full for another temperature")
        if self.chat not in ("auto", "chat", "plain"):
            raise UsageError(f"--chat: expected auto, chat or plain, got {self.chat!r}")
        if self.eval_every < 0:
            raise UsageError(f"eval_every: expected >= 0, got {self.eval_every}")
        if self.eval_every and not self.eval_rollouts:
            raise UsageError("eval_every: needs --eval-rollouts (the held-out sequences to score)")
        if self.long_prompts not in ("error", "skip"):
            raise UsageError(f"long_prompts: expected error or skip, got {self.long_prompts!r}")
        self.check_training()


# ----------------------------------------------------------------------------------------------
# small pure helpers

def batch_indices(num: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step `step`'s sequences: epochs of seeded permutations, read in order."""
    perms: dict[int, list[int]] = {}
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, num)
        if epoch not in perms:
            perms[epoch] = list(range(num))
            random.Random(seed * 7919 + epoch).shuffle(perms[epoch])
        out.append(perms[epoch][pos])
    return out


def _text(rec: dict, field: str, where: str) -> str:
    """A text field of a record: a list or a number there is bad input, not something to str() and train on."""
    value = rec[field]
    if not isinstance(value, str):
        raise UsageError(f"{where}: field {field!r}: expected text, got {type(value).__name__}")
    return value


def record_ids(rec: dict, tokenizer, cfg: KLWarmupConfig, where: str,
               rows: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one record, in the precedence the module docstring gives. `rows`:
    the most embedding rows either model has; an id at or past it is no token of either model."""
    if "prompt_ids" in rec:
        prompt_ids = token_ids(rec["prompt_ids"], where, "prompt_ids", vocab=rows)
    elif "prompt" in rec or "problem" in rec:
        text = _text(rec, "prompt", where) if "prompt" in rec else render_prompt(
            tokenizer, _text(rec, "problem", where), instruction=cfg.instruction, chat=cfg.chat,
            enable_thinking=cfg.enable_thinking)
        prompt_ids = encode_prompt(tokenizer, text, chat_rendered=prompt_is_chat(tokenizer, cfg.chat))
    else:
        raise UsageError(f"{where}: no prompt (expected prompt_ids, prompt or problem)")
    if "completion_ids" in rec:
        completion_ids = token_ids(rec["completion_ids"], where, "completion_ids", vocab=rows)
    elif "completion" in rec:
        completion_ids = tokenizer(_text(rec, "completion", where), add_special_tokens=False)["input_ids"]
        if rec.get("finish_reason") != "length":
            completion_ids.append(tokenizer.eos_token_id)
    else:
        raise UsageError(f"{where}: no completion (expected completion_ids or completion)")
    if not prompt_ids:
        raise UsageError(f"{where}: empty prompt")
    return prompt_ids, completion_ids


def _length_at_least(rec: dict, chars_per_token: int) -> tuple[int, bool]:
    """A lower bound on a record's prompt + completion tokens without tokenizing, and whether it is
    exact: ids count one each, text at most `chars_per_token` characters a token
    (`rollout.max_chars_per_token`)."""
    n, exact = 0, True
    for ids, text in (("prompt_ids", ("prompt", "problem")), ("completion_ids", ("completion",))):
        value = rec.get(ids)
        if isinstance(value, list):
            n += len(value)
        else:
            field = next((f for f in text if isinstance(rec.get(f), str)), None)
            n += len(rec[field]) // chars_per_token if field else 0
            exact = False
    return n, exact


def load_sequences(source: str, tokenizer, cfg: KLWarmupConfig, *, vocab: int, topk: bool,
                   rows: int | None = None, context: int | None = None,
                   stats: dict | None = None) -> list[Sequence]:
    """Training sequences from teacher records, with the stored top-K as per-token data when `topk`.

    A completion is cut at the first position holding an id >= vocab (the rows both heads share); with
    matching heads that never happens. An id >= `rows` (the larger head's rows) is an error: neither
    model has such a token, so the record is not what a model sampled. A record longer than `context`
    tokens is an error naming it, or left out (`long_prompts: skip`, counted in
    `stats["skipped_long_prompts"]`); a huge one is caught by its characters, before tokenizing."""
    from .rollout import max_chars_per_token

    name = "<stdin>" if source == "-" else source
    records = read_records(source)
    tensors = iter_record_tensors(source) if topk else itertools.repeat(None)
    chars = max_chars_per_token(tokenizer) if context is not None else 1
    seqs, skipped = [], 0
    for i, (rec, t) in enumerate(zip(records, tensors)):
        where = f"{name}: record {i + 1}"
        size = None
        at_least, exact = _length_at_least(rec, chars) if context is not None else (0, False)
        if context is not None and at_least > context:
            size = f"{at_least:,} tokens" if exact else f"more than {context:,} tokens"
        else:
            prompt_ids, completion_ids = record_ids(rec, tokenizer, cfg, where, rows)
            if context is not None and len(prompt_ids) + len(completion_ids) > context:
                size = f"{len(prompt_ids) + len(completion_ids):,} tokens"
        if size is not None:
            if cfg.long_prompts == "error":
                raise UsageError(f"{where}: prompt + completion is {size}, longer than the model's {context:,}-"
                                 "position context (shorten it, or --set long_prompts=skip)")
            skipped += 1
            continue
        if max(prompt_ids) >= vocab:
            raise UsageError(f"{where}: prompt token id {max(prompt_ids)} is past the {vocab} shared head rows")
        end = in_vocab_prefix(completion_ids, vocab)
        if topk:
            if t is None or "completion_ids" not in rec:
                raise UsageError(f"{where}: no top-K tensors for this record")
            if t["topk_ids"].shape[0] != len(completion_ids):
                raise UsageError(f"{where}: {t['topk_ids'].shape[0]} top-K rows for {len(completion_ids)} "
                                 "completion tokens")
            end = min(end, in_vocab_prefix(t["topk_ids"].amax(-1).tolist(), vocab))
        if end == 0:
            continue
        s = Sequence(prompt_ids, completion_ids[:end])
        if topk:
            s.token_data["topk_ids"] = t["topk_ids"][:end]        # int32 as stored: half of int64's memory
            s.token_data["topk_logp"] = t["topk_logprobs"][:end].float()
        seqs.append(s)
    if skipped:
        cu.console.print(f"[yellow]{name}: left out {skipped} of {len(records)} records longer than the "
                         f"{context:,}-position context (long_prompts=skip)[/]")
    if stats is not None:
        stats["skipped_long_prompts"] = stats.get("skipped_long_prompts", 0) + skipped
    if not seqs:
        raise UsageError(f"{name}: no record has a non-empty completion"
                         + (" that fits the model's context" if skipped else ""))
    return seqs


def teacher_of(cfg: KLWarmupConfig) -> str | None:
    """--teacher, and only that: the model a rollout manifest names is information, never a path this
    command reads (a manifest is data, and the directory it names may since hold another model)."""
    return cfg.teacher or None


def check_sampler(cfg: KLWarmupConfig, student_tok) -> None:
    """The sampled and top-K targets are token ids of the model that made the rollouts, whatever
    --teacher says: a rollout artifact records its tokenizer's digest, and the student's must match it
    (for the full target the KL is the --teacher's, checked in `check_pair`)."""
    from .compat import tokenizer_digest

    for src in (cfg.rollouts, cfg.eval_rollouts):
        if src is None or src == "-" or not Path(src).is_dir():
            continue
        manifest = read_manifest(src) or {}
        recorded = manifest.get("tokenizer")
        if recorded is None or recorded == tokenizer_digest(student_tok):
            continue
        producer = (manifest.get("config") or {}).get("model")      # named, as information, never read
        by = f" by {producer}" if isinstance(producer, str) and producer else ""
        raise UsageError(f"{src}: sampled{by} with another tokenizer than the student's (digest {recorded}, the "
                         f"student's {tokenizer_digest(student_tok)}); its token ids are not the student's")


@torch.no_grad()
def token_kl_sum(policy, sequences: list[Sequence], cfg: KLWarmupConfig, *, vocab: int, teacher=None,
                 layout: str = "padded", device=None) -> tuple[float, int]:
    """(sum, count) over completion tokens of the per-token target of `cfg.targets`: CE (sampled), top-K
    forward KL (topk) or exact forward KL to `teacher` (full). Used for the held-out evaluation; runs
    through the (possibly DDP/FSDP-wrapped) `policy`, like training does."""
    total, count = 0.0, 0
    for mb in pack(sequences, cfg.micro_batch_tokens, layout=layout, device=device):
        teacher_h_MH = hidden_at(teacher, mb) if cfg.targets == "full" else None

        def head(h_MH, w_VH, mb=mb, teacher_h_MH=teacher_h_MH):
            w_VH = w_VH[:vocab]
            if cfg.targets == "sampled":
                return -L.chunked_token_logprobs(h_MH, w_VH, mb.targets, chunk_size=cfg.chunk_size,
                                                 temperature=cfg.temperature)[0]
            if cfg.targets == "topk":
                return L.forward_kl_topk(h_MH, w_VH, mb.token_data["topk_ids"], mb.token_data["topk_logp"],
                                         chunk_size=cfg.chunk_size)
            return L.chunked_kl(h_MH, w_VH, teacher_h_MH, teacher.get_output_embeddings().weight,
                                direction="forward", chunk_size=cfg.chunk_size, temperature=cfg.temperature)

        x_M = policy(mb, head)
        total += float(x_M.double().sum())
        count += x_M.numel()
    return total, count


# ----------------------------------------------------------------------------------------------

def run(cfg: KLWarmupConfig):
    from .models import load_tokenizer

    # Everything that can refuse the run happens before the trainer creates the run directory.
    for src in (cfg.rollouts, cfg.eval_rollouts):
        if src is not None and src != "-" and not Path(src).exists():
            raise UsageError(f"{src}: no such file or directory")
    if cfg.targets == "topk":
        for flag, src in (("--rollouts", cfg.rollouts), ("--eval-rollouts", cfg.eval_rollouts)):
            if src is not None and not (src != "-" and Path(src).is_dir() and has_tensors(src, "topk_ids")):
                raise UsageError(f"--targets topk: {src} has no top-K tensors; rerun s2d rollout with --topk K"
                                 + ("" if flag == "--rollouts" else f" (for {flag})"))
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    check_sampler(cfg, tok)
    teacher_ref = teacher_of(cfg)
    served = is_served(teacher_ref)
    if served:   # its tokenizer is checked against the student's once the records are read
        vocab = student_rows = rows = embedding_rows(cfg.student, trust_remote_code=cfg.trust_remote_code)
    elif teacher_ref is not None:
        pair = check_pair(cfg.student, teacher_ref, student_tok=tok,
                          allow_vocab_size_mismatch=cfg.allow_vocab_size_mismatch,
                          trust_remote_code=cfg.trust_remote_code)
        vocab, student_rows = pair.vocab, pair.student_rows
        rows = max(pair.student_rows, pair.teacher_rows)
    else:
        vocab = student_rows = rows = embedding_rows(cfg.student, trust_remote_code=cfg.trust_remote_code)
    topk = cfg.targets == "topk"
    from .rollout import model_context

    contexts = [model_context(m, trust_remote_code=cfg.trust_remote_code) for m in (cfg.student, teacher_ref)
                if m and not is_served(m)]   # a server's context is its own max_model_len
    context = min((c for c in contexts if c is not None), default=None)
    stats: dict = {}
    data = load_sequences(cfg.rollouts, tok, cfg, vocab=vocab, topk=topk, rows=rows, context=context, stats=stats)
    heldout = (load_sequences(cfg.eval_rollouts, tok, cfg, vocab=vocab, topk=topk, rows=rows, context=context)
               if cfg.eval_rollouts else None)
    server_info = None
    if served:
        server = ServedTeacher(teacher_ref, vocab=vocab)
        server_info = {"url": server.url, "model": server.connect()}
        server.check_tokenizer(tok, [tok.decode(s.prompt_ids) for s in data[:TOKENIZER_PROBES]], chat_rendered=True)
    trainer = Trainer(cfg, model=cfg.student, out=cfg.out, kind="kl-warmup", config=asdict(cfg),
                      inputs=[cfg.rollouts, cfg.eval_rollouts, teacher_ref])
    if trainer.complete:
        print(cfg.out)
        return
    if cfg.batch_size % trainer.world:
        raise UsageError(f"--batch-size {cfg.batch_size} must divide evenly over {trainer.world} processes")
    if heldout is not None and trainer.sharded:
        # each rank scores its share in as many forwards as it needs; sharded forwards are collectives
        raise UsageError("--eval-rollouts: not available under FSDP yet (the processes would score unequal "
                         "shares); evaluate out/model afterwards")
    lm = trainer.lm
    check_loaded_rows(lm, student_rows, "student")
    teacher = None
    if cfg.targets == "full":
        teacher = load_teacher(teacher_ref, dtype=trainer.frozen_dtype, device=trainer.device,
                               trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
        check_loaded_rows(teacher, pair.teacher_rows, "teacher")
        trainer.adopt(teacher)
        teacher_weight = teacher.get_output_embeddings().weight
    local = cfg.batch_size // trainer.world
    metric = "ce" if cfg.targets == "sampled" else "forward_kl"

    def heldout_mean() -> float | None:
        if heldout is None:
            return None
        lm.eval()
        mine = heldout[trainer.rank::trainer.world]
        total, count = trainer.all_sum(list(token_kl_sum(trainer.policy, mine, cfg, vocab=vocab, teacher=teacher,
                                                         layout=trainer.layout, device=trainer.device)))
        return total / max(count, 1)

    curve_file = trainer.out / HELDOUT_CURVE
    curve: list[str] = []          # heldout.jsonl's lines; a resumed run keeps those up to its start step
    if cfg.eval_every and trainer.start_step > 0 and curve_file.is_file():
        curve = [line for line in curve_file.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= trainer.start_step]

    def record(step: int, value: float) -> None:
        if cfg.eval_every and trainer.acc.is_main_process:
            curve.append(json.dumps({"step": step, metric: value}))
            _write_atomic(curve_file, "".join(line + "\n" for line in curve).encode())

    start_file = trainer.out / HELDOUT_START
    if trainer.start_step == 0:
        heldout_start = heldout_mean()
        if trainer.acc.is_main_process:
            _write_atomic(start_file, json.dumps({"heldout_kl_start": heldout_start}).encode())
        if heldout_start is not None:
            record(0, heldout_start)
    elif start_file.is_file():
        heldout_start = json.loads(start_file.read_text())["heldout_kl_start"]
    else:   # evaluating the resumed weights would report them as the start
        heldout_start = None
        if heldout is not None and trainer.acc.is_main_process:
            cu.console.print(f"[yellow]{start_file} is missing: the start-of-run held-out value is unknown[/]")

    def make_batch(step: int) -> Batch:
        idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
        mine = [data[i] for i in idx[trainer.rank * local:(trainer.rank + 1) * local]]
        (n_tok,) = trainer.all_sum([sum(len(s.completion_ids) for s in mine)])
        return Batch(mine, {"completion_tokens": int(n_tok), "epoch": (step + 1) * cfg.batch_size / len(data)})

    def loss_fn(policy, mb, info):
        n_tok = info.num_tokens / info.world_size       # global normaliser: micro-batches and processes add up
        if cfg.targets == "sampled":
            logp_M = policy(mb, lambda h, w: L.chunked_token_logprobs(
                h, w[:vocab], mb.targets, chunk_size=cfg.chunk_size, temperature=cfg.temperature)[0])
            loss, _ = L.forward_kl_sampled(mb.to_BT(logp_M), mb.mask_BT(), num_tokens=n_tok)
            return loss, {"ce": -logp_M.detach().mean()}
        if cfg.targets == "topk":
            kl_M = policy(mb, lambda h, w: L.forward_kl_topk(
                h, w[:vocab], mb.token_data["topk_ids"], mb.token_data["topk_logp"], chunk_size=cfg.chunk_size))
        else:
            with torch.no_grad():
                teacher_h_MH = hidden_at(teacher, mb)        # one prefill of the teacher per micro-batch
            # the loss is sum(kl) / n_tok: the fused head computes its gradient during the forward pass
            weight_M = torch.full_like(mb.targets, 1.0 / n_tok, dtype=torch.float32)
            loss, kl_M, _, _ = policy(mb, lambda h, w: L.fused_kl_loss(
                h, w[:vocab], teacher_h_MH, teacher_weight, weight_M, mb.targets, direction="forward",
                chunk_size=cfg.chunk_size, temperature=cfg.temperature))
            return loss, {"forward_kl": kl_M.mean().detach()}
        return kl_M.sum() / n_tok, {"forward_kl": kl_M.detach().mean()}

    def after_update(step: int) -> None:
        # the evaluation draws no random numbers and each step reseeds, so training is the same without it
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            record(step + 1, heldout_mean())

    trainer.fit(make_batch, loss_fn, after_update=after_update, display=(metric, "loss"))
    heldout_end = heldout_mean()
    if heldout_end is not None:
        record(cfg.steps, heldout_end)
    out = trainer.finish(extra={
        "targets": cfg.targets, "teacher": teacher_ref, "vocab": vocab, "num_sequences": len(data),
        "epochs": cfg.steps * cfg.batch_size / len(data), "labels_used": 0,
        "heldout_metric": metric if heldout is not None else None, "heldout_sequences": len(heldout or []),
        "heldout_kl_start": heldout_start, "heldout_kl_end": heldout_end, "teacher_server": server_info,
        "skipped_long_prompts": stats.get("skipped_long_prompts", 0)})
    if heldout is not None and trainer.acc.is_main_process:
        start = "unknown" if heldout_start is None else f"{heldout_start:.4f}"
        cu.console.print(f"held-out {metric}: {start} -> {heldout_end:.4f}")
    print(out)


def command(
    student: StudentOpt = None, teacher: TeacherOpt = None,
    rollouts: str = typer.Option(None, "--rollouts", "-r", help="Teacher sequences: artifact, JSONL or '-'."),
    targets: str = typer.Option(None, "--targets", help="sampled, topk or full."),
    out: cu.RunOutOpt = None,
    steps: int = typer.Option(None, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Sequences per step."),
    temperature: float = typer.Option(None, "--temperature", help="Softmax temperature of the KL."),
    eval_rollouts: str = typer.Option(None, "--eval-rollouts", help="Held-out teacher sequences to score."),
    allow_vocab_size_mismatch: AllowMismatchOpt = None,
    resume: bool = typer.Option(None, "--resume", help="Continue from the newest checkpoint."),
    lora_rank: LoraRankOpt = None,
    seed: cu.SeedOpt = None, force: cu.ForceOpt = None, config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Stage 2a: forward KL from the teacher's sequences to the student (sampled, top-K or full).

    Example: s2d kl-warmup --student runs/tiny --rollouts runs/r1 --targets topk --steps 60 --lr 1e-3 --out runs/kl
    """
    flags = cu.given(student=student, teacher=teacher, rollouts=rollouts, targets=targets, out=out, steps=steps,
                     lr=lr, batch_size=batch_size, temperature=temperature, eval_rollouts=eval_rollouts,
                     allow_vocab_size_mismatch=allow_vocab_size_mismatch, resume=resume, lora_rank=lora_rank,
                     seed=seed, force=force)
    cu.execute(run, lambda: resolve(KLWarmupConfig, config_file=config, sets=set_, flags=flags))
