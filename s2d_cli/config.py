"""Config resolution shared by every command: dataclass defaults <- --config FILE.yaml <- --set k=v <- flags.

Every command owns a flat `@dataclass` of scalars. Keys that the dataclass does not have are an
error wherever they come from (a typo in a YAML file must not be silently ignored), and the resolved
dataclass is what goes into the output manifest.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UsageError

C = TypeVar("C")


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    """Check/convert `value` to the field's annotated type; one clear error if it cannot be."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, key)
            except UsageError as e:
                errors.append(e)
        raise errors[0]
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(v, item, where, key) for v in value]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UsageError(f"{where}: {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UsageError(f"{where}: {key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"{where}: {key}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise UsageError(f"{where}: {key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: {key}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"{where}: {key}: expected a string, got {value!r}")
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------
# float ranges: every float key of every command is checked here, wherever its value came from

@dataclasses.dataclass(frozen=True)
class Range:
    """A closed or open interval of finite numbers: Range(0, 1, lo_open=True) is (0, 1]."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        return (math.isfinite(x) and (x > self.lo if self.lo_open else x >= self.lo)
                and (x < self.hi if self.hi_open else x <= self.hi))

    def __str__(self) -> str:
        if self.lo == -math.inf and self.hi == math.inf:
            return ""
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE = Range(0, lo_open=True), Range(0)
UNIT, UNIT_OPEN_TOP, UNIT_OPEN_BOTTOM = Range(0, 1), Range(0, 1, hi_open=True), Range(0, 1, lo_open=True)

# Every float key (a test checks that each command's float fields are all here). NaN and inf are
# outside every range: NaN passes every `<` check a command might do by hand and trains NaN weights,
# inf makes a temperature sample nothing or a learning rate blow every weight up.
FLOAT_RANGES: dict[str, Range] = {
    "temperature": NON_NEGATIVE,          # sampling: 0 is greedy
    "top_p": UNIT_OPEN_BOTTOM,
    "gpu_memory_utilization": UNIT_OPEN_BOTTOM,
    "timeout": Range(0, 86_400, lo_open=True),   # verifier seconds a item; more than a day overflows waits
    "lr": Range(0, 1, lo_open=True),      # AdamW steps move each weight by about lr: above 1 is no schedule
    "min_lr_ratio": UNIT,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": UNIT_OPEN_TOP,
    "adam_beta2": UNIT_OPEN_TOP,
    "max_grad_norm": NON_NEGATIVE,        # 0: no clipping
    "clip_low": UNIT,                     # the ratio's lower bound 1 - clip_low stays >= 0
    "clip_high": NON_NEGATIVE,
    "beta": NON_NEGATIVE,
    "is_cap": NON_NEGATIVE,               # 0: off
    "alpha": NON_NEGATIVE,
    "discount": UNIT,
    "error_rate": UNIT,
    "teacher_timeout": Range(0, 86_400, lo_open=True),   # served teacher: seconds per HTTP request
    "teacher_selftest_tol": NON_NEGATIVE,                 # served teacher: nats
    "rollout_timeout": Range(0, 86_400, lo_open=True),    # rollout server: seconds per request
    "lora_alpha": Range(0, lo_open=True),                 # adapters' output scale alpha / r
    "lora_dropout": UNIT_OPEN_TOP,
    "progress_every": Range(0, 86_400),                   # seconds between plain progress lines (0: none)
}
# where one command means something else by a key
FLOAT_RANGES_OF: dict[str, dict[str, Range]] = {
    "KLWarmupConfig": {"temperature": POSITIVE},   # the KL's softmax temperature divides the logits
}


def float_range(cls: type, key: str) -> Range:
    """The range of float key `key` of config class `cls` (any finite number when the table has none)."""
    for klass in cls.__mro__:
        if key in FLOAT_RANGES_OF.get(klass.__name__, {}):
            return FLOAT_RANGES_OF[klass.__name__][key]
    return FLOAT_RANGES.get(key, Range())


def is_float_key(hint: Any) -> bool:
    return hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                             and float in typing.get_args(hint))


def check_float_ranges(cfg: Any, sources: dict[str, str] | None = None) -> None:
    """Refuse any float key of `cfg` outside its range (`FLOAT_RANGES`), naming the key as it was given
    (`--lr`, `--set: lr`, `stage.yaml: lr`), the value and the range. None (unset optional) passes."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not is_float_key(hints.get(f.name)) or value is None or isinstance(value, bool):
            continue
        rng = float_range(type(cfg), f.name)
        if float(value) not in rng:
            where = (sources or {}).get(f.name, "defaults")
            name = f"--{f.name.replace('_', '-')}" if where == "flag" else \
                f.name if where == "defaults" else f"{where}: {f.name}"
            raise UsageError(f"{name}: expected a finite number{f' {rng}' if str(rng) else ''}, got {value}")


def check_out_path(cfg: Any) -> None:
    """An --out that no command could ever create or read (a symlink loop, a name too long) is refused
    here, naming it, before any command resolves it deep inside (a RuntimeError there, exit 1). A path
    that does not exist yet, or sits under a file, is each command's own business."""
    import errno
    import os

    out = getattr(cfg, "out", None)
    if not isinstance(out, str) or out in ("", "-"):
        return
    try:
        os.stat(out)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            raise UsageError(f"--out {out}: {e.strerror}" + (" (a symlink loop)" if e.errno == errno.ELOOP else "")) from None
    except ValueError:        # an embedded NUL byte
        raise UsageError(f"--out {out!r}: not a valid path") from None


def _apply(values: dict, overrides: dict, hints: dict, where: str, sources: dict | None = None) -> None:
    for key, value in overrides.items():
        if sources is not None:
            sources[key] = where
        if key not in hints:
            import difflib

            close = difflib.get_close_matches(key, hints, n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(hints))
            raise UsageError(f"{where}: unknown key {key!r} ({guess}known keys: {known})")
        values[key] = _coerce(value, hints[key], where, key)


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = raw
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not valid UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of config keys at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(cls: type[C], *, config_file: str | None = None, sets: list[str] | None = None,
            flags: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> C:
    """Build `cls` from its defaults, then `base` (e.g. a named protocol), then the YAML file, then --set pairs, then flags that were given
    (a flag whose value is None was not given)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    hints = {k: v for k, v in hints.items() if k in names}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}     # key -> where its value came from, for check_float_ranges' message
    _apply(values, base or {}, hints, "defaults", sources)
    if config_file:
        _apply(values, load_yaml(config_file), hints, str(config_file), sources)
    _apply(values, parse_sets(sets), hints, "--set", sources)
    _apply(values, {k: v for k, v in (flags or {}).items() if v is not None}, hints, "flag", sources)
    try:
        cfg = cls(**values)
    except TypeError as e:  # a required field with no value anywhere
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in values]
        if missing:
            raise UsageError(f"missing required option --{missing[0].replace('_', '-')}") from None
        raise UsageError(str(e)) from None
    check_float_ranges(cfg, sources)     # before validate(), which may compute with them
    check_out_path(cfg)
    validate = getattr(cfg, "validate", None)
    if validate is not None and _VALIDATE.get():
        validate()
    return cfg


def require_run_dir(out: str | None) -> None:
    """A training run's --out: a directory (metrics, checkpoints, model), never '-' (stdout)."""
    if not out:
        raise UsageError("missing required option --out (a run directory)")
    if out == "-":
        raise UsageError("--out: a training run writes a directory (metrics, checkpoints, model), not stdout; "
                         "give a path")


def as_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# the config as a user sees it: --show-config, and the keys --help lists

_VALIDATE: contextvars.ContextVar[bool] = contextvars.ContextVar("s2d_validate", default=True)


@contextlib.contextmanager
def unvalidated():
    """`resolve` without the config's `validate()`: for --help and --show-config, which show a config
    (defaults, YAML, --set, flags) that need not be complete enough to run (no --model yet)."""
    token = _VALIDATE.set(False)
    try:
        yield
    finally:
        _VALIDATE.reset(token)


def to_yaml(cfg, header: str = "") -> str:
    """The resolved config as a YAML file that `--config` reads back (same keys, same values)."""
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=1000)
    return "".join(f"# {line}\n" for line in header.splitlines()) + text


def field_notes(cls: type) -> dict[str, str]:
    """Each field's comment in the source of `cls` and its bases: the comment at the end of the field's
    line (with the comment lines that continue it below), else the comment lines just above it. These
    comments are the only description most keys have; --help shows them beside the keys without a flag."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, tuple[int, str, bool]] = {}   # line -> (column, text, alone on its line)
        code_lines: set[int] = set()
        try:
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type == tokenize.COMMENT:
                    text = tok.string.lstrip("#").strip()
                    comments[tok.start[0]] = (tok.start[1], text, tok.start[0] not in code_lines)
                elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                      tokenize.ENDMARKER):
                    code_lines.add(tok.start[0])
            body = ast.parse(source).body[0].body
        except (SyntaxError, tokenize.TokenError, IndexError, AttributeError):
            continue
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            line, parts = node.lineno, []
            if line in comments and not comments[line][2]:
                col = comments[line][0]
                parts.append(comments[line][1])
                nxt = line + 1
                while nxt in comments and comments[nxt][2] and comments[nxt][0] == col > node.col_offset:
                    parts.append(comments[nxt][1])
                    nxt += 1
            else:
                above = line - 1
                while above in comments and comments[above][2] and comments[above][0] == node.col_offset:
                    parts.insert(0, comments[above][1])
                    above -= 1
            if parts:
                notes[node.target.id] = " ".join(parts)
    return notes
