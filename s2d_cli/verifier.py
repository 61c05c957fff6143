"""Answer checking: the one place in s2d that parses a model's answer and compares it with the gold.

    from s2d_cli.verifier import Verifier
    with Verifier(workers=2, timeout=5.0) as verifier:
        verdicts = verifier.verify([(r"... so the answer is \\boxed{\\frac12}.", "0.5")])
    verdicts[0].reward  # 1.0

The prediction is the content of the LAST `\\boxed{...}` of the completion, as the MATH/AIME graders
take it, read with math-verify. (math-verify on a whole text has its own rules: "\\boxed{3}, but recheck:
\\boxed{5}" parses as the set {3, 5}, which matches neither 3 nor 5.) A completion without any box falls
back to math-verify's own extraction over the whole text ("The answer is $5$.").
Gold answers are normalised first (`normalize_gold`): numbers, zero-padded AIME strings, GSM8K's
"#### N" tails, a solution's last boxed answer. Two plain decimals ("0.0000672", "1,000", "\\$18.90")
are compared exactly; where math-verify matched numbers through a float (it rounds floats to 6 decimal
places), the two must also agree to a relative 5e-6 (`REL_TOL`), so 0.0000001 is not 0.0000002.
A bare "70,110" on either side may be the number or the list (MATH asks for lists "separated by
commas"): a prediction that matches the gold in either reading is right.

math-verify's own timeouts use SIGALRM, which works only in a main thread and does not fire while a
C-level big-integer operation holds the interpreter (`9^{9^{9^{9^9}}}` takes seconds, or forever). So
`Verifier` runs the checks in worker processes and enforces a wall-clock limit per item from the parent:
a worker past its item's deadline is killed with SIGKILL, the item gets verdict "timeout", and a fresh
worker takes its place. A worker that dies on its own gives "error" for the item it was on. Workers are
forks of a clean helper process (see "The pool" below), so the pool is safe to create from a process
that has torch loaded and threads running, and replacing a killed worker costs milliseconds.

Left out on purpose: answers written in words, units beyond what math-verify strips, and any eval()
(math-verify hands sympy's parse_expr only strings of digits and operators).
"""
from __future__ import annotations

import functools
import gc
import json
import math
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing import connection
from pathlib import Path

from .errors import UsageError

VERDICTS = ("ok", "no_answer", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    reward: float  # 1.0 correct, 0.0 otherwise
    correct: bool
    extracted: str | None  # the prediction as read from the completion; None when nothing was found
    verdict: str  # "ok" | "no_answer" | "timeout" | "error"


def _fail(verdict: str, extracted: str | None = None) -> Verdict:
    return Verdict(reward=0.0, correct=False, extracted=extracted, verdict=verdict)


# ---------------------------------------------------------------------------------------------
# Text helpers (pure, no math-verify)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _balanced(text: str, open_at: int) -> int | None:
    """Index of the `}` closing the `{` at `open_at`, skipping escaped braces; None if never closed."""
    depth = 0
    i = open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # `\{` and `\}` are literal braces, not grouping
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, with nested braces; None if there is none.

    `\\boxed 5` (no braces) gives the rest of the line up to a `$`. A last box that is never closed (a
    truncated completion) gives None rather than an earlier answer the model may have revised.
    """
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    rest = text[start:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        open_at = start + len(rest) - len(stripped)
        close_at = _balanced(text, open_at)
        if close_at is None:
            return None
        return text[open_at + 1 : close_at].strip()
    token = re.split(r"[$\n]", stripped, maxsplit=1)[0].rstrip(" .,;")
    return token or None


_THOUSANDS_RE = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+)(\.\d+)?")
_BARE_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+")
_SCIENTIFIC_RE = re.compile(r"([+-]?\d+(?:\.\d+)?)[eE]([+-]?\d+)")
_MAX_POSITIONAL_EXPONENT = 1000  # 1e1000 is 1001 digits; a longer plain form would be a memory hazard


def format_float(x: float) -> str:
    """A finite float in positional notation, as a gold is written: 5e-05 -> '0.00005', 27.0 -> '27',
    2.5e+20 -> '250000000000000000000'. str() would give '5e-05', which math-verify reads as e - 5."""
    if not math.isfinite(x):
        raise ValueError(f"gold answer must be a finite number, not {x!r}")
    if x.is_integer():
        return str(int(x))
    return format(Decimal(repr(x)), "f")  # repr: the shortest digits that round-trip, so 0.1 stays 0.1


def _plain_number(text: str) -> str:
    """'025' -> '25', '1,000' -> '1000', '27.0' -> '27', '2.5e6' -> '2500000', '5e-05' -> '0.00005';
    anything else unchanged."""
    s = text.strip()
    m = _SCIENTIFIC_RE.fullmatch(s)
    if m:  # math-verify reads 5e-05 as e - 5 (Euler's number): write it out
        mantissa, exponent = m.group(1), int(m.group(2))
        if abs(exponent) <= _MAX_POSITIONAL_EXPONENT:
            s = format(Decimal(mantissa).scaleb(exponent), "f")
            if "." in s:
                s = s.rstrip("0").rstrip(".")
        else:
            s = f"{mantissa}\\times10^{{{exponent}}}"
    m = _THOUSANDS_RE.fullmatch(s)
    if m:
        s = m.group(1) + m.group(2).replace(",", "") + (m.group(3) or "")
    if re.fullmatch(r"[+-]?\d+(?:\.0*)?", s):  # an integer: no int(), which refuses 4,300+ digits
        digits = s.split(".")[0].lstrip("+-").lstrip("0") or "0"
        return "-" + digits if s.startswith("-") and digits != "0" else digits
    return s


def gold_type_error(answer) -> str | None:
    """What is wrong with `answer` as a gold (None if nothing): text, an int or a finite float only.
    A list, true/false, an object or NaN would otherwise be graded silently ("['5']" never matches)."""
    if isinstance(answer, str) or (isinstance(answer, int) and not isinstance(answer, bool)):
        return None
    if isinstance(answer, float):
        return None if math.isfinite(answer) else f"expected a finite number, got {json.dumps(answer)}"
    shown = json.dumps(answer, default=lambda o: type(o).__name__)
    return f"expected text or a number, got {shown[:40] + '...' if len(shown) > 40 else shown}"


def normalize_gold(answer) -> str:
    """Gold answer as text: 27.0 -> '27', 5e-05 -> '0.00005', '025' -> '25', '... #### 1,234' -> '1234',
    a solution -> its last box. A bare '70,110' stays as it is: it may be a list (see `_readings`)."""
    if isinstance(answer, bool):
        raise TypeError(f"gold answer must be a number or a string, not {answer!r}")
    if isinstance(answer, int):
        return str(answer)
    if isinstance(answer, float):
        return format_float(answer)
    if not isinstance(answer, str):
        raise TypeError(f"gold answer must be a number or a string, not {type(answer).__name__}")
    s = answer.strip()
    if "####" in s:  # GSM8K: worked solution, then "#### <answer>", always a number
        return _plain_number(s.rsplit("####", 1)[1].strip())
    if _BOXED_RE.search(s):  # a full solution: the gold is its last boxed answer
        s = last_boxed(s) or s
    if _BARE_THOUSANDS_RE.fullmatch(s):  # 70,110: a number or a list of two (see _readings)
        return s
    return _plain_number(s)


def _clean_answer(text: str) -> str:
    """Light LaTeX clean-up before math-verify: thousands separators and a leading `\\$`."""
    s = text.strip().strip("$").strip()
    s = re.sub(r",\\!\s*|\{,\}", ",", s)  # 10,\!080 and 10{,}080 are LaTeX thousands separators
    s = re.sub(r"^\\\$\s*", "", s)
    return _plain_number(s)


def _canon(text: str) -> str:
    """Last-resort string form for comparing answers math-verify cannot parse (`\\text{Evelyn}`)."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:)|\s+|\$", "", s).rstrip(".")
    return s.lower() if re.fullmatch(r"[A-Za-z().,]+", s) else s  # words ignore case, symbols do not


def answer_key(text: str) -> str:
    """A normalised form of an answer, for grouping answers that are written alike (maj@n's votes):
    spacing, `$`, `\\left`/`\\right`, `\\dfrac`, thousands separators, leading zeros and `.0` do not
    matter. Equivalent answers written differently (0.5, \\frac12) still get different keys."""
    return _canon(re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", _clean_answer(text)))


# ---------------------------------------------------------------------------------------------
# math-verify, in-process

_MV = None  # (parse, verify, extraction configs), imported on first use: sympy takes ~1 s to import


def _math_verify():
    global _MV
    if _MV is None:
        import math_verify
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        # We pass parsing_timeout=None / timeout_seconds=None (the signal timers break outside the main
        # thread; the pool enforces time), which makes math-verify log a warning once; it is expected.
        for module in (math_verify.parser, math_verify.grader):
            if hasattr(module, "TIMEOUT_WARNING_SHOWN"):
                module.TIMEOUT_WARNING_SHOWN = True
        # One config object for every call: math-verify caches its compiled regexes per config with
        # lru_cache(maxsize=1), so alternating configs would recompile them on every call.
        configs = (LatexExtractionConfig(), ExprExtractionConfig())
        _MV = (math_verify.parse, math_verify.verify, configs)
    return _MV


def _parse(text: str) -> list:
    parse, _, configs = _math_verify()
    return parse(text, extraction_config=configs, parsing_timeout=None)


def _parse_answer(answer: str) -> list:
    """Parse a bare answer (gold, or a boxed content) with math-verify: `$...$` first, then `\\boxed{...}`."""
    return list(_parse_answer_cached(_clean_answer(answer)))


@functools.lru_cache(maxsize=4096)  # a GRPO group repeats its gold G times, and often its answers too
def _parse_answer_cached(cleaned: str) -> tuple:
    parsed = _parse(f"${cleaned}$") if "\n" not in cleaned and "$" not in cleaned else []
    if not parsed or isinstance(parsed[0], str):
        boxed = _parse(f"\\boxed{{{cleaned}}}")
        if boxed:
            parsed = boxed
    return tuple(parsed)  # sympy objects are immutable; the tuple keeps callers from changing the cache


_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
REL_TOL = 5e-6  # a float answer must agree with the gold to about 6 significant digits (1/3 ~ 0.333333)


def _decimal(text: str) -> Decimal | None:
    """The exact value of a plain decimal answer ('0.0000672', '\\$18.90', '1,000'); None for anything else."""
    s = _clean_answer(text)
    return Decimal(s) if _DECIMAL_RE.fullmatch(s) else None


def _close_enough(gold_parsed, pred_parsed) -> bool:
    """math-verify compares floats rounded to 6 decimal places, so 0.0000001 'equals' 0.0000002 and
    6.7e-5 equals 0.0000672. Where a float took part in a match of two single numbers, also ask for a
    relative error of at most REL_TOL. Anything else (sets, intervals, symbols) keeps math-verify's word."""
    import sympy

    gold, pred = gold_parsed[0], pred_parsed[0]
    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return True
    if not (gold.has(sympy.Float) or pred.has(sympy.Float)):
        return True  # exact (symbolic) equality: no rounding was involved
    try:
        a, b = float(gold), float(pred)
    except (TypeError, ValueError, OverflowError):  # not a real number, or too large for a float
        return True
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0)


def _readings(text: str) -> list[str]:
    """The ways to read an answer: one, except a bare d,ddd such as MATH's "70,110" ("Enter all the
    solutions, separated by commas"), which is the number 70110 or the list 70, 110. LaTeX's own
    thousands separators (10{,}080, 10,\\!080), money and decimals (\\$1,000, 1,000.5) are numbers."""
    s = text.strip().strip("$").strip()
    if _BARE_THOUSANDS_RE.fullmatch(s):
        return [s, s.replace(",", ", ")]  # _clean_answer makes the first 70110; the space keeps the list
    return [text]


def _same(gold_text: str, pred_text: str, pred_parsed: list | None = None) -> bool:
    """Is the prediction (its text, and math-verify's parse of it where there is one) equivalent to
    the gold text?"""
    gold_value, pred_value = _decimal(gold_text), _decimal(pred_text)
    if gold_value is not None and pred_value is not None:
        return gold_value == pred_value  # two plain decimals: exact, whatever their magnitude
    if pred_parsed is None:
        pred_parsed = _parse_answer(pred_text)
    gold_parsed = _parse_answer(gold_text)
    _, verify, _ = _math_verify()
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
        if _close_enough(gold_parsed, pred_parsed):
            return True
    return _canon(_clean_answer(pred_text)) == _canon(_clean_answer(gold_text)) != ""


def verify_one(completion: str, gold) -> Verdict:
    """Check one completion against one gold answer, in this process, without a time limit. Never raises."""
    try:
        gold_text = normalize_gold(gold)
        boxed = last_boxed(completion)
        if boxed is not None:
            if not boxed:
                return _fail("no_answer", boxed)  # \boxed{}
            extracted = boxed
            preds = [(reading, None) for reading in _readings(boxed)]  # parsed when needed
        elif _BOXED_RE.search(completion):
            return _fail("no_answer")  # the last box was never closed: a truncated answer
        else:  # no box at all: math-verify's own extraction ("the answer is $5$", "... is 18.")
            pred = _parse(completion)
            if not pred:
                return _fail("no_answer")
            extracted = next((p for p in reversed(pred) if isinstance(p, str)), str(pred[0]))
            preds = [(extracted, pred)]
        # 70,110 is a number or a list: a prediction that matches either reading is right
        correct = any(_same(g, text, parsed) for g in _readings(gold_text) for text, parsed in preds)
        return Verdict(reward=1.0 if correct else 0.0, correct=correct, extracted=extracted, verdict="ok")
    except Exception:  # a bad item is a verdict, never a crash of the caller
        return _fail("error")


# ---------------------------------------------------------------------------------------------
# The pool
#
#   parent (a trainer: torch loaded, threads running)
#     └─ zygote: a fresh `python -c`, imports math-verify, warms it up, then only forks on request
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


def _worker_main(fd: int, memory_mb: int | None) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _die_with_parent()
    _limit_memory(memory_mb)
    conn = connection.Connection(fd)
    while True:
        try:
            chunk = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        for index, completion, gold in chunk:
            v = verify_one(completion, gold)
            conn.send((index, v.reward, v.correct, v.extracted, v.verdict))


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


def _zygote_main(ctl_fd: int, memory_mb: int | None, warm_up_path: str | None) -> None:
    """Entry point of the zygote process (see the diagram above)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for answer in _WARM_UP_ANSWERS:  # builds math-verify's regexes and the ANTLR parser's DFA once
        verify_one(f"so \\boxed{{{answer}}}", answer)
    if warm_up_path:
        with open(warm_up_path) as f:
            answers = json.load(f)
        os.unlink(warm_up_path)
        for answer in answers:
            try:
                _parse_answer(normalize_gold(answer))
            except Exception:
                pass
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
    WARM_UP_TIMEOUT = 0.1  # ... plus this much per warm-up answer (~3 ms each when idle)

    def __init__(self, memory_mb: int | None, warm_up: Sequence[str]):
        self.warm_up_path = None
        if warm_up:  # a file: argv is too small for a dataset's answers; the zygote deletes it
            with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="s2d-verifier-", delete=False) as f:
                json.dump([a if isinstance(a, str) else normalize_gold(a) for a in warm_up], f)
            self.warm_up_path = f.name
        self.start_timeout = self.START_TIMEOUT + self.WARM_UP_TIMEOUT * len(warm_up)
        self.sock, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])  # so a source checkout works without install
        code = (
            f"import sys; root = {root!r}; sys.path[:0] = [] if root in sys.path else [root]; "
            f"from s2d_cli.verifier import _zygote_main; "
            f"_zygote_main({theirs.fileno()}, {memory_mb!r}, {self.warm_up_path!r})"
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
        if self.warm_up_path and os.path.exists(self.warm_up_path):  # killed before it read the file
            os.unlink(self.warm_up_path)


class _Worker:
    """A worker's pid and pipe, the items it holds (in order) and when its current item started."""

    def __init__(self, pid: int, conn: connection.Connection):
        self.pid = pid
        self.conn = conn
        self.inflight: deque[int] = deque()  # the items sent to it, in the order it checks them
        self.chunks: deque[int] = deque()  # how many of those are left in each chunk sent (at most two)
        self.item_started = 0.0


class _Processes:
    """Everything the pool must stop at the end: the zygote and the workers (both get replaced over time)."""

    def __init__(self, memory_mb: int | None, warm_up: Sequence[str]):
        self.memory_mb, self.warm_up = memory_mb, warm_up
        self.owner_pid = os.getpid()
        self.zygote = _Zygote(memory_mb, warm_up)  # warms up in the background; workers fork on first use
        self.workers: list[_Worker] = []

    def spawn(self) -> _Worker:
        try:
            return _Worker(*self.zygote.fork_worker())
        except RuntimeError:
            # Killed (OOM killer, a stray kill), or stuck on a warm-up answer: start a plain one, once.
            self.zygote.close(kill=True)
            self.warm_up = []
            self.zygote = _Zygote(self.memory_mb, [])
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
    `warm_up`: answers like the ones to come (a dataset's golds). math-verify's LaTeX parser learns as it
    goes and is ~2x slower on its first few hundred answers; parsing these once in the zygote (~3 ms each,
    before the first `verify` can start) teaches every worker at once instead of each on its own.
    `s2d verify` and `s2d eval` pass up to 500 of their distinct golds (`verify.warm_up_golds`).
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
        warm_up: Sequence[str] = (),
    ):
        check_pool_options(workers, timeout)
        self.n_workers = workers or _default_workers()
        self.timeout = float(timeout)
        self._procs = _Processes(memory_mb, list(warm_up))
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
                    size += _wire_size(items[pending[0]])
                    if size > budget:
                        break
                    take.append(pending.popleft())
                if not take:
                    continue
                data = pickle.dumps([(i, *items[i]) for i in take], protocol=pickle.HIGHEST_PROTOCOL)
                try:
                    w.conn.send_bytes(data)
                except OSError:  # it died: the EOF shows up below
                    pending.extendleft(reversed(take))
                    continue
                if not w.inflight:
                    w.item_started = now
                w.inflight.extend(take)
                w.chunks.append(len(take))

            busy = [w.item_started + self.timeout for w in workers if w.inflight]
            wait_s = max(0.0, min(busy) - now) if busy else None
            ready = connection.wait([w.conn for w in workers], timeout=wait_s)

            for slot, w in enumerate(list(workers)):
                dead = False
                if w.conn in ready:
                    try:
                        while w.conn.poll():
                            index, reward, correct, extracted, verdict = w.conn.recv()
                            results[index] = Verdict(reward, correct, extracted, verdict)
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
