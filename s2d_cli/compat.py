"""Teacher/student compatibility, checked by kl-warmup and opd before they load a model or write a file.

    s2d kl-warmup --student Qwen/Qwen3-1.7B --teacher runs/teacher-grpo/model ...     # checked first
    s2d opd --student S --teacher T --allow-vocab-size-mismatch ...                   # rows may differ

Both dense losses compare the two models' distributions token id by token id, so the ids must mean
the same thing on both sides. `check_pair` refuses, with one line naming the first difference:

  - tokenizer vocabularies: every id either tokenizer can produce (0 .. len(tokenizer) - 1) must map to
    the same token string in both; a token only one side has is a difference too (the other side could
    not represent it);
  - special tokens: eos and pad (string and id);
  - chat templates: the teacher's rollouts were rendered with its template, the student is trained and
    sampled with its own;
  - embedding rows: each model needs a row for every id its tokenizer can produce, and the two models'
    row counts (`config.vocab_size`) must be equal unless `--allow-vocab-size-mismatch` is given.

Row counts differ between members of a family that pad their embedding matrix to different multiples
(Qwen2.5-0.5B has 151,936 rows, Qwen2.5-7B 152,064, for the same 151,665-token tokenizer; Qwen3 pads
151,669 tokens to 151,936). The rows past the tokenizer are never produced by it, so with the flag
every KL uses the first V = min(V_student, V_teacher) rows of both heads and renormalises over them
(`losses.chunked_kl` slices the teacher's head; the commands slice the student's); a sampled or stored
token id >= V (possible only from an untrained padding row) ends that completion there. One exception:
kl-warmup's `--targets topk` reads top-K log-probs stored by `s2d rollout`, normalised over all the
teacher's rows, so the teacher's mass on its rows past V counts in the tail bucket rather than being
renormalised away (about 0 for trained checkpoints, whose padding rows are never likely; use
`--targets full` where it is not).

`load_teacher` loads the teacher frozen (eval mode, requires_grad False) for both commands.

Left out: mapping between different tokenizers (cross-tokenizer distillation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from .errors import UsageError


@dataclass
class PairInfo:
    """What the commands need to know once a pair is accepted."""
    vocab: int            # V: rows of both heads the KLs use, min(student_rows, teacher_rows)
    student_rows: int
    teacher_rows: int
    tokenizer_size: int   # len(tokenizer), the same on both sides


def id_to_token(tokenizer) -> list[str | None]:
    """Token string of every id the tokenizer can produce (added tokens included), index = id."""
    table: list[str | None] = [None] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if 0 <= i < len(table):
            table[i] = token
    return table


def first_vocab_difference(student_tok, teacher_tok) -> tuple[int, str | None, str | None] | None:
    """(id, student token, teacher token) of the lowest id the two tokenizers disagree on, else None.
    A None token means that side has no token with that id."""
    s, t = id_to_token(student_tok), id_to_token(teacher_tok)
    for i in range(max(len(s), len(t))):
        a = s[i] if i < len(s) else None
        b = t[i] if i < len(t) else None
        if a != b:
            return i, a, b
    return None


def tokenizer_digest(tok) -> str:
    """What `check_tokenizers` compares, as one hash: the id -> token table, eos and pad, the chat
    template. A rollout artifact records it, so kl-warmup can check the student against the model that
    sampled its targets even when that model is not at hand."""
    import hashlib
    import json

    parts = [id_to_token(tok), [tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id],
             getattr(tok, "chat_template", None)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def embedding_rows(model_ref: str, *, trust_remote_code: bool = False) -> int:
    """Rows of the model's embedding / lm head, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    from .models import check_model_ref

    try:
        config = AutoConfig.from_pretrained(check_model_ref(model_ref), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UsageError(f"{model_ref}: could not load config ({str(e).splitlines()[0]})") from e
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def _show(token: str | None) -> str:
    return "(none)" if token is None else repr(token)


def check_tokenizers(student_tok, teacher_tok) -> None:
    """Vocabularies, special tokens and chat templates; one UsageError naming the first difference."""
    diff = first_vocab_difference(student_tok, teacher_tok)
    if diff is not None:
        i, a, b = diff
        raise UsageError(f"student and teacher tokenizers differ at token id {i}: student {_show(a)}, "
                         f"teacher {_show(b)} (sizes {len(student_tok)} and {len(teacher_tok)}); "
                         "dense KLs need one shared vocabulary")
    for name in ("eos", "pad"):
        a = (getattr(student_tok, f"{name}_token"), getattr(student_tok, f"{name}_token_id"))
        b = (getattr(teacher_tok, f"{name}_token"), getattr(teacher_tok, f"{name}_token_id"))
        if a != b:
            raise UsageError(f"student and teacher {name} tokens differ: student {a[0]!r} (id {a[1]}), "
                             f"teacher {b[0]!r} (id {b[1]})")
    a, b = getattr(student_tok, "chat_template", None), getattr(teacher_tok, "chat_template", None)
    if a != b:
        if a is None or b is None:
            where = f"only the {'teacher' if a is None else 'student'} has one"
        else:
            lines_a, lines_b = str(a).splitlines(), str(b).splitlines()
            line = next((k for k, (x, y) in enumerate(zip(lines_a, lines_b)) if x != y),
                        min(len(lines_a), len(lines_b)))
            where = f"first difference on line {line + 1}"
        raise UsageError(f"student and teacher chat templates differ ({where}); the student must see "
                         "prompts rendered as the teacher saw them")


def check_rows(tokenizer_size: int, student_rows: int, teacher_rows: int, *,
               allow_vocab_size_mismatch: bool) -> int:
    """The number of head rows the KLs use, or a UsageError. Pure: takes counts, not models."""
    for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < tokenizer_size:
            raise UsageError(f"the {who} model has {rows} embedding rows but its tokenizer produces ids up to "
                             f"{tokenizer_size - 1}")
    if student_rows != teacher_rows and not allow_vocab_size_mismatch:
        raise UsageError(f"student and teacher vocabulary sizes differ ({student_rows} and {teacher_rows} "
                         f"embedding rows) although their tokenizers agree on all {tokenizer_size} ids; pass "
                         f"--allow-vocab-size-mismatch to compare the first {min(student_rows, teacher_rows)} rows")
    return min(student_rows, teacher_rows)


def check_pair(student: str, teacher: str, *, student_tok=None, teacher_tok=None,
               allow_vocab_size_mismatch: bool = False, trust_remote_code: bool = False) -> PairInfo:
    """Everything above for two checkpoints (directories or hub ids); loads tokenizers and configs only."""
    from .models import load_tokenizer

    student_tok = student_tok or load_tokenizer(student, trust_remote_code=trust_remote_code)
    teacher_tok = teacher_tok or load_tokenizer(teacher, trust_remote_code=trust_remote_code)
    check_tokenizers(student_tok, teacher_tok)
    s_rows = embedding_rows(student, trust_remote_code=trust_remote_code)
    t_rows = embedding_rows(teacher, trust_remote_code=trust_remote_code)
    vocab = check_rows(len(student_tok), s_rows, t_rows, allow_vocab_size_mismatch=allow_vocab_size_mismatch)
    return PairInfo(vocab=vocab, student_rows=s_rows, teacher_rows=t_rows, tokenizer_size=len(student_tok))


def check_loaded_rows(model, expected: int, who: str) -> None:
    """The loaded model's head has the rows its config promised (a custom head could differ)."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows != expected:
        raise UsageError(f"the {who} model's lm head has {rows} rows, its config says {expected}")


def load_teacher(ref: str, *, dtype, device, trust_remote_code: bool = False, attn_implementation: str | None = None):
    """The frozen teacher: eval mode and no parameter that requires a gradient, so autograd never stores
    a .grad for it (and it is never handed to an optimizer). Callers run it under torch.no_grad()."""
    from .models import check_plain_head, load_model

    teacher = load_model(ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         attn_implementation=attn_implementation)
    check_plain_head(teacher, ref)
    return teacher.eval().requires_grad_(False)


def token_ids(value, where: str, field: str, *, vocab: int | None = None, nonempty: bool = False) -> list[int]:
    """A record's token-id list, checked: a list of non-negative integers (below `vocab` when given),
    non-empty when `nonempty`. An empty prompt would make the first completion token be predicted from
    another sequence's last position."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise UsageError(f"{where}: field {field!r}: expected a list of integer token ids")
    if nonempty and not value:
        raise UsageError(f"{where}: field {field!r}: expected at least one token id, got none")
    bad = next((t for t in value if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        raise UsageError(f"{where}: field {field!r}: token id {bad} is outside the model's "
                         f"{'vocabulary' if vocab is None else f'{vocab} embedding rows'}")
    return value


def in_vocab_prefix(token_ids: list[int], vocab: int) -> int:
    """Length of the longest prefix of `token_ids` whose ids are all < vocab (the shared head rows)."""
    return next((i for i, t in enumerate(token_ids) if t >= vocab), len(token_ids))


# The options that name the pair, shared by kl-warmup and opd.
StudentOpt = Annotated[str | None, typer.Option("--student", "-s", help="Student checkpoint directory or hub id (trained).")]
TeacherOpt = Annotated[str | None, typer.Option(
    "--teacher", "-t", help="Teacher checkpoint directory or hub id (frozen), or a vLLM server's URL (http://host:port/v1).")]
AllowMismatchOpt = Annotated[bool | None, typer.Option(
    "--allow-vocab-size-mismatch",
    help="Let the two models' embedding row counts differ (tokenizers must still agree on every id); "
         "KLs use the first min(V_s, V_t) rows.")]
