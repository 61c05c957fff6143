"""Artifacts: the contract between stages. The one module that reads and writes shard files.

An artifact is a directory:

    out/
      manifest.json                        written last: a directory with a manifest is complete
      data-00000-of-00004.jsonl            one JSON record per line
      data-00000-of-00004.safetensors      optional per-token tensors, aligned record by record
      ...
      README.md                            a dataset card: `datasets.load_dataset("out")` reads the shards

Writing is staged in a sibling directory `.out.partial/`; every shard is written as `*.tmp` and
renamed, so a killed run leaves only whole shards behind. A rerun of the same command (same config
fingerprint) resumes: finished shards are kept and never redone. The manifest is written last and
the staging directory is renamed to `out`; a kill at any instant of that commit is finished by the
rerun (see `ArtifactWriter.commit`), and the rerun removes what the killed one left. `--out -`
streams JSONL to stdout instead (no resume).

Reading checks: every shard is hashed and counted as it streams and must match its manifest entry,
whether the artifact is read (`read_records`, `iter_record_tensors`) or fingerprinted as an input
(`input_entry`); an edited shard is refused in one line naming it.

Per-token tensors of a shard are stored flat: `offsets` (int64, records + 1) and for each name a
`[sum of record lengths, ...]` tensor; record i owns rows offsets[i]:offsets[i+1].
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import UsageError, located
from .evalsets import BUNDLED, BUNDLED_DIR
from .outputs import _locks, lock_output, on_failure, release_locks, replace_dir, try_lock, unlock  # noqa: F401

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGING_INFO = "staging.json"
CARD = "README.md"          # the dataset card: `datasets.load_dataset(DIR)` reads the shards it names


def shard_name(index: int, total: int, ext: str = "jsonl") -> str:
    return f"data-{index:05d}-of-{total:05d}.{ext}"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(config: dict[str, Any]) -> str:
    """Hash of the settings that determine the records (not of where they go)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dumps_records(records: Iterable[dict]) -> bytes:
    """JSONL bytes, UTF-8. A record holding a lone surrogate (model output can: "\\ud800") cannot be
    encoded as UTF-8; it is written with ASCII escapes instead, which json.loads reads back unchanged."""
    lines = []
    for r in records:
        line = json.dumps(r, ensure_ascii=False) + "\n"
        try:
            lines.append(line.encode("utf-8"))
        except UnicodeEncodeError:
            lines.append((json.dumps(r) + "\n").encode("ascii"))
    return b"".join(lines)


_STDIN_SHA: str | None = None       # sha256 of what this process read from stdin, once it has


def sha256_cache_path() -> Path | None:
    """$XDG_CACHE_HOME/s2d/sha256.json (default ~/.cache/s2d/sha256.json); None without a home directory."""
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "s2d" / "sha256.json"
    except RuntimeError:            # no home directory to be found
        return None


def _sha256_cached(path: Path) -> str:
    """sha256 of a file, remembered in the user's cache by (real path, size, mtime): a model's weights are
    hashed once, not on every command that names them."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = sha256_cache_path()
    try:
        known = json.loads(cache.read_text()) if cache is not None else {}
    except (OSError, ValueError):   # none yet (it is made below), or unreadable: start a new one
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        try:                 # a lost update (two processes at once) costs one more hash later, nothing else
            if cache is None:
                raise OSError("no cache directory")
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:
            pass
    return known[key]


MODEL_FILES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".jinja", ".model", ".txt", ".tiktoken", ".py")


def model_digest(path: Path) -> str:
    """Content hash of a model directory: its weights, config and tokenizer files (top level)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_FILES):
        h.update(f"{f.name}\0{_sha256_cached(f)}\n".encode())
    return h.hexdigest()


def holds(outer: Path, path: Path) -> bool:
    """Whether directory `outer` is `path` or one of its ancestors (symlinks resolved): replacing or
    removing `outer` would take `path` with it."""
    outer, path = outer.resolve(), path.resolve()
    return outer == path or outer in path.parents


def input_entry(path: str | Path | None) -> dict[str, Any]:
    """What a manifest says about one input: the path and, for stdin once read, a bundled set, a local
    file, an artifact or a local model directory, its sha256 (so a changed input changes the fingerprint
    of what is made from it)."""
    if path is None or str(path) == "-":
        return {"path": "-" if path else None} | ({"sha256": _STDIN_SHA} if path and _STDIN_SHA else {})
    if str(path) in BUNDLED:  # a bundled eval set (the name wins over a local file, as in load_examples)
        return {"path": str(path), "sha256": sha256_file(BUNDLED_DIR / BUNDLED[str(path)])}
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p)}
    if (p / MANIFEST).is_file():
        if "shards" in (read_manifest(p) or {}):
            check_shards(p)         # the manifest lists each shard's sha256: it stands for them once they match
        return {"path": str(p), "sha256": sha256_file(p / MANIFEST)}
    if (p / "config.json").is_file():
        return {"path": str(p), "sha256": model_digest(p)}
    return {"path": str(path)}


# ----------------------------------------------------------------------------------------------
# writing

class ArtifactWriter:
    """Shard-by-shard writer with resume.

        w = ArtifactWriter(out, kind="rollout", config=cfg, num_shards=4, force=False)
        for i in w.pending():           # unfinished shards only, in order
            w.write_shard(i, records, tensors=None)
        path = w.commit(extra={...})    # manifest last, then rename into place

    `config` is the resolved config; its fingerprint (minus `volatile` keys such as the output path,
    plus the sha256 of each hashable input) decides whether an existing output or staging directory
    belongs to this run: an input edited since would otherwise be answered with stale shards.
    """

    def __init__(self, out: str | Path, *, kind: str, config: dict[str, Any], num_shards: int,
                 inputs: Sequence[str | Path | None] = (), force: bool = False, nested: bool = False,
                 volatile: Sequence[str] = ("out", "force", "resume", "config", "workers")):
        self.kind = kind
        self.config = config
        self.num_shards = max(1, num_shards)
        self.inputs = [input_entry(p) for p in inputs]
        self.fingerprint = fingerprint({k: v for k, v in config.items() if k not in volatile} | {"_kind": kind}
                                       | ({"_inputs": [e.get("sha256") for e in self.inputs]} if inputs else {}))
        self.stdout = str(out) == "-"
        self.complete = False
        self._streamed = 0
        if self.stdout:
            require_stdout("give --out a directory")
            return
        self.out = Path(out)
        if holds(self.out, Path.cwd()):
            raise UsageError(f"--out {out}: is the current directory (or holds it), which the commit would "
                             "replace whole; choose a new directory")
        for src in inputs:          # the commit replaces `out`: it must not be (or hold) what is read
            if src is not None and str(src) != "-" and Path(src).exists() and holds(self.out, Path(src)):
                raise UsageError(f"--out {out}: is the input {src} (or holds it); choose another --out")
        self.staging = self.out.parent / f".{self.out.name}.partial"
        if (not force or nested) and self._finished():  # a finished output is read, even read-only
            self.complete = True
            print(f"{self.out}: already complete, nothing to do (--force redoes it)", file=sys.stderr)
            held = os.path.realpath(self.out) in _locks
            if try_lock(self.out):          # a writable place no live command is writing: tidy it
                self._remove_leftovers()
                if not held:
                    unlock(self.out)        # and let the next command have it at once
            return
        lock_output(self.out)
        self._remove_leftovers()
        self._prepare(force, nested)

    # -- set-up and resume
    def _finished(self) -> bool:
        """`out` holds this very artifact, finished (its manifest is written last and the directory
        renamed into place whole, so it is read safely without the output lock)."""
        if not (self.out / MANIFEST).is_file():
            return False
        old = read_manifest(self.out)
        return old.get("fingerprint") == self.fingerprint and old.get("kind") == self.kind

    def _remove_leftovers(self) -> None:
        """What a killed run of this output left beside it (called with the output's lock held, so no live
        command owns any of it): the previous output moved aside by a commit (`.NAME.old-*`, a whole copy),
        writes never renamed into place, and a staging directory made redundant by a finished output of
        the same config (a killed `--force` rerun of it) or holding no finished shard."""
        for old in self.out.parent.glob(f".{self.out.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)
        if self.staging.is_dir():
            for tmp in self.staging.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            if self.complete and (self._staged_fingerprint() == self.fingerprint
                                  or not any(self.staging.glob("data-*.jsonl"))):
                shutil.rmtree(self.staging, ignore_errors=True)

    def _staged_fingerprint(self) -> str | None:
        """The fingerprint and shard count of the run staged in `.NAME.partial`: from staging.json, or from
        the manifest once the commit has written it (staging.json is removed after the manifest)."""
        return self._staged().get("fingerprint")

    def _staged(self) -> dict:
        info, manifest = self.staging / STAGING_INFO, self.staging / MANIFEST
        try:
            if info.is_file():
                return json.loads(info.read_text())
            if manifest.is_file():          # killed after the manifest replaced staging.json
                m = json.loads(manifest.read_text())
                return {"fingerprint": m.get("fingerprint"), "num_shards": len(m.get("shards", [])),
                        "config": m.get("config")}
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        return {}

    def _prepare(self, force: bool, nested: bool = False) -> None:
        """`nested`: an output inside a run directory that its trainer has already claimed for this config
        (grpo's out/rollouts), and resumes from its checkpoints: the run's --force reaches the output (a
        staged or finished output of another config there is removed) but never redoes a finished one of
        this config, and a staged run that an older s2d left unmarked (killed in its commit) is this run's."""
        out, staging = self.out, self.staging
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: exists and is not a directory")
        if out.is_dir():
            manifest = out / MANIFEST
            if manifest.is_file():
                if (not force or nested) and self._finished():   # finished by the command that held the lock
                    self.complete = True
                    self._remove_leftovers()
                    return
                if not force:
                    old = read_manifest(out)
                    diff = _config_diff(old.get("config", {}), self.config, old.get("inputs"), self.inputs)
                    raise UsageError(f"{out}: already holds a {old.get('kind')} artifact made with a different "
                                     f"config ({diff}); use --force to start over or choose another --out")
            elif any(out.iterdir()) and not force:
                raise UsageError(f"{out}: exists, is not empty and is not an s2d artifact; "
                                 "use --force to replace it or choose another --out")
        info = staging / STAGING_INFO
        if staging.exists():
            old = self._staged()
            if nested and not old:
                old = {"fingerprint": self.fingerprint, "num_shards": self.num_shards}
                _write_atomic(info, json.dumps({**old, "kind": self.kind, "config": self.config}, default=str).encode())
            same = old.get("fingerprint") == self.fingerprint and old.get("num_shards") == self.num_shards
            # --force discards a partial run of another config; this command's own partial run resumes
            # (so "rerun the same command" resumes a killed --force run too), and one that never
            # finished a shard holds nothing to lose
            if not same and (force or not any(staging.glob("data-*.jsonl"))):
                shutil.rmtree(staging)
            elif not same:
                diff = f" ({_config_diff(old['config'], self.config)})" if isinstance(old.get("config"), dict) else ""
                raise UsageError(f"{staging}: a partial run with a different config is in the way{diff}; "
                                 "use --force to discard it")
        if not staging.exists():
            try:
                staging.mkdir(parents=True)
            except OSError as e:
                raise UsageError(f"{out}: cannot write there ({e.strerror})") from None
            on_failure(self._discard_unstarted)
            _write_atomic(info, json.dumps({"fingerprint": self.fingerprint, "num_shards": self.num_shards,
                                            "kind": self.kind, "config": self.config}, default=str).encode())

    def _discard_unstarted(self) -> None:
        """A staging directory this command made goes away again if the command fails before finishing a
        shard: bad input leaves no partial output behind."""
        if self.staging.is_dir() and not any(self.staging.glob("data-*.jsonl")):
            shutil.rmtree(self.staging, ignore_errors=True)

    def done(self, index: int) -> bool:
        if self.stdout:
            return False
        if self.complete:
            return True
        return (self.staging / shard_name(index, self.num_shards)).is_file()

    def pending(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.done(i)]

    def num_done(self) -> int:
        return self.num_shards - len(self.pending())

    # -- shards
    def write_shard(self, index: int, records: Sequence[dict], tensors: dict[str, torch.Tensor] | None = None) -> None:
        if self.stdout:
            if tensors:
                raise UsageError("per-token tensors (e.g. --topk) need a directory --out, not '-'")
            sys.stdout.write(dumps_records(records).decode("utf-8"))
            sys.stdout.flush()
            self._streamed += len(records)
            return
        if tensors:  # tensors first: a present .jsonl implies its tensors are complete too
            from safetensors.torch import save
            data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"records": str(len(records))})
            _write_atomic(self.staging / shard_name(index, self.num_shards, "safetensors"), data)
        _write_atomic(self.staging / shard_name(index, self.num_shards), dumps_records(records))

    def read_finished_shard(self, index: int) -> list[dict]:
        """Records of a shard finished by an earlier (killed) run, e.g. to recompute metrics."""
        base = self.out if self.complete else self.staging
        return list(_iter_jsonl(base / shard_name(index, self.num_shards)))

    def write_file(self, name: str, obj: Any) -> None:
        """A JSON side file (e.g. metrics.json) that becomes part of the artifact at commit."""
        if not self.stdout and not self.complete:
            _write_atomic(self.staging / name, (json.dumps(obj, indent=2, default=str) + "\n").encode())

    # -- commit
    def commit(self, extra: dict[str, Any] | None = None) -> Path | None:
        if self.stdout:
            return None
        if self.complete:
            return self.out
        missing = self.pending()
        if missing:
            raise RuntimeError(f"commit with unfinished shards {missing[:5]}")
        shards, total = [], 0
        for i in range(self.num_shards):
            path = self.staging / shard_name(i, self.num_shards)
            count, sha = _digest_lines(path)
            entry = {"file": path.name, "records": count, "sha256": sha}
            tpath = path.with_suffix(".safetensors")
            if tpath.is_file():
                entry["tensors"] = {"file": tpath.name, "sha256": sha256_file(tpath)}
            shards.append(entry)
            total += count
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "s2d_version": __version__,
            "command": " ".join(["s2d", *sys.argv[1:]]) if sys.argv and "s2d" in Path(sys.argv[0]).name else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self.config,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "num_records": total,
            "shards": shards,
            **(extra or {}),
        }
        # Every instant of what follows leaves a state the rerun of this command finishes: until the manifest
        # is in place staging.json says whose staging this is; from then on the manifest says it; `out`
        # is replaced by two renames, and a kill between them leaves no `out` and a staged run whose
        # manifest is written, which the rerun commits. The old `out` is removed last (or by the rerun).
        for leftover in self.staging.glob("*.tmp"):  # a write a killed run never finished
            leftover.unlink()
        _write_atomic(self.staging / CARD, dataset_card(self.kind, manifest, self.staging).encode())
        _write_atomic(self.staging / MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
        (self.staging / STAGING_INFO).unlink(missing_ok=True)
        replace_dir(self.staging, self.out)
        self.complete = True
        return self.out


def _config_diff(old: dict, new: dict, old_inputs: list[dict] | None = None,
                 new_inputs: list[dict] | None = None) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ("out", "force"))
    if not keys:
        changed = [n.get("path") for o, n in zip(old_inputs or [], new_inputs or [])
                   if o.get("sha256") != n.get("sha256")]
        return f"input {changed[0]} changed since" if changed else "different command"
    k = keys[0]
    more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
    return f"{k}: {old.get(k)!r} -> {new.get(k)!r}{more}"


def pack_token_tensors(per_record: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """[{name: [T_i, ...]}] -> {"offsets": [R+1], name: [sum T_i, ...]} for one shard."""
    lengths = [len(next(iter(r.values()))) if r else 0 for r in per_record]
    out = {"offsets": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)}
    names = sorted({k for r in per_record for k in r})
    for name in names:
        out[name] = torch.cat([r[name] for r in per_record], dim=0)
    return out


# ----------------------------------------------------------------------------------------------
# reading

MAX_RECORD_BYTES = 64 * 2**20  # one JSONL line; a longer one is refused (`s2d verify /dev/zero` never ends)


def _too_long(path, lineno: int):
    return located(path, lineno, f"a record longer than {MAX_RECORD_BYTES // 2**20} MiB (no newline within it): "
                                 "expected JSON Lines, one record per line")


def _bounded_lines(f) -> Iterator[bytes]:
    """The lines of `f`, each read with a bound, so an endless line costs MAX_RECORD_BYTES, not all memory."""
    lineno = 0
    while True:
        raw = f.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_RECORD_BYTES:
            raise _too_long(getattr(f, "name", "<stdin>"), lineno)
        yield raw


def _read_stdin_bounded() -> bytes:
    """All of stdin, refusing a line longer than MAX_RECORD_BYTES as soon as it is seen."""
    chunks, since_newline, lineno = [], 0, 1
    while True:
        chunk = sys.stdin.buffer.read(1 << 20)
        if not chunk:
            return b"".join(chunks)
        newlines = chunk.count(b"\n")
        since_newline = len(chunk) - 1 - chunk.rfind(b"\n") if newlines else since_newline + len(chunk)
        lineno += newlines
        if since_newline > MAX_RECORD_BYTES:
            raise _too_long("<stdin>", lineno)
        chunks.append(chunk)


def _iter_jsonl(path: Path, stream: io.BufferedReader | None = None) -> Iterator[dict]:
    f = stream if stream is not None else open(path, "rb")
    try:
        for lineno, raw in enumerate(_bounded_lines(f) if stream is None else f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise located(path, lineno, "not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise located(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise located(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            obj["__line__"] = lineno
            yield obj
    finally:
        if stream is None:
            f.close()


def _iter_source(source: str | Path) -> Iterator[tuple[str, dict]]:
    """(file name for messages, record) pairs from stdin, a JSONL/JSON/Parquet file or an artifact dir."""
    if str(source) == "-":
        global _STDIN_SHA
        if sys.stdin is None:           # started with stdin closed (`<&-`): there is nothing to read
            raise UsageError("<stdin>: closed (pipe records in, or name a file instead of '-')")
        data = _read_stdin_bounded()
        _STDIN_SHA = hashlib.sha256(data).hexdigest()     # input_entry("-") names what was read
        for rec in _iter_jsonl(Path("<stdin>"), io.BytesIO(data)):
            yield "<stdin>", rec
        return
    path = Path(source)
    staging = path.parent / f".{path.name}.partial"
    hint = " (a partial run is staged beside it: rerun its command to finish)" if staging.exists() else ""
    if path.name.startswith(".") and path.name.endswith(".partial"):
        hint = " (this is the staging directory of an unfinished run: rerun its command to finish)"
    if path.is_dir():
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise UsageError(f"{path}: not a complete s2d artifact (no {MANIFEST}){hint}")
        for shard in record_shards(path):
            file = path / shard["file"]
            for rec in _iter_jsonl(file, _checked_lines(file, shard)):
                yield str(file), rec
        return
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory{hint}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise UsageError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
        for i, rec in enumerate(rows, 1):
            rec["__line__"] = i
            yield str(path), rec
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not valid UTF-8") from None
        except json.JSONDecodeError:  # JSON Lines under a .json name
            yield from ((str(path), r) for r in _iter_jsonl(path))
            return
        items = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise UsageError(f"{path}: expected a JSON list of records (or JSON Lines)")
        for i, rec in enumerate(items, 1):
            if not isinstance(rec, dict):
                raise located(path, i, f"expected a JSON object, got {type(rec).__name__}")
            rec["__line__"] = i
            yield str(path), rec
    else:
        yield from ((str(path), r) for r in _iter_jsonl(path))


def read_records(source: str | Path, *, required: Sequence[str] = (), allow_empty: bool = False) -> list[dict]:
    """All records of `source`, validated before anything is returned (so a bad line late in a file
    fails the command before it writes anything). Each missing required field names file and line."""
    return read_located(source, required=required, allow_empty=allow_empty)[0]


def read_located(source: str | Path, *, required: Sequence[str] = (),
                 allow_empty: bool = False) -> tuple[list[dict], list[tuple[str, int | None]]]:
    """`read_records`, plus where each record came from: (file, line) — the shard file of an artifact, the
    line counting blank ones — for later checks to name the line a bad value is on."""
    records, where = [], []
    for name, rec in _iter_source(source):
        line = rec.pop("__line__", None)
        for field in required:
            if field not in rec:
                raise located(name, line, f"missing field {field!r}")
        records.append(rec)
        where.append((name, line))
    if not records and not allow_empty:
        raise UsageError(f"{'<stdin>' if str(source) == '-' else source}: empty (no records)")
    return records, where


def read_manifest(path: str | Path) -> dict | None:
    """An artifact's or run's manifest.json (None when there is none); an unreadable one is a usage error."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{p}: not a valid manifest ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(m, dict):
        raise UsageError(f"{p}: not a valid manifest (expected a JSON object)")
    return m


SAMPLED_WITH = ("dataset", "model", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed")


def made_with(path: str | Path) -> dict:
    """The settings that sampled an artifact's records, read from its own manifest and nowhere else: the
    config of a command that sampled them (rollout, eval), or the `made_with` a command that only scored
    them (verify) copied from the manifest of its own input when it ran. {} when unknown."""
    manifest = read_manifest(path) or {}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    if "temperature" in config:
        return {k: config[k] for k in SAMPLED_WITH if k in config}
    recorded = manifest.get("made_with")
    return dict(recorded) if isinstance(recorded, dict) else {}


def shard_file(path: Path, name: Any) -> Path:
    """`path / name` for a file a manifest lists: a plain file name of the artifact, never a number, a
    '../x' or an absolute path (a damaged or hand-edited manifest)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"{path / MANIFEST}: not a valid manifest (shard file {name!r} is not a file name "
                         "in the artifact)")
    return path / name


def record_shards(path: Path) -> list[dict]:
    """The shard entries of a record artifact's manifest, each shard file present."""
    manifest = read_manifest(path)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(x, dict) and "file" in x for x in shards):
        where = f"; its model is in {path / 'model'}" if (path / "model").is_dir() else ""
        raise UsageError(f"{path}: a {manifest.get('kind', 'non-record')} output, not an artifact of records "
                         f"(its {MANIFEST} lists no shards){where}")
    for shard in shards:
        shard_file(path, shard["file"])
        tensors = shard.get("tensors")
        if tensors is not None and not (isinstance(tensors, dict) and "file" in tensors):
            raise UsageError(f"{path / MANIFEST}: not a valid manifest (shard {shard['file']!r}: 'tensors' "
                             "names no file)")
        if tensors is not None:
            shard_file(path, tensors["file"])
        records = shard.get("records")
        if isinstance(records, bool) or not isinstance(records, int) or records < 0:
            raise UsageError(f"{path / MANIFEST}: not a valid manifest (shard {shard['file']!r}: 'records' is "
                             f"{records!r}, expected a count)")
        for what, entry in (("", shard), ("tensors ", tensors or {"sha256": "0" * 64})):
            sha = entry.get("sha256")
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                raise UsageError(f"{path / MANIFEST}: not a valid manifest (shard {shard['file']!r}: {what}'sha256' "
                                 f"is {sha!r}, expected 64 hex digits)")
        if not (path / shard["file"]).is_file():
            raise UsageError(f"{path / shard['file']}: shard listed in {MANIFEST} is missing")
    return shards


def _digest_lines(path: Path) -> tuple[int, str]:
    """(lines, sha256) of a shard file, in one pass: what the manifest records for it."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for raw in f:
            h.update(raw)
            n += 1
    return n, h.hexdigest()


def _checked_lines(file: Path, shard: dict) -> Iterator[bytes]:
    """The lines of a shard file as they stream from disk, hashed and counted on the way: a shard edited
    after its manifest was written (or a manifest that lies about it) is refused when the stream ends, or
    as soon as it runs past the count the manifest claims. One pass: reading is checking."""
    h, n, expected = hashlib.sha256(), 0, shard["records"]
    with open(file, "rb") as f:
        stamp = _stamp(f.fileno())
        for raw in f:
            n += 1
            if n > expected:
                _check_digest(file, expected, None, n, None)
            h.update(raw)
            yield raw
    _check_digest(file, expected, shard["sha256"], n, h.hexdigest())
    _checked.add((*stamp, shard["sha256"]))


_checked: set[tuple] = set()   # shard files this process has read whole and found as their manifest says


def _stamp(fd: int) -> tuple:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_digest(file: Path, records: int | None, sha: str | None, got_records: int | None,
                  got_sha: str | None) -> None:
    if records is not None and got_records != records:
        more = "more than" if got_records > records else f"{got_records} records, not"
        raise UsageError(f"{file}: holds {more} the {records} records {MANIFEST} lists; the shard or the "
                         "manifest was changed after the artifact was written (rerun the command that made it)")
    if sha is not None and got_sha != sha:
        raise UsageError(f"{file}: sha256 {got_sha[:12]}... is not the {sha[:12]}... that {MANIFEST} lists; the "
                         "shard was changed after the artifact was written (rerun the command that made it)")


def check_shards(artifact: str | Path) -> None:
    """Every shard of a record artifact (JSONL and tensors) against its manifest's counts and sha256: what
    an artifact's fingerprint (its manifest's sha256) stands for. One line naming the first shard that
    does not match."""
    path = Path(artifact)
    for shard in record_shards(path):
        file = path / shard["file"]
        with open(file, "rb") as f:
            if (*_stamp(f.fileno()), shard["sha256"]) in _checked:   # read and checked by this command
                continue
        for _ in _checked_lines(file, shard):
            pass
        if "tensors" in shard:
            tfile = path / shard["tensors"]["file"]
            if not tfile.is_file():
                raise UsageError(f"{tfile}: tensor shard listed in {MANIFEST} is missing")
            _check_digest(tfile, None, shard["tensors"]["sha256"], None, sha256_file(tfile))


def dataset_card(kind: str, manifest: dict, where: Path) -> str:
    """README.md of an artifact: a Hugging Face dataset card whose `configs` name the JSONL shards, so that
    `datasets.load_dataset(DIR)` reads the records (and neither manifest.json nor the tensor shards), and
    whose `dataset_info.features` are the column types over all shards: datasets would otherwise take
    them from the first shard alone (a column that is null there and text later fails to cast).
    Written from the shards and the manifest's content only, so a rerun writes the same bytes."""
    import yaml

    tensors = any("tensors" in s for s in manifest["shards"])
    head = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data-*.jsonl"}]}]}
    features = _features(where / s["file"] for s in manifest["shards"])
    if features is not None:
        head["dataset_info"] = {"features": features}
    lines = [
        "---",
        yaml.safe_dump(head, sort_keys=False).rstrip("\n"),
        "---",
        f"# s2d {kind} artifact",
        "",
        f"{manifest['num_records']} records in {len(manifest['shards'])} JSONL shards, listed with their counts and",
        "sha256 in manifest.json (the settings that made them are there too).",
        "",
        "    import datasets                                      # pip install datasets",
        "    ds = datasets.load_dataset(\"DIR\", split=\"train\")",
        "    from s2d_cli.artifacts import read_records",
        "    records = read_records(\"DIR\")                       # the same records, shards checked",
    ]
    if tensors:
        lines += ["", "Per-token top-K tensors are in `data-*.safetensors`, one per JSONL shard: `offsets` (int64,",
                  "records + 1) and flat `topk_ids` / `topk_logprobs` (record i owns rows offsets[i]:offsets[i+1]);",
                  "`s2d_cli.artifacts.iter_record_tensors(\"DIR\")` yields them record by record."]
    return "\n".join(lines) + "\n"


def _features(files: Iterable[Path]) -> list | None:
    """The columns of JSONL shards as a dataset card lists them (`datasets.Features` in YAML), the types
    unified over every shard; None when Arrow cannot type them (a column holding a number in one record
    and text in another): the card then names the files only."""
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        schemas = [pj.read_json(f).schema for f in files if f.stat().st_size]
        if not schemas:
            return None
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        return [{"name": f.name, **_feature(f.type)} for f in schema]
    except (pa.ArrowException, ValueError, TypeError, OSError):
        return None


_DTYPES = {"double": "float64", "float": "float32", "halffloat": "float16"}


def _feature(t) -> dict:
    """One Arrow type as `datasets.Features._to_yaml_list` writes it (without importing datasets, which
    takes seconds): {"dtype": "int64"}, {"list": "int64"}, {"struct": [...]}, {"list": [fields]}."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_feature(f.type)} for f in t]}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _feature(t.value_type)
        value = inner[next(iter(inner))] if list(inner) in (["dtype"], ["struct"]) else inner
        return {"large_list" if pa.types.is_large_list(t) else "list": value}
    return {"dtype": _DTYPES.get(str(t), str(t))}


def unreadable_tensors(tfile: Path, e: Exception) -> UsageError:
    """The one line for a tensor shard safetensors cannot read (truncated, or not safetensors at all)."""
    first = (str(e).splitlines() or [""])[0][:200]
    return UsageError(f"{tfile}: not a readable safetensors file ({first})")


def iter_record_tensors(artifact: str | Path) -> Iterator[dict[str, torch.Tensor] | None]:
    """Per-record tensor slices of an artifact, aligned with `read_records(artifact)`; None for
    records whose shard has no tensors."""
    from safetensors.torch import load

    path = Path(artifact)
    manifest = read_manifest(path)
    if manifest is None:
        raise UsageError(f"{path}: not a complete s2d artifact (no {MANIFEST})")
    from safetensors import SafetensorError

    for shard in record_shards(path):
        if "tensors" not in shard:
            for _ in range(shard["records"]):
                yield None
            continue
        tfile = path / shard["tensors"]["file"]
        if not tfile.is_file():
            raise UsageError(f"{tfile}: tensor shard listed in {MANIFEST} is missing")
        try:
            data = tfile.read_bytes()
            _check_digest(tfile, None, shard["tensors"]["sha256"], None, hashlib.sha256(data).hexdigest())
            tensors = load(data)
        except (SafetensorError, OSError) as e:
            raise unreadable_tensors(tfile, e) from None
        if "offsets" not in tensors:
            raise UsageError(f"{tfile}: no 'offsets' tensor (not a shard s2d wrote)")
        offsets = tensors.pop("offsets").tolist()
        if len(offsets) - 1 != shard.get("records", len(offsets) - 1):
            raise UsageError(f"{tfile}: {len(offsets) - 1} records of tensors for {shard['records']} records")
        for i in range(len(offsets) - 1):
            yield {k: v[offsets[i]:offsets[i + 1]] for k, v in tensors.items()}


def has_tensors(artifact: str | Path, name: str) -> bool:
    from safetensors import SafetensorError, safe_open

    path = Path(artifact)
    manifest = read_manifest(path) if path.is_dir() else None
    if not manifest:
        return False
    shards = record_shards(path)        # a run directory or a damaged manifest: one line, not a KeyError
    if not shards:
        return False
    for shard in shards:
        if "tensors" not in shard:
            return False
        tfile = path / shard["tensors"]["file"]
        try:
            with safe_open(str(tfile), "pt") as f:
                if name not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                    return False
        except (SafetensorError, OSError) as e:
            raise unreadable_tensors(tfile, e) from None
    return True


def check_shard_size(size: int) -> None:
    """A command's `shard_size` (its unit of resume): 0 or a negative count is an error, not 1."""
    if size < 1:
        raise UsageError(f"shard_size: expected >= 1, got {size}")


def require_stdout(hint: str) -> None:
    """`--out -` with stdout closed (`>&-`): nowhere to write, one line instead of an AttributeError."""
    if sys.stdout is None:
        raise UsageError(f"--out -: stdout is closed (redirect it, or {hint})")


def shard_slices(n_items: int, shard_size: int) -> list[range]:
    """Work item ranges, one per shard: the fixed unit of resume."""
    shard_size = max(1, shard_size)
    return [range(s, min(s + shard_size, n_items)) for s in range(0, max(n_items, 1), shard_size)] or [range(0)]
