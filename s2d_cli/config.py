"""Config resolution shared by every command: dataclass defaults <- --config FILE.yaml <- --set k=v <- flags.

Every command owns a flat `@dataclass` of scalars. Keys that the dataclass does not have are an
error wherever they come from (a typo in a YAML file must not be silently ignored), and the resolved
dataclass is what goes into the output manifest.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
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


def _apply(values: dict, overrides: dict, hints: dict, where: str) -> None:
    for key, value in overrides.items():
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
    _apply(values, base or {}, hints, "defaults")
    if config_file:
        _apply(values, load_yaml(config_file), hints, str(config_file))
    _apply(values, parse_sets(sets), hints, "--set")
    _apply(values, {k: v for k, v in (flags or {}).items() if v is not None}, hints, "flag")
    try:
        cfg = cls(**values)
    except TypeError as e:  # a required field with no value anywhere
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in values]
        if missing:
            raise UsageError(f"missing required option --{missing[0].replace('_', '-')}") from None
        raise UsageError(str(e)) from None
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
