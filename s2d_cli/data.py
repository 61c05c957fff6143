"""Prompt datasets: bundled eval sets, local files, hub datasets; field mapping; prompt rendering.

Every dataset becomes a list of `Example(id, problem, answer, meta)` — the only shape the rest of s2d
sees. Defaults cover the common layouts (problem/question -> problem; answer -> gold; GSM8K's
`#### N` -> N; MATH's solution -> its last \\boxed{}); `--prompt-field/--answer-field/--id-field`
override them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError, located
from .evalsets import BUNDLED, BUNDLED_DIR
from .verifier import gold_type_error

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_FIELDS = ("problem", "question", "prompt", "input")
ANSWER_FIELDS = ("answer", "gold", "target", "solution")
ID_FIELDS = ("unique_id", "id", "idx")


@dataclass
class Example:
    id: str
    problem: str
    answer: str | None
    meta: dict[str, Any] = field(default_factory=dict)   # subject, level when the data has them


def gold_from_text(value: Any) -> str | None:
    """Gold answer as text: GSM8K `#### N` -> N; a worked solution -> its last \\boxed{}; else as is."""
    if value is None:
        return None
    if isinstance(value, float):  # 27.0 -> "27", 5e-05 -> "0.00005" (str() would give "5e-05": e - 5)
        from .verifier import format_float
        return format_float(value)
    text = str(value)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if "\\boxed" in text or "\\fbox" in text:
        from .verifier import last_boxed
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
    return text.strip()


def _level(value: Any) -> Any:
    if isinstance(value, str):
        m = re.search(r"\d+", value)
        return int(m.group()) if m else value
    return value


def _pick(rec: dict, explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit:
        return explicit
    return next((c for c in candidates if c in rec), None)


def to_examples(records: list[dict], source: str, *, prompt_field: str | None = None,
                answer_field: str | None = None, id_field: str | None = None,
                require_answer: bool = False, where: list[tuple[str, int | None]] | None = None,
                skip_missing_answers: bool = False) -> list[Example]:
    """Examples from records; `where` is each record's (file, line) (else source and position). Ids are
    unique: the id field's value, else the record's position. With `require_answer`, a record without a
    gold answer is an error, or left out (with a count on stderr) when `skip_missing_answers`."""
    examples = []
    seen: dict[str, int] = {}
    skipped = 0
    for i, rec in enumerate(records):
        source, line = where[i] if where else (source, i + 1)
        pf = _pick(rec, prompt_field, PROMPT_FIELDS)
        if pf is None or pf not in rec:
            want = prompt_field or " or ".join(PROMPT_FIELDS)
            raise located(source, line, f"missing field {want!r} (set --prompt-field)")
        if not isinstance(rec[pf], str) or not rec[pf].strip():
            raise located(source, line, f"field {pf!r}: expected non-empty text")
        af = _pick(rec, answer_field, ANSWER_FIELDS)
        if af and rec.get(af) is not None:
            problem = gold_type_error(rec[af])
            if problem:
                raise located(source, line, f"field {af!r}: {problem}")
        answer = gold_from_text(rec.get(af)) if af else None
        if answer_field and answer_field not in rec:
            raise located(source, line, f"missing field {answer_field!r}")
        if require_answer and not answer:
            if skip_missing_answers:
                skipped += 1
                continue
            raise located(source, line, f"no gold answer (expected one of {', '.join(ANSWER_FIELDS)}; "
                                        "set --answer-field, or --set missing_answer=skip)")
        if id_field and rec.get(id_field) is None:
            raise located(source, line, f"missing field {id_field!r} (--id-field)")
        idf = _pick(rec, id_field, ID_FIELDS)
        ex_id = str(rec[idf]) if idf and rec.get(idf) is not None else str(i)
        if ex_id in seen:   # one id, two prompts: their samples would pool into one group of the metrics
            raise located(source, line, f"id {ex_id!r} again (first at record {seen[ex_id] + 1}): prompt ids "
                                        "must be unique (set --id-field, or leave ids out to number records)")
        seen[ex_id] = i
        meta = {}
        if "subject" in rec or "type" in rec:
            meta["subject"] = rec.get("subject", rec.get("type"))
        if "level" in rec:
            meta["level"] = _level(rec["level"])
        examples.append(Example(ex_id, rec[pf], answer, meta))
    if skipped:
        from .cliutil import console
        console.print(f"[yellow]{source}: left out {skipped} of {len(records)} records with no gold answer "
                      "(missing_answer=skip)[/]")
    if not examples:
        raise UsageError(f"{source}: no record has a gold answer")
    return examples


def load_examples(dataset: str, *, split: str = "test", limit: int | None = None,
                  prompt_field: str | None = None, answer_field: str | None = None,
                  id_field: str | None = None, require_answer: bool = False,
                  skip_missing_answers: bool = False) -> list[Example]:
    """`dataset`: a bundled name, `toy:...` (the synthetic task), a local JSONL/JSON/Parquet file or
    artifact directory, `-` for stdin, or a Hugging Face dataset id (loaded with `datasets`)."""
    from .artifacts import read_located

    where = None
    if dataset in BUNDLED:
        source = str(BUNDLED_DIR / BUNDLED[dataset])
        records, where = read_located(source)
    elif dataset == "toy" or dataset.startswith("toy:"):
        from .toy import toy_records
        source, records = dataset, toy_records(dataset)
    elif dataset == "-" or Path(dataset).exists():
        source = dataset if dataset != "-" else "<stdin>"
        records, where = read_located(dataset)
    elif Path(dataset).suffix.lower() in (".jsonl", ".json", ".parquet"):   # a file name, not a hub id
        raise UsageError(f"{dataset}: no such file")
    elif dataset.count("/") == 1 and not dataset.startswith((".", "/")):
        source, records = dataset, _load_hub(dataset, split)
    else:
        names = ", ".join(BUNDLED)
        raise UsageError(f"--dataset {dataset!r}: not a bundled name ({names}, toy), a local file, "
                         "or a hub id")
    if limit is not None:
        records = records[:limit]
        where = where[:limit] if where else None
    if not records:
        raise UsageError(f"{source}: empty (no records)")
    return to_examples(records, source, prompt_field=prompt_field, answer_field=answer_field,
                       id_field=id_field, require_answer=require_answer, where=where,
                       skip_missing_answers=skip_missing_answers)


def _load_hub(name: str, split: str) -> list[dict]:  # pragma: no cover - needs the hub
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise UsageError(f"--dataset {name!r}: could not load from the hub ({str(e).splitlines()[0]})") from None
    return [dict(r) for r in ds]


def render_prompt(tokenizer, problem: str, *, instruction: str = DEFAULT_INSTRUCTION, chat: str = "auto",
                  enable_thinking: bool | None = None) -> str:
    """The text fed to the model. chat: "auto" (the chat template when the tokenizer has one),
    "chat", or "plain" (base models: problem, then the instruction)."""
    content = f"{problem}\n{instruction}" if instruction else problem
    use_chat = chat == "chat" or (chat == "auto" and getattr(tokenizer, "chat_template", None))
    if chat == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat chat: the tokenizer has no chat template (use --chat plain)")
    if not use_chat:
        return content + "\n"
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, **kwargs)


def encode_prompt(tokenizer, text: str, *, chat_rendered: bool) -> list[int]:
    """Token ids of a rendered prompt; the chat template already carries any BOS it wants."""
    return tokenizer(text, add_special_tokens=not chat_rendered)["input_ids"]


def prompt_is_chat(tokenizer, chat: str) -> bool:
    return chat == "chat" or (chat == "auto" and bool(getattr(tokenizer, "chat_template", None)))
