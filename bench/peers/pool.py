"""Drive peer graders (bench/peers/worker.py) in their own venv, with a wall-clock limit per case.

    from peers.pool import grade_all, ensure_venv
    python = ensure_venv()                       # bench/peers/.venv, made once from requirements.txt
    verdicts = grade_all("prm800k", cases, workers=2, timeout=10.0, python=python)

`cases` are (gold, answer, form) triples; each verdict is True/False, "timeout" (the worker was
killed past `timeout` seconds and restarted) or "error" (upstream code raised). Neither of the last two
is a reward. Each of `workers` threads owns one worker process and feeds it one case at a time, so a
hung case costs one restart, never the run. Runs in s2d's venv with the standard library only.
"""
from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
Verdict = bool | str


def venv_python() -> Path:
    return VENV / "bin/python"


def ensure_venv() -> Path:
    """bench/peers/.venv with requirements.txt installed (once; a marker records which file did it)."""
    marker = VENV / ".requirements"
    want = (HERE / "requirements.txt").read_text()
    if venv_python().exists() and marker.exists() and marker.read_text() == want:
        return venv_python()
    print(f"peers: making {VENV} from {HERE / 'requirements.txt'} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", "-r", str(HERE / "requirements.txt")],
                   check=True)
    marker.write_text(want)
    return venv_python()


class _Worker:
    def __init__(self, peer: str, python: Path, env: dict):
        self.args, self.env = [str(python), str(HERE / "worker.py"), peer], env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=self.env, bufsize=1)
        line = self._read(timeout)  # imports: minutes on a loaded machine are possible, so a wide limit
        if line is None or "ready" not in line:
            self.kill()
            raise RuntimeError(f"peer worker {' '.join(self.args[1:])} did not start (got {line!r})")

    def _read(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line or None  # "": the worker died

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait()
        self.proc = None

    def grade(self, case: tuple[str, str, str], timeout: float, start_timeout: float) -> Verdict:
        if self.proc is None:
            self.start(start_timeout)
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self._read(timeout)
        if line is None:
            self.kill()  # hung (or died): the next case gets a fresh worker
            return "timeout"
        out = json.loads(line)
        return bool(out["v"]) if "v" in out else "error"


def grade_all(peer: str, cases: list[tuple[str, str, str]], workers: int, timeout: float,
              python: Path | None = None, env: dict | None = None, start_timeout: float = 300.0,
              progress_every: float = 30.0) -> list[Verdict]:
    """Every case's verdict from `peer`, in order; see the module docstring."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    todo: queue.Queue = queue.Queue()
    for i, case in enumerate(cases):
        todo.put((i, case))
    out: list[Verdict | None] = [None] * len(cases)
    failures: list[BaseException] = []

    def run() -> None:
        worker = _Worker(peer, python or venv_python(), env)
        try:
            while True:
                try:
                    i, case = todo.get_nowait()
                except queue.Empty:
                    return
                out[i] = worker.grade(case, timeout, start_timeout)
        except BaseException as e:  # noqa: BLE001 -- reported below, after the other threads stop
            failures.append(e)
            while True:  # drain, so the other threads finish too
                try:
                    todo.get_nowait()
                except queue.Empty:
                    break
        finally:
            worker.kill()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(max(1, min(workers, len(cases))))]
    for t in threads:
        t.start()
    last = time.monotonic()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=1.0)
        if time.monotonic() - last > progress_every:
            done = sum(v is not None for v in out)
            print(f"peers: {peer} {done}/{len(cases)}", file=sys.stderr)
            last = time.monotonic()
    if failures:
        raise failures[0]
    return out  # type: ignore[return-value]
