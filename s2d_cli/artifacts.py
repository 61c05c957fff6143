"""Artifacts: the contract between stages. The one module that reads and writes shard files.

An artifact is a directory:

    out/
      manifest.json                        written last: a directory with a manifest is complete
      data-00000-of-00004.jsonl            one JSON record per line
      data-00000-of-00004.safetensors      optional per-token tensors, aligned record by record
      ...

Writing is staged in a sibling directory `.out.partial/`; every shard is written as `*.tmp` and
renamed, so a killed run leaves only whole shards behind. A rerun of the same command (same config
fingerprint) resumes: finished shards are kept and never redone. The manifest is written last and
the staging directory is renamed to `out`. `--out -` streams JSONL to stdout instead (no resume).

Per-token tensors of a shard are stored flat: `offsets` (int64, records + 1) and for each name a
`[sum of record lengths, ...]` tensor; record i owns rows offsets[i]:offsets[i+1].
"""
from __future__ import annotations

import errno
import fcntl
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

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGING_INFO = "staging.json"


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


def _sha256_cached(path: Path) -> str:
    """sha256 of a file, remembered in the user's cache by (real path, size, mtime): a model's weights are
    hashed once, not on every command that names them."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "s2d" / "sha256.json"
        known = json.loads(cache.read_text())
    except (OSError, ValueError, RuntimeError):     # RuntimeError: no home directory to be found
        cache, known = None, {}
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


_locks: dict[str, tuple[int, Path]] = {}


def lock_output(out: Path) -> None:
    """One command at a time writes `out`: an exclusive flock on `.NAME.lock` beside it, held until the
    command ends (`release_locks`, or the process's exit). A second command on the same `--out` (a
    doubled Make target, a rerun while the first still loads its model) stops at once with a clear line,
    instead of taking over, deleting or interleaving the first one's staging and checkpoints."""
    key = os.path.realpath(out)   # one lock per directory, however it is spelled (a symlink, `..`)
    if key in _locks:
        return
    lock = Path(key).parent / f".{Path(key).name}.lock"
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            why = e.strerror
            if isinstance(e, (FileExistsError, NotADirectoryError)):
                why = f"{next(p for p in lock.parents if p.exists())} is not a directory"
            raise UsageError(f"{out}: cannot write there ({why})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise UsageError(f"{out}: cannot lock {lock} ({e.strerror})") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"{out}: another s2d command (pid {holder}) is writing it now; wait for it to "
                             "finish or choose another --out") from None
        try:                      # the holder before us may have unlinked the file we opened: retry
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _locks[key] = (fd, lock)


def release_locks() -> None:
    """Drop the output locks this process holds (unlink first, so that no lock file is left behind)."""
    while _locks:
        _, (fd, lock) = _locks.popitem()
        try:
            lock.unlink(missing_ok=True)
        except OSError:           # a directory that became read-only: the file stays, unlocked, and the
            pass                  # command's own outcome stands (this runs in `execute`'s finally)
        finally:
            os.close(fd)


def input_entry(path: str | Path | None) -> dict[str, Any]:
    """What a manifest says about one input: the path and, for stdin once read, a bundled set, a local
    file, an artifact or a local model directory, its sha256 (so a changed input changes the fingerprint
    of what is made from it)."""
    if path is None or str(path) == "-":
        return {"path": "-" if path else None} | ({"sha256": _STDIN_SHA} if path and _STDIN_SHA else {})
    from .data import BUNDLED, BUNDLED_DIR
    if str(path) in BUNDLED:  # a bundled eval set (the name wins over a local file, as in load_examples)
        return {"path": str(path), "sha256": sha256_file(BUNDLED_DIR / BUNDLED[str(path)])}
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p)}
    if (p / MANIFEST).is_file():
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
                 inputs: Sequence[str | Path | None] = (), force: bool = False,
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
        if not force and self._finished():  # nothing to write: a finished output is read, even read-only
            self.complete = True
            print(f"{self.out}: already complete, nothing to do (--force redoes it)", file=sys.stderr)
            return
        lock_output(self.out)
        self._prepare(force)

    # -- set-up and resume
    def _finished(self) -> bool:
        """`out` holds this very artifact, finished (its manifest is written last and the directory
        renamed into place whole, so it is read safely without the output lock)."""
        if not (self.out / MANIFEST).is_file():
            return False
        old = read_manifest(self.out)
        return old.get("fingerprint") == self.fingerprint and old.get("kind") == self.kind

    def _prepare(self, force: bool) -> None:
        out, staging = self.out, self.staging
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: exists and is not a directory")
        if out.is_dir():
            manifest = out / MANIFEST
            if manifest.is_file():
                if not force and self._finished():   # finished by a command that held the lock just before
                    self.complete = True
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
            try:
                old = json.loads(info.read_text()) if info.is_file() else {}
                if not old and (staging / MANIFEST).is_file():  # killed between the manifest and the rename
                    m = json.loads((staging / MANIFEST).read_text())
                    old = {"fingerprint": m.get("fingerprint"), "num_shards": len(m.get("shards", []))}
            except (OSError, ValueError):
                old = {}
            same = old.get("fingerprint") == self.fingerprint and old.get("num_shards") == self.num_shards
            # --force discards a partial run of another config; this command's own partial run resumes
            # (so "rerun the same command" resumes a killed --force run too), and one that never
            # finished a shard holds nothing to lose
            if not same and (force or not any(staging.glob("data-*.jsonl"))):
                shutil.rmtree(staging)
            elif not same:
                diff = f" ({_config_diff(old['config'], self.config)})" if "config" in old else ""
                raise UsageError(f"{staging}: a partial run with a different config is in the way{diff}; "
                                 "use --force to discard it")
        if not staging.exists():
            try:
                staging.mkdir(parents=True)
            except OSError as e:
                raise UsageError(f"{out}: cannot write there ({e.strerror})") from None
            from . import cliutil
            cliutil.on_failure(self._discard_unstarted)
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
            count = sum(1 for _ in open(path, "rb"))
            entry = {"file": path.name, "records": count, "sha256": sha256_file(path)}
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
        (self.staging / STAGING_INFO).unlink(missing_ok=True)
        for leftover in self.staging.glob("*.tmp"):  # a write a killed run never finished
            leftover.unlink()
        _write_atomic(self.staging / MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
        from .models import replace_dir
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
            for rec in _iter_jsonl(path / shard["file"]):
                yield str(path / shard["file"]), rec
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
        if records is not None and (isinstance(records, bool) or not isinstance(records, int) or records < 0):
            raise UsageError(f"{path / MANIFEST}: not a valid manifest (shard {shard['file']!r}: 'records' is "
                             f"{records!r}, expected a count)")
        if not (path / shard["file"]).is_file():
            raise UsageError(f"{path / shard['file']}: shard listed in {MANIFEST} is missing")
    return shards


def unreadable_tensors(tfile: Path, e: Exception) -> UsageError:
    """The one line for a tensor shard safetensors cannot read (truncated, or not safetensors at all)."""
    first = (str(e).splitlines() or [""])[0][:200]
    return UsageError(f"{tfile}: not a readable safetensors file ({first})")


def iter_record_tensors(artifact: str | Path) -> Iterator[dict[str, torch.Tensor] | None]:
    """Per-record tensor slices of an artifact, aligned with `read_records(artifact)`; None for
    records whose shard has no tensors."""
    from safetensors.torch import load_file

    path = Path(artifact)
    manifest = read_manifest(path)
    if manifest is None:
        raise UsageError(f"{path}: not a complete s2d artifact (no {MANIFEST})")
    from safetensors import SafetensorError

    for shard in record_shards(path):
        if "tensors" not in shard:
            count = shard.get("records")
            if count is None:
                count = sum(1 for _ in _iter_jsonl(path / shard["file"]))
            for _ in range(count):
                yield None
            continue
        tfile = path / shard["tensors"]["file"]
        if not tfile.is_file():
            raise UsageError(f"{tfile}: tensor shard listed in {MANIFEST} is missing")
        try:
            tensors = load_file(tfile)
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
