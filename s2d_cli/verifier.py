"""Answer checking in worker processes: the one place in s2d that grades a model's answer, with a clock.

    from s2d_cli.verifier import Verifier
    with Verifier(workers=2, timeout=5.0) as verifier:
        verdicts = verifier.verify([(r"... so the answer is \\boxed{\\frac12}.", "0.5")])
    verdicts[0].reward  # 1.0

What the answer is and how it is compared (boxes, final-answer lines, math-verify and the
pre-normalisation before it) lives in `s2d_cli.grading`, as pure functions; `GradingRules` choose
among its rules, and `Verifier(rules=...)` applies them to every item.

math-verify's own timeouts use SIGALRM, which works only in a main thread and does not fire while a
C-level big-integer operation holds the interpreter (`9^{9^{9^{9^9}}}` takes seconds, or forever). So
`Verifier` runs the checks in worker processes and enforces a wall-clock limit per item from the parent:
a worker past its item's deadline is killed with SIGKILL, the item gets verdict "timeout", and a fresh
worker takes its place. A worker that dies on its own gives "error" for the item it was on. Golds are
parsed in the workers too, under the same limit: a gold that cannot be parsed in time gives "timeout"
for its item, and every later item with that gold gets "timeout" at once instead of another wait (a
plain-number gold is parsed only when a prediction needs it: comparing two numbers parses neither).
Workers are forks of a clean helper process (see "The pool" below), so the pool is safe to create from a
process that has torch loaded and threads running, and replacing a killed worker costs milliseconds.

A short call (500 records) pays the pool's start: the helper imports math-verify (~1 s of CPU, as
math-verify's own loop does) and warms it up (~0.3 s, which saves the workers more than it costs);
most of the rest is math-verify's LaTeX parser learning its tables on new answer shapes. So the pool's
processes parse two-stage (`two_stage_parse`: the same trees, 1.5x faster on new shapes, 3x on known
ones), and parse a plain-number gold only when a prediction needs it: together they put a short call
ahead of math-verify's plain loop (bench row 5).
"""
from __future__ import annotations

import gc
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from multiprocessing import connection
from pathlib import Path

from . import two_stage_parse
from .errors import UsageError
from .grading import (  # noqa: F401  (re-exported: callers import the grading names from here too)
    DEFAULT_RULES,
    VERDICTS,
    GradingRules,
    Verdict,
    _decimal,
    _fail,
    _prenormalize,
    _readings,
    answer_key,
    format_float,
    gold_type_error,
    last_boxed,
    normalize_gold,
    prepare_gold,
    verify_one,
)

# ---------------------------------------------------------------------------------------------
# The pool
#
#   parent (a trainer: torch loaded, threads running)
#     └─ zygote: a fresh `python -c`, imports math-verify, makes its parser two-stage and warms it up,
#          │ then only forks on request
#          ├─ worker ─┐ each talks to the parent over its own socket pair: the parent sends a chunk of
#          └─ worker ─┘ items, the worker answers with one message per item, in order.
#
# The parent times every item: the first item of a chunk starts when the chunk is sent, each later one
# when the previous answer arrives. At the deadline the zygote SIGKILLs the worker (it is the zygote's own
# child, so no pid can have been reused) and forks a fresh one in a few milliseconds. Workers are forks
# of a zygote rather than multiprocessing spawn/forkserver children, so they never re-import the
# parent's __main__ (a training script and its torch import) and inherit math-verify's warmed-up parser.

# A few common answer shapes: parsing them once in the zygote builds math-verify's regexes and most of the
# ANTLR parser's prediction cache (~0.5 s), which every forked worker then inherits instead of rebuilding.
_WARM_UP_ANSWERS = ("42", r"-\frac{3}{4}", r"2\sqrt{2}", r"\left( 3, \frac{\pi}{2} \right)", "[2, 5)", r"x^2 + 2x + 1")
_MSG = 9  # zygote protocol: 1 byte op + 8 byte signed int, both ways


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the zygote exits: a worker deep in a C-level big-integer
    operation does not notice a closed pipe and would outlive a crashed trainer."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def _limit_memory(memory_mb: int | None) -> None:
    if not memory_mb:
        return
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_mb * 2**20
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))  # a runaway item -> MemoryError -> "error"
    except (ImportError, ValueError, OSError):
        pass


def _plain_decimal_gold(gold, rules: GradingRules) -> bool:
    """Is the gold a plain decimal in every reading ("161", "0.5", "\\$18.90", 27.0)? Such a gold is compared
    with a plain decimal prediction exactly and never parsed, so a worker parses it only if a prediction
    needs it (lazily; a decimal parses in a few milliseconds). A short call's golds are mostly such numbers:
    parsing them all ahead cost 0.37 s of the ~2 s that 500 MATH items take."""
    text = normalize_gold(gold, rules)
    return all(_decimal(_prenormalize(r) if rules.normalize else r) is not None for r in _readings(text))


def _worker_main(fd: int, memory_mb: int | None) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _die_with_parent()
    _limit_memory(memory_mb)
    conn = connection.Connection(fd)
    golds_seen: set[tuple[str, GradingRules]] = set()
    while True:
        try:
            rules, chunk = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        for index, completion, gold in chunk:
            key = (repr(gold), rules)
            if key not in golds_seen:  # tell the parent when the clock runs on this gold's parse
                conn.send((index,))
                try:
                    if not _plain_decimal_gold(gold, rules):
                        prepare_gold(gold, rules)
                except Exception:
                    pass  # verify_one gives the verdict
                conn.send((index, None))  # ... and no longer
                if len(golds_seen) > 65536:
                    golds_seen.clear()
                golds_seen.add(key)
            v = verify_one(completion, gold, rules)
            conn.send((index, v.reward, v.correct, v.extracted, v.verdict, v.multi_box))


def _recv_msg(sock) -> tuple[bytes, int, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, _MSG, 1)
    while data and len(data) < _MSG:
        more = sock.recv(_MSG - len(data))
        if not more:
            break
        data += more
    if len(data) < _MSG:
        raise EOFError("peer closed the control socket")
    return data[:1], int.from_bytes(data[1:], "little", signed=True), fds


def _warm_up() -> None:
    """What the zygote does before its first fork, so that every worker inherits it: math-verify's
    parser made two-stage (the same trees, 1.5x faster on new input shapes and 3x on known ones: most
    of a short call's CPU; see two_stage_parse), its regexes compiled and its DFA seeded."""
    two_stage_parse.install()
    for answer in _WARM_UP_ANSWERS:
        verify_one(f"so \\boxed{{{answer}}}", answer)


def _zygote_main(ctl_fd: int, memory_mb: int | None) -> None:
    """Entry point of the zygote process (see the diagram above)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _warm_up()
    gc.freeze()  # the warmed heap stays shared copy-on-write with every worker
    ctl = socket.socket(fileno=ctl_fd)
    children: set[int] = set()
    while True:
        try:
            op, arg, fds = _recv_msg(ctl)
        except (EOFError, OSError):  # the parent closed the pool or died
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        for pid in list(children):  # reap workers that exited
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
            except ChildProcessError:
                children.discard(pid)
        if op == b"f":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    ctl.close()
                    _worker_main(fds[0], memory_mb)
                except BaseException:
                    code = 1
                os._exit(code)
            os.close(fds[0])
            children.add(pid)
            ctl.sendall(b"f" + pid.to_bytes(8, "little", signed=True))
        elif op == b"k":
            if arg in children:
                try:
                    os.kill(arg, signal.SIGKILL)
                    os.waitpid(arg, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                children.discard(arg)
            ctl.sendall(b"k" + arg.to_bytes(8, "little", signed=True))


class _Zygote:
    """The parent's handle on the zygote process: fork a worker, kill a worker, shut down."""

    START_TIMEOUT = 120.0  # seconds for the zygote to import math-verify and warm up (1-2 s when idle)

    def __init__(self, memory_mb: int | None):
        self.start_timeout = self.START_TIMEOUT
        self.sock, theirs = socket.socketpair()
        # The parent's own s2d_cli: not one in the current directory, which `python -c` puts first on
        # sys.path (a benchmark run from another checkout would grade with that checkout's code), and
        # found also when this is a source checkout that is not installed.
        root = str(Path(__file__).resolve().parents[1])
        code = (
            f"import sys; root = {root!r}; sys.path[:] = [p for p in sys.path if p != '']; "
            f"sys.path[:0] = [] if root in sys.path else [root]; "
            f"from s2d_cli.verifier import _zygote_main; "
            f"_zygote_main({theirs.fileno()}, {memory_mb!r})"
        )
        self.process = subprocess.Popen(  # stdout is the parent's data channel (JSONL): keep it clean
            [sys.executable, "-c", code], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        theirs.close()

    def _call(self, op: bytes, arg: int, fds: list[int], timeout: float) -> int:
        self.sock.settimeout(timeout)
        try:
            msg = op + arg.to_bytes(8, "little", signed=True)
            if fds:
                socket.send_fds(self.sock, [msg], fds)
            else:
                self.sock.sendall(msg)
            return _recv_msg(self.sock)[1]
        except (EOFError, OSError) as e:
            raise RuntimeError(
                f"the verifier's zygote process failed ({e or type(e).__name__}; exit code "
                f"{self.process.poll()}); does `python -c 'import s2d_cli.verifier, math_verify'` work?"
            ) from e

    def fork_worker(self) -> tuple[int, connection.Connection]:
        mine, theirs = socket.socketpair()
        try:
            pid = self._call(b"f", 0, [theirs.fileno()], self.start_timeout)
        finally:
            theirs.close()
        return pid, connection.Connection(mine.detach())

    def kill(self, pid: int) -> None:
        self._call(b"k", pid, [], 30.0)

    def close(self, kill: bool = False) -> None:
        self.sock.close()  # the zygote sees EOF, SIGKILLs its workers and exits
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Worker:
    """A worker's pid and pipe, the items it holds (in order) and when its current item started."""

    def __init__(self, pid: int, conn: connection.Connection):
        self.pid = pid
        self.conn = conn
        self.inflight: deque[int] = deque()  # the items sent to it, in the order it checks them
        self.chunks: deque[int] = deque()  # how many of those are left in each chunk sent (at most two)
        self.item_started = 0.0
        self.parsing_gold = False  # its current item's gold is being parsed (a first sight of that gold)


class _Processes:
    """Everything the pool must stop at the end: the zygote and the workers (both get replaced over time)."""

    def __init__(self, memory_mb: int | None):
        self.memory_mb = memory_mb
        self.owner_pid = os.getpid()
        self.zygote = _Zygote(memory_mb)  # imports and warms up in the background; workers fork on first use
        self.workers: list[_Worker] = []

    def spawn(self) -> _Worker:
        try:
            return _Worker(*self.zygote.fork_worker())
        except RuntimeError:
            # Killed (OOM killer, a stray kill): start a new one, once.
            self.zygote.close(kill=True)
            self.zygote = _Zygote(self.memory_mb)
            return _Worker(*self.zygote.fork_worker())

    def kill(self, w: _Worker) -> None:
        try:
            self.zygote.kill(w.pid)
        except RuntimeError:
            pass  # the zygote is gone, and with it (PR_SET_PDEATHSIG) the worker; spawn() starts a new one
        w.conn.close()

    def shutdown(self) -> None:
        if os.getpid() != self.owner_pid:  # a forked copy of the owner (a DataLoader worker) leaves it alone
            return
        for w in self.workers:
            w.conn.close()  # idle workers exit on EOF; busy ones are killed by the zygote on its way out
        self.workers.clear()
        self.zygote.close()


def _wire_size(item: tuple) -> int:
    """An upper bound on an item's pickled size: 4 bytes per character (UTF-8), plus framing."""
    return 64 + sum(4 * len(x) if isinstance(x, str) else 64 for x in item)


class PoolOptionError(UsageError, ValueError):
    """A bad `workers` or `timeout`: a ValueError to Python callers, one line and exit 2 at the shell."""


def check_pool_options(workers: int | None, timeout: float) -> None:
    """`timeout`: finite seconds > 0 (NaN would remove every deadline, inf overflows the wait);
    `workers`: None or 0 for every CPU this process may use, else a positive count."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0):
        raise PoolOptionError(f"--timeout: expected > 0 seconds (a finite number), got {timeout!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise PoolOptionError(f"--workers: expected a process count >= 0 (0: every CPU), got {workers!r}")


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


class Verifier:
    """A pool of worker processes checking (completion, gold) pairs, with a wall-clock limit per item.

    Create it once and call `verify` as often as needed (every GRPO step); `close()` or `with` ends it.
    `workers`: None or 0 for one process per CPU this process may use. `timeout`: finite seconds > 0.
    Bad values raise `PoolOptionError` (a ValueError, and a UsageError at the shell).
    `memory_mb` caps each worker's address space, so a runaway item fails alone instead of exhausting RAM.
    `rules`: how answers are read and compared (`grading.GradingRules`; s2d's own rules by default).
    Golds are parsed in the workers, each once per worker, under the item's deadline: a gold that cannot
    be parsed in time gives "timeout" to its item and, at once, to every later item with that gold
    (plain-number golds only when a prediction needs it: `_plain_decimal_gold`).
    Calls from several threads are serialised.
    """

    MAX_CHUNK = 16  # items sent to a worker at once: fewer round trips, still one deadline per item
    PREFETCH_BYTES = 64 * 1024  # most bytes queued behind a busy worker (socket buffers hold ~200 KiB)

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = 5.0,
        *,
        memory_mb: int | None = 4096,
        rules: GradingRules = DEFAULT_RULES,
    ):
        check_pool_options(workers, timeout)
        self.n_workers = workers or _default_workers()
        self.timeout = float(timeout)
        self.rules = rules
        self._procs = _Processes(memory_mb)
        self._slow_golds: set[str] = set()  # golds whose parse ran past the deadline: their items time out
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._procs.shutdown)  # also runs at interpreter exit

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring, and for tests that kill one)."""
        return [w.pid for w in self._procs.workers]

    def verify(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for `pairs` of (completion, gold), in order. Golds may also be numbers (see normalize_gold)."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("this Verifier is closed")
            if os.getpid() != self._procs.owner_pid:  # its sockets are shared with the parent's copy
                raise RuntimeError("a Verifier cannot be used in a forked child; create one there")
            if not pairs:
                return []
            workers = self._procs.workers
            # no more workers than items: `--workers 100000` on a few records is not 100000 forks
            while len(workers) < min(self.n_workers, len(pairs)):
                workers.append(self._procs.spawn())
            try:
                return self._run(list(pairs), workers)
            except BaseException:  # Ctrl-C mid-batch: answers still in flight must not leak into the next call
                for w in [w for w in workers if w.inflight]:
                    self._procs.kill(w)
                    workers.remove(w)
                raise

    def _run(self, items: list[tuple[str, str]], workers: list[_Worker]) -> list[Verdict]:
        results: list[Verdict | None] = [None] * len(items)
        # Items with the same gold go out together (a GRPO group already is), so one worker's parse cache
        # serves the whole group; the order of `results` is unaffected.
        first_seen: dict[str, int] = {}
        pending = deque(sorted(range(len(items)), key=lambda i: first_seen.setdefault(str(items[i][1]), i)))
        chunk_size = max(1, min(self.MAX_CHUNK, len(items) // (4 * len(workers))))
        left = len(items)
        while left:
            now = time.monotonic()
            for w in workers:  # hand a chunk to every worker that is idle, or half through its only chunk
                if not pending or len(w.chunks) > 1 or (w.chunks and w.chunks[0] > chunk_size // 2):
                    continue
                # Queued behind a busy worker, a chunk must fit in the socket buffer: a send that blocks
                # on a worker stuck in a pathological item would hold up every deadline. An idle worker
                # is reading, so it may get a chunk of any size.
                budget = self.PREFETCH_BYTES if w.inflight else float("inf")
                take, size = [], 0
                while pending and len(take) < chunk_size:
                    if str(items[pending[0]][1]) in self._slow_golds:  # no second wait on the same gold
                        results[pending.popleft()] = _fail("timeout")
                        left -= 1
                        continue
                    size += _wire_size(items[pending[0]])
                    if size > budget:
                        break
                    take.append(pending.popleft())
                if not take:
                    continue
                data = pickle.dumps((self.rules, [(i, *items[i]) for i in take]), protocol=pickle.HIGHEST_PROTOCOL)
                try:
                    w.conn.send_bytes(data)
                except OSError:  # it died: the EOF shows up below
                    pending.extendleft(reversed(take))
                    continue
                if not w.inflight:
                    w.item_started = now
                w.inflight.extend(take)
                w.chunks.append(len(take))

            if not left:  # the last items were all of slow golds
                break
            busy = [w.item_started + self.timeout for w in workers if w.inflight]
            wait_s = max(0.0, min(busy) - now) if busy else None
            ready = connection.wait([w.conn for w in workers], timeout=wait_s)

            for slot, w in enumerate(list(workers)):
                dead = False
                if w.conn in ready:
                    try:
                        while w.conn.poll():
                            msg = w.conn.recv()
                            if len(msg) < 3:  # the worker starts (1) or ends (2) parsing this item's gold
                                w.parsing_gold = len(msg) == 1
                                continue
                            index, reward, correct, extracted, verdict, multi_box = msg
                            results[index] = Verdict(reward, correct, extracted, verdict, multi_box)
                            w.parsing_gold = False
                            w.inflight.popleft()
                            w.chunks[0] -= 1
                            if not w.chunks[0]:
                                w.chunks.popleft()
                            w.item_started = time.monotonic()  # the next item of its chunk starts now
                            left -= 1
                    except (EOFError, OSError):
                        dead = True
                if dead:  # it died on its own (segfault, OOM killer): only its current item is lost
                    verdict = "error"
                elif w.inflight and time.monotonic() - w.item_started >= self.timeout:
                    verdict = "timeout"
                else:
                    continue
                self._procs.kill(w)
                if w.inflight:  # the current item gets the verdict, the rest of the chunk goes back in line
                    if w.parsing_gold and verdict == "timeout":
                        self._slow_golds.add(str(items[w.inflight[0]][1]))
                    results[w.inflight.popleft()] = _fail(verdict)
                    left -= 1
                    pending.extendleft(reversed(w.inflight))
                workers[slot] = self._procs.spawn()
        return results  # type: ignore[return-value]


def verify_many(
    pairs: Sequence[tuple[str, str]], *, workers: int | None = None, timeout: float = 5.0
) -> list[Verdict]:
    """Verdicts for `pairs` from a pool made for this one call (in a loop, keep one `Verifier` instead)."""
    with Verifier(workers=workers, timeout=timeout) as verifier:
        return verifier.verify(pairs)
