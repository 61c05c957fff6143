"""s2d rollout — sample completions for a prompt set and write them as an artifact.

    s2d rollout --model runs/teacher --dataset math500 --n 4 --max-new-tokens 1024 --out runs/r1
    s2d rollout --model runs/teacher --dataset toy --topk 20 --out runs/teacher-rollouts   # for kl-warmup
    s2d rollout --model M --dataset gsm8k --limit 8 --out - | s2d verify - --out -

One record per (prompt, sample): id, sample, prompt, completion, answer, finish_reason,
completion_ids, logprobs (with --logprobs), model. With --topk K the top-K logprobs of every
completion token are stored as safetensors beside each shard. Work is sharded by prompts
(--set shard_size=N); a killed run resumes at the first unfinished shard, and shard i is always
sampled with seed + i so a resumed run writes what an uninterrupted one would have.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import typer

from . import cliutil as cu
from .artifacts import ArtifactWriter, check_shard_size, pack_token_tensors, shard_slices
from .compat import embedding_rows, tokenizer_digest
from .config import resolve
from .data import DEFAULT_INSTRUCTION, Example, encode_prompt, load_examples, prompt_is_chat, render_prompt
from .engines import Completion, SamplingConfig
from .errors import UsageError


@dataclass
class PromptFields:
    """Where prompts come from and how they are rendered (shared by rollout, eval, grpo and opd)."""
    dataset: str = ""                       # bundled name, toy, local file, '-' or hub id
    split: str = "train"                    # split of a hub dataset or dataset folder (eval: test)
    limit: int | None = None                # first N prompts only
    prompt_field: str | None = None         # default: problem / question / prompt / input
    answer_field: str | None = None         # default: answer / gold / target / solution (last \boxed{})
    id_field: str | None = None             # default: unique_id / id / idx / line number
    chat: str = "auto"                      # auto | chat | plain (base models)
    instruction: str = DEFAULT_INSTRUCTION  # appended to every problem
    enable_thinking: bool | None = None     # Qwen3 thinking mode on/off (None: the template's default)
    # where a gold answer is needed (grpo, eval, opd --alpha): "error" refuses a record without one,
    # "skip" leaves it out and says how many (MATH train has two solutions with an empty \boxed{})
    missing_answer: str = "error"
    # a prompt longer than the model's context minus max_new_tokens: "error" refuses it naming the
    # record, "skip" leaves it out and counts it (stderr, and skipped_long_prompts in the manifest)
    long_prompts: str = "error"


@dataclass
class SamplingFields:
    n: int = 1                       # samples per prompt
    max_new_tokens: int = 1024       # completion budget
    temperature: float = 1.0         # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    backend: str = "auto"            # auto | hf | vllm
    dtype: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    batch_size: int = 64             # hf backend: sequences per generate call
    tensor_parallel_size: int = 1    # vllm backend: GPUs one engine shards the model over
    gpu_memory_utilization: float = 0.85   # vllm backend: share of each GPU's memory the engine takes
    max_model_len: int | None = None # vllm backend: longest prompt + completion (default: the model's)
    trust_remote_code: bool = False


@dataclass
class RolloutConfig(PromptFields, SamplingFields):
    model: str = ""                  # checkpoint directory or hub id
    out: str = "-"                   # artifact directory, or '-' for JSONL on stdout
    logprobs: bool = False           # store the sampled token's logprob per completion token
    topk: int = 0                    # store top-K logprobs per completion token (safetensors)
    shard_size: int = 64             # prompts per shard: the unit of resume
    force: bool = False

    def validate(self) -> None:
        if not self.model:
            raise UsageError("missing required option --model")
        if not self.dataset:
            raise UsageError("missing required option --dataset")
        check_sampling(self)
        check_shard_size(self.shard_size)
        if self.topk < 0:
            raise UsageError(f"--topk: expected >= 0, got {self.topk}")
        if self.topk and self.out == "-":
            raise UsageError("--topk stores tensors and needs a directory --out, not '-'")


def check_sampling(cfg: SamplingFields) -> None:
    if cfg.n < 1:
        raise UsageError(f"--n: expected >= 1, got {cfg.n}")
    if cfg.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: expected >= 1, got {cfg.max_new_tokens}")
    if cfg.top_k != -1 and cfg.top_k < 1:
        raise UsageError(f"--top-k: expected -1 (off) or >= 1, got {cfg.top_k}")
    if cfg.batch_size < 1:
        raise UsageError(f"batch_size: expected >= 1, got {cfg.batch_size}")
    if cfg.tensor_parallel_size < 1:
        raise UsageError(f"tensor_parallel_size: expected >= 1, got {cfg.tensor_parallel_size}")
    limit = getattr(cfg, "limit", None)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit: expected >= 1, got {limit}")
    if hasattr(cfg, "rollout_server"):       # grpo/opd: also an `s2d rollout-server` (--backend server)
        if cfg.backend not in ("auto", "hf", "vllm", "server"):
            raise UsageError(f"--backend: expected auto, hf, vllm or server, got {cfg.backend!r}")
        if cfg.weight_backend not in ("auto", "gloo", "nccl"):      # engines.weight_group.BACKENDS
            raise UsageError(f"weight_backend: expected auto, gloo or nccl, got {cfg.weight_backend!r}")
    elif cfg.backend not in ("auto", "hf", "vllm"):
        raise UsageError(f"--backend: expected auto, hf or vllm, got {cfg.backend!r}")


def sampling_config(cfg: SamplingFields, *, seed: int, logprobs: bool = False, topk: int = 0,
                    n: int | None = None) -> SamplingConfig:
    return SamplingConfig(n=n or cfg.n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, seed=seed, logprobs=logprobs, topk=topk)


def load_prompts(cfg: PromptFields, *, require_answer: bool = False) -> list[Example]:
    if cfg.missing_answer not in ("error", "skip"):
        raise UsageError(f"missing_answer: expected error or skip, got {cfg.missing_answer!r}")
    return load_examples(cfg.dataset, split=cfg.split, limit=cfg.limit, prompt_field=cfg.prompt_field,
                         answer_field=cfg.answer_field, id_field=cfg.id_field, require_answer=require_answer,
                         skip_missing_answers=cfg.missing_answer == "skip")


def model_context(model: str, *, max_model_len: int | None = None, trust_remote_code: bool = False) -> int | None:
    """Positions the model can attend over: its config's max_position_embeddings (vLLM's max_model_len
    where that is set lower); None when the config names no limit."""
    from transformers import AutoConfig

    from .models import check_model_ref

    try:
        config = AutoConfig.from_pretrained(check_model_ref(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"{model}: could not load config ({(str(e).splitlines() or [''])[0][:200]})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [n for n in (getattr(text, "max_position_embeddings", None), max_model_len)
              if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on the characters of text one token stands for: the longest vocabulary entry (a
    byte-level entry has one character per byte, a byte-fallback one like <0xE2> more than its text),
    doubled for normalisers that drop characters. A text of more than `tokens * this` characters is
    longer than `tokens` tokens without tokenizing it: a 6 MB prompt is refused in milliseconds."""
    cached = getattr(tokenizer, "_s2d_max_chars_per_token", None)
    if cached is None:
        cached = 2 * max((len(t) for t in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._s2d_max_chars_per_token = cached
        except AttributeError:  # pragma: no cover - a tokenizer that takes no attributes
            pass
    return cached


def check_long_prompts(cfg: PromptFields | SamplingFields, examples: list[Example], tokenizer, context: int | None,
                       source: str, memo: dict | None = None) -> tuple[list[Example], int]:
    """(the examples whose rendered prompt fits `context - max_new_tokens` tokens, how many did not).

    A prompt that does not fit is an error naming it (`long_prompts: error`) or left out and counted
    (`long_prompts: skip`). Lengths are bounded by characters first (`max_chars_per_token`), so a huge
    prompt is never rendered nor tokenized; the ones that are tokenized go into `memo` (the memo of
    `encode_examples`), so no prompt is tokenized twice."""
    if cfg.long_prompts not in ("error", "skip"):
        raise UsageError(f"long_prompts: expected error or skip, got {cfg.long_prompts!r}")
    if context is None:
        return examples, 0
    room = context - cfg.max_new_tokens
    if room < 1:
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens}: the model's context is {context} positions, "
                         "which leaves no room for a prompt")
    bound = room * max_chars_per_token(tokenizer)
    memo = {} if memo is None else memo
    kept = []
    for ex in examples:
        if len(ex.problem) > bound:          # too long for certain: not even rendered
            size = f"{len(ex.problem):,} characters, more than {room:,} tokens hold"
        else:
            encode_examples(tokenizer, [ex], cfg, memo)
            n = len(memo[ex.problem][1])
            if n <= room:
                kept.append(ex)
                continue
            size = f"{n:,} tokens"
        if cfg.long_prompts == "error":
            raise UsageError(f"{source}: prompt {ex.id!r} is {size}; the model's {context:,}-position context "
                             f"minus max_new_tokens {cfg.max_new_tokens:,} leaves {room:,} (shorten it, lower "
                             "--max-new-tokens, or --set long_prompts=skip)")
    skipped = len(examples) - len(kept)
    if skipped:
        cu.console.print(f"[yellow]{source}: left out {skipped} of {len(examples)} prompts longer than "
                         f"{room:,} tokens (the context minus max_new_tokens; long_prompts=skip)[/]")
    if not kept:
        raise UsageError(f"{source}: every prompt is longer than {room:,} tokens (the model's {context:,}-position "
                         f"context minus max_new_tokens {cfg.max_new_tokens:,})")
    return kept, skipped


def load_fitting_prompts(cfg: PromptFields, model: str, tokenizer=None, *, require_answer: bool = False,
                         memo: dict | None = None) -> tuple[list[Example], int]:
    """`load_prompts`, then `check_long_prompts` against `model`'s context: (examples, skipped)."""
    from .models import load_tokenizer

    examples = load_prompts(cfg, require_answer=require_answer)
    if tokenizer is None:
        tokenizer = load_tokenizer(model, trust_remote_code=cfg.trust_remote_code)
    context = model_context(model, max_model_len=getattr(cfg, "max_model_len", None),
                            trust_remote_code=cfg.trust_remote_code)
    source = "<stdin>" if cfg.dataset == "-" else cfg.dataset
    return check_long_prompts(cfg, examples, tokenizer, context, source, memo)


def encode_examples(tokenizer, examples: list[Example], cfg: PromptFields,
                    memo: dict | None = None) -> tuple[list[str], list[list[int]]]:
    """Rendered prompt texts and their token ids. `memo` (a dict kept by the caller): each distinct
    problem is rendered and tokenized once (a training run meets its prompts again every epoch, and the
    chat template costs a tiny model's step milliseconds)."""
    chat = prompt_is_chat(tokenizer, cfg.chat)
    memo = {} if memo is None else memo
    for ex in examples:
        if ex.problem not in memo:
            text = render_prompt(tokenizer, ex.problem, instruction=cfg.instruction, chat=cfg.chat,
                                 enable_thinking=cfg.enable_thinking)
            memo[ex.problem] = (text, encode_prompt(tokenizer, text, chat_rendered=chat))
    return [memo[ex.problem][0] for ex in examples], [list(memo[ex.problem][1]) for ex in examples]


def completion_records(examples: list[Example], texts: list[str], groups: list[list[Completion]],
                       model_name: str, *, logprobs: bool, prompt_ids: list[list[int]] | None = None) -> list[dict]:
    """Flatten engine output into rollout records: one per (prompt, sample)."""
    records = []
    for p, (ex, text, group) in enumerate(zip(examples, texts, groups)):
        for j, c in enumerate(group):
            rec = {"id": ex.id, "sample": j, "prompt": text, "completion": c.text, "answer": ex.answer,
                   "finish_reason": c.finish_reason, "completion_ids": c.token_ids, "model": model_name}
            if prompt_ids is not None:
                rec["prompt_ids"] = prompt_ids[p]
            if logprobs:
                rec["logprobs"] = c.logprobs
            rec.update({k: v for k, v in ex.meta.items() if v is not None})
            records.append(rec)
    return records


def topk_tensors(groups: list[list[Completion]]) -> dict[str, torch.Tensor]:
    per_record = []
    for group in groups:
        for c in group:
            per_record.append({"topk_ids": torch.tensor(c.topk_ids, dtype=torch.int32).reshape(len(c.token_ids), -1),
                               "topk_logprobs": torch.tensor(c.topk_logprobs, dtype=torch.float32)
                               .reshape(len(c.token_ids), -1)})
    return pack_token_tensors(per_record)


VLLM_MAX_LOGPROBS = 64     # vLLM's default cap on logprobs per token; --topk above it raises the cap


def resolved_backend(backend: str) -> str:
    from .engines import auto_backend
    return auto_backend() if backend == "auto" else backend


def open_engine(cfg: SamplingFields, model: str, tokenizer, *, topk: int = 0):
    """The engine `cfg.backend` names ("auto": vLLM when importable), with the options of that backend:
    batch_size for hf (it used to be dropped when "auto" chose hf), a logprobs cap for --topk on vLLM."""
    from .engines import make_engine
    backend = resolved_backend(cfg.backend)
    extra = {"batch_size": cfg.batch_size} if backend == "hf" else {
        "max_logprobs": max(VLLM_MAX_LOGPROBS, topk), "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization, "max_model_len": cfg.max_model_len}
    return make_engine(backend, model, tokenizer=tokenizer, seed=cfg.seed, dtype=cfg.dtype,
                       trust_remote_code=cfg.trust_remote_code, **extra)


def run(cfg: RolloutConfig) -> Path | None:
    from .models import check_model_ref, load_tokenizer

    check_model_ref(cfg.model)  # bad input fails before the output (or its staging dir) exists
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    memo: dict = {}
    examples, skipped = load_fitting_prompts(cfg, cfg.model, tokenizer, memo=memo)
    if cfg.topk:
        rows = embedding_rows(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if cfg.topk > rows:
            raise UsageError(f"--topk: expected at most the model's {rows} vocabulary rows, got {cfg.topk}")
    slices = shard_slices(len(examples), cfg.shard_size)
    writer = ArtifactWriter(cfg.out, kind="rollout", config=asdict(cfg), num_shards=len(slices),
                            inputs=[cfg.dataset, cfg.model], force=cfg.force)
    todo = writer.pending()
    if todo:
        engine = open_engine(cfg, cfg.model, tokenizer, topk=cfg.topk)
        if writer.num_done():
            cu.console.print(f"[dim]resuming: {writer.num_done()}/{len(slices)} shards already written[/]")
        with cu.progress() as bar:
            task = bar.add_task("rollout", total=len(examples), completed=sum(len(slices[i]) for i in range(len(slices)) if i not in todo))
            for i in todo:
                shard = [examples[j] for j in slices[i]]
                texts, ids = encode_examples(tokenizer, shard, cfg, memo)
                groups = engine.generate(ids, sampling_config(cfg, seed=cfg.seed + i, logprobs=cfg.logprobs,
                                                              topk=cfg.topk))
                records = completion_records(shard, texts, groups, cfg.model, logprobs=cfg.logprobs, prompt_ids=ids)
                writer.write_shard(i, records, topk_tensors(groups) if cfg.topk else None)
                bar.advance(task, len(shard))
        engine.close()
    # the tokenizer's digest: kl-warmup checks a student against the model that sampled these targets
    out = writer.commit(extra={"num_prompts": len(examples), "skipped_long_prompts": skipped,
                               "tokenizer": tokenizer_digest(tokenizer)})
    if out is not None:
        print(out)
    return out


def command(
    model: cu.ModelOpt = None, dataset: cu.DatasetOpt = None, out: cu.OutOpt = None, n: cu.NOpt = None,
    max_new_tokens: cu.MaxNewOpt = None, temperature: cu.TempOpt = None, top_p: cu.TopPOpt = None,
    top_k: cu.TopKOpt = None, seed: cu.SeedOpt = None, limit: cu.LimitOpt = None, backend: cu.BackendOpt = None,
    prompt_field: cu.PromptFieldOpt = None, answer_field: cu.AnswerFieldOpt = None, id_field: cu.IdFieldOpt = None,
    topk: int = typer.Option(None, "--topk", help="Store the top-K logprobs of every completion token."),
    logprobs: bool = typer.Option(None, "--logprobs", help="Store the sampled tokens' logprobs."),
    force: cu.ForceOpt = None, config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Sample completions for a prompt set.

    Example: s2d rollout --model runs/grpo/model --dataset toy:split=pool --n 2 --max-new-tokens 64 --topk 16 --out runs/r1
    """
    flags = cu.given(model=model, dataset=dataset, out=out, n=n, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, limit=limit, backend=backend,
                     prompt_field=prompt_field, answer_field=answer_field, id_field=id_field,
                     topk=topk, logprobs=logprobs, force=force)
    cu.execute(run, lambda: resolve(RolloutConfig, config_file=config, sets=set_, flags=flags))
