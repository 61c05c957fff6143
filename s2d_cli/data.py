"""Prompt datasets: bundled eval sets, local files, hub datasets; field mapping; prompt rendering.

Every dataset becomes a list of `Example(id, problem, answer, meta)` — the only shape the rest of s2d
sees. `--dataset` takes:

    math500, aime24, aime25, amc23, gsm8k     bundled test sets
    toy:split=train,n=500                     the synthetic task (s2d toy)
    problems.jsonl, .json, .parquet, '-'      a file, or JSONL on stdin
    runs/r1                                   an s2d artifact
    data/gsm8k                                a `save_to_disk` folder, or a hub-style folder of parquet files
    openai/gsm8k:main                         a hub dataset, with its subset (config name)
    openai/gsm8k:main,split=test              ... and a split (else the `split` key: test for eval,
                                              train for rollout, grpo and opd)

A subset and a split apply to hub datasets and dataset folders alike (`data/gsm8k:main`). Defaults cover the common layouts (problem/question -> problem; answer -> gold; GSM8K's
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


def load_examples(dataset: str, *, split: str = "train", limit: int | None = None,
                  prompt_field: str | None = None, answer_field: str | None = None,
                  id_field: str | None = None, require_answer: bool = False,
                  skip_missing_answers: bool = False) -> list[Example]:
    """`dataset`: a bundled name, `toy:...` (the synthetic task), a local JSONL/JSON/Parquet file or
    artifact directory, `-` for stdin, a dataset folder, or a Hugging Face dataset id (loaded with
    `datasets`); folders and hub ids take `:SUBSET` and `,split=NAME` (module docstring)."""
    from .artifacts import read_located

    where = None
    if dataset in BUNDLED:
        source = str(BUNDLED_DIR / BUNDLED[dataset])
        records, where = read_located(source)
    elif dataset == "toy" or dataset.startswith("toy:"):
        from .toy import toy_records
        source, records = dataset, toy_records(dataset)
    elif dataset_folder(split_spec(dataset, split)[0]):
        name, subset, split = split_spec(dataset, split)
        source, records = dataset, _load_folder(Path(name), subset, split)
    elif dataset == "-" or Path(dataset).exists():
        source = dataset if dataset != "-" else "<stdin>"
        records, where = read_located(dataset)
    elif Path(split_spec(dataset, split)[0]).suffix.lower() in (".jsonl", ".json", ".parquet"):   # a file name
        name = split_spec(dataset, split)[0]
        if Path(name).exists():
            raise UsageError(f"--dataset {dataset!r}: a subset or split applies to hub datasets and dataset "
                             f"folders, not to the file {name}")
        raise UsageError(f"{name}: no such file")
    elif _hub_id(split_spec(dataset, split)[0]):
        name, subset, split = split_spec(dataset, split)
        source, records = dataset, _load_hub(name, subset, split)
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


def split_spec(dataset: str, split: str) -> tuple[str, str | None, str]:
    """`NAME[:SUBSET][,split=SPLIT]` -> (NAME, SUBSET or None, SPLIT or `split`). Pieces after the colon are
    comma-separated: a bare one is the subset (a hub dataset's config name), `split=` the split
    (`subset=` is the subset too). A path that exists is a name as it is, colon and all."""
    if dataset == "-" or ":" not in dataset or Path(dataset).exists():
        return dataset, None, split
    name, _, rest = dataset.partition(":")
    subset = None
    for piece in (p.strip() for p in rest.split(",")):
        if not piece:
            continue
        key, eq, value = piece.partition("=")
        key = key.strip().lower()
        if not eq:
            if subset is not None:
                raise UsageError(f"--dataset {dataset!r}: {piece!r}: expected split=NAME (the subset is {subset!r})")
            subset = piece
        elif key == "split" and value.strip():
            split = value.strip()
        elif key in ("subset", "name", "config") and value.strip():
            subset = value.strip()
        else:
            raise UsageError(f"--dataset {dataset!r}: {piece!r}: expected a subset name, split=NAME or subset=NAME")
    return name, subset, split


def _hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def dataset_folder(name: str) -> bool:
    """A folder `datasets` reads, not an s2d artifact: a `save_to_disk` folder, or one holding parquet files
    (a hub dataset's repository layout: data/train-00000-of-00001.parquet, main/test-*.parquet, ...)."""
    path = Path(name)
    if name == "-" or not path.is_dir() or (path / "manifest.json").is_file():
        return False
    if any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        return True
    return next(path.rglob("*.parquet"), None) is not None


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _rows(ds) -> list[dict]:
    return [dict(r) for r in ds]


def _load_folder(path: Path, subset: str | None, split: str) -> list[dict]:
    """Records of a local dataset folder (see `dataset_folder`): its `split`, of `subset` where it has
    several (declared in its README.md's `configs`, or one folder per subset as openai/gsm8k lays them out)."""
    datasets = _quiet_datasets()
    if any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        if subset is not None:
            raise UsageError(f"{path}: a save_to_disk folder has no subsets (got {subset!r})")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise UsageError(f"{path}: not a readable save_to_disk folder ({_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UsageError(f"{path}: no split {split!r} (it has {', '.join(ds)}; --set split=NAME or "
                                 f"--dataset {path}:split=NAME)")
            ds = ds[split]
        return _rows(ds)
    target, name = path, subset
    if subset is not None and (path / subset).is_dir() and "configs:" not in _readme(path):
        target, name = path / subset, None
    elif subset is None:
        subsets = sorted(p.name for p in path.iterdir() if p.is_dir() and next(p.glob("*.parquet"), None))
        if len(subsets) > 1 and not list(path.glob("*.parquet")) and "configs:" not in _readme(path):
            raise UsageError(f"{path}: holds several subsets ({', '.join(subsets)}): name one, e.g. "
                             f"--dataset {path}:{subsets[0]}")
    try:
        ds = datasets.load_dataset(str(target), name=name, split=split)
    except Exception as e:
        raise UsageError(f"{path}: could not load split {split!r}{f' of subset {subset!r}' if subset else ''} "
                         f"({_first_line(e)})") from None
    return _rows(ds)


def _readme(path: Path) -> str:
    try:
        return (path / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _load_hub(name: str, subset: str | None, split: str) -> list[dict]:
    """A hub dataset's split (of `subset`), through `datasets` (downloaded once into its cache)."""
    datasets = _quiet_datasets()
    try:
        ds = datasets.load_dataset(name, name=subset, split=split)
    except Exception as e:
        what = f"{name!r}" + (f", subset {subset!r}" if subset else "") + f", split {split!r}"
        raise UsageError(f"--dataset {what}: could not load from the hub ({_first_line(e)})") from None
    return _rows(ds)


def render_prompt(tokenizer, problem: str, *, instruction: str = DEFAULT_INSTRUCTION, chat: str = "auto",
                  enable_thinking: bool | None = None) -> str:
    """The text fed to the model. chat: "auto" (the chat template when the tokenizer has one),
    "chat", or "plain" (base models: problem, then the instruction)."""
    content = f"{problem}\n{instruction}" if instruction else problem
    use_chat = chat == "chat" or (chat == "auto" and getattr(tokenizer, "chat_template", None))
    if chat == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UsageError("chat=chat: the tokenizer has no chat template (use --set chat=plain)")
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
