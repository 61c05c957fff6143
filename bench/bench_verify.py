"""Throughput of the verifier pool against checking answers one by one in a single process.

    python bench/bench_verify.py --workers 2 --repeats 3 --out bench/results/verify.md

Records (`--records distinct`, the default): the 500 MATH-500 gold solutions, 500 more MATH test
solutions (problems outside MATH-500; gold = the solution's last box), and 200 model-like completions
built from MATH-500: 100 ending "the final answer is: $\\boxed{...}$", 50 with a wrong boxed answer,
50 with no box at all (math-verify's own extraction over the whole text). `--records math500x2` uses the
MATH-500 solutions twice instead; the second copy then costs little once its parses are cached.

Every repeat starts fresh processes for every method. Before the clock starts, each method checks
`--warm-up` MATH *train* solutions (other problems than the timed ones): math-verify's LaTeX parser
(ANTLR) learns its prediction tables as it meets new inputs, and a fresh process is about twice as slow
on its first few hundred items as later. A trainer's pool lives for the whole run, so the warm numbers
are the ones that matter; the pool checks the warm-up items with its workers, off the clock.
`--warm-up 0` measures cold processes, where every worker pays that learning on its own. Repeats are interleaved, so a busy machine slows all methods alike. Methods:

- `verify_one`, sequential: s2d's own checking (last box, gold normalisation) in a loop, one process;
- math-verify, sequential: `verify(parse("$gold$"), parse(completion))` with its defaults, one process;
- `Verifier(workers=N)`: the pool (zygote start and worker forks happen before the clock starts);
- N independent `verify_one` processes, each on every N-th record, started together after their
  warm-up: no pool and no IPC, so the best N cores of this machine can do.

Besides wall time, the table gives CPU seconds (the pool's = parent + workers, read from /proc). On a
machine other users keep busy, wall-clock speed-ups say little: Linux's autogroup scheduler shares the
CPUs between sessions, not processes, so the pool's workers together get no more CPU than the one
sequential process once another session keeps a CPU busy. CPU time varies by some 20 % there too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit

from s2d_cli.verifier import Verifier, last_boxed, verify_one

DEFAULT_DATA = Path(os.environ.get("S2D_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared/data")
SEQUENTIAL = {"verify_one": "`verify_one`, sequential", "math_verify": "math-verify `parse`+`verify`, sequential"}
Records = list[tuple[str, str]]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def build_records(data_dir: Path, kind: str = "distinct") -> Records:
    """1,200 (completion, gold) pairs; see the module docstring."""
    rows = read_jsonl(data_dir / "math500/test.jsonl")
    gold = [(r["solution"], r["answer"]) for r in rows]
    if kind == "math500x2":
        second = gold
    else:  # 500 more MATH test problems, none of them in MATH-500; their gold is the solution's last box
        seen = {r["problem"] for r in rows}
        more = [(m["solution"], last_boxed(m["solution"])) for m in read_jsonl(data_dir / "math/test.jsonl")
                if m["problem"] not in seen]
        second = [(solution, answer) for solution, answer in more if answer][:500]
    model_like = []
    for i, r in enumerate(rows[:200]):
        body = re.sub(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}", r"\1", r["solution"])  # boxes removed
        intro = f"Let me work through this step by step.\n\n{body}\n\n"
        if i < 100:
            ending = f"Therefore, the final answer is: $\\boxed{{{r['answer']}}}$. I hope it is correct."
        elif i < 150:
            ending = "So the answer is \\boxed{17}."
        else:
            ending = f"The answer is ${r['answer']}$."
        model_like.append((intro + ending, r["answer"]))
    return gold + second + model_like


def build_warm_up(data_dir: Path, n: int) -> Records:
    """`n` MATH train solutions (a fixed shuffle), each against its own last box."""
    train = read_jsonl(data_dir / "math/train.jsonl")
    random.Random(0).shuffle(train)
    pairs = [(t["solution"], last_boxed(t["solution"])) for t in train]
    return [(solution, answer) for solution, answer in pairs if answer][:n]


def check_sequential(method: str, records: Records) -> int:
    if method == "verify_one":
        return sum(verify_one(c, g).correct for c, g in records)
    from math_verify import parse, verify

    return sum(bool(verify(parse(f"${g}$"), parse(c))) for c, g in records)


def run_sequential(method: str, records: Records, warm_up: Records, sync: Path | None = None) -> dict:
    """One timed pass in this (fresh) process, after an untimed one over `warm_up`.

    With `sync` (a folder), it says `ready-<pid>` there after the warm-up and starts on `go`, so that
    several such processes time the same stretch.
    """
    check_sequential(method, warm_up or [(r"\boxed{1}", "1")])
    if sync:
        (sync / f"ready-{os.getpid()}").touch()
        while not (sync / "go").exists():
            time.sleep(0.002)
    wall, cpu = time.perf_counter(), time.process_time()
    correct = check_sequential(method, records)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "correct": correct}


def run_split(child: list[str], n: int) -> dict:
    """`n` independent `verify_one` processes, each on every n-th record, started together: no pool, no
    IPC, so this is what `n` cores of this machine can give at best."""
    with tempfile.TemporaryDirectory() as sync:
        procs = [subprocess.Popen([*child, "--child", "verify_one", "--shard", f"{k}/{n}", "--sync", sync],
                                  stdout=subprocess.PIPE, text=True) for k in range(n)]
        while len(list(Path(sync).glob("ready-*"))) < n and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        (Path(sync) / "go").touch()
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"wall": max(o["wall"] for o in outs), "cpu": sum(o["cpu"] for o in outs),
            "correct": sum(o["correct"] for o in outs)}


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def run_pool(records: Records, warm_up: Records, workers: int, timeout: float) -> dict:
    # The trainer's way: one pool for the whole run; its workers meet the warm-up items first.
    with Verifier(workers=workers, timeout=timeout) as verifier:
        start = time.perf_counter()
        verifier.verify([(r"\boxed{1}", "1")])  # zygote start and worker forks, off the clock
        startup = time.perf_counter() - start
        if warm_up:
            verifier.verify(warm_up)
        pids = verifier.worker_pids()
        cpu = cpu_seconds(pids) + time.process_time()
        wall = time.perf_counter()
        verdicts = verifier.verify(records)
        wall = time.perf_counter() - wall
        replaced = verifier.worker_pids() != pids  # a timeout: the killed worker's CPU time is lost
        cpu = float("nan") if replaced else cpu_seconds(pids) + time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "correct": sum(v.correct for v in verdicts), "startup": startup,
            "verdicts": sorted({v.verdict for v in verdicts})}


def median_cpu(runs: list[dict]) -> float:
    known = [r["cpu"] for r in runs if r["cpu"] == r["cpu"]]  # NaN: a worker was killed mid-run
    return statistics.median(known) if known else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared/data folder")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="the pool's per-item limit, seconds (high: this measures throughput, not timeouts)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--records", choices=("distinct", "math500x2"), default="distinct")
    ap.add_argument("--warm-up", type=int, default=1200, help="untimed MATH train items per method first")
    ap.add_argument("--limit", type=int, default=0, help="time only the first N records (0: all)")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--agreement", action="store_true",
                    help="instead: agreement of s2d, math-verify and the peer graders (bench/peers/) with "
                         "tests/data/verify_corpus.jsonl")
    ap.add_argument("--child", choices=SEQUENTIAL, help=argparse.SUPPRESS)  # one sequential pass, as JSON
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # k/n: the child takes records[k::n]
    ap.add_argument("--sync", type=Path, help=argparse.SUPPRESS)  # see run_sequential
    args = ap.parse_args()
    if args.agreement:
        agreement_main(args)
        return

    records = build_records(args.data, args.records)
    if args.limit:
        records = records[: args.limit]
    warm_up = build_warm_up(args.data, args.warm_up) if args.warm_up else []
    if args.child:
        k, n = map(int, args.shard.split("/"))
        print(json.dumps(run_sequential(args.child, records[k::n], warm_up, args.sync)))
        return

    pool_name = f"`Verifier(workers={args.workers})`"
    split_name = f"{args.workers} independent `verify_one` processes, 1/{args.workers} of the records each"
    runs: dict[str, list[dict]] = {name: [] for name in [*SEQUENTIAL.values(), pool_name, split_name]}
    load_before = os.getloadavg()
    child = [sys.executable, __file__, "--data", str(args.data), "--limit", str(args.limit),
             "--records", args.records, "--warm-up", str(args.warm_up)]
    for repeat in range(args.repeats):
        for method, name in SEQUENTIAL.items():
            out = subprocess.run([*child, "--child", method], check=True, capture_output=True, text=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs[pool_name].append(run_pool(records, warm_up, args.workers, args.timeout))
        runs[split_name].append(run_split(child, args.workers))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {r[-1]['wall']:.2f} s" for name, r in runs.items()), file=sys.stderr)
    load_after = os.getloadavg()

    n = len(records)
    base_wall = statistics.median(r["wall"] for r in runs[SEQUENTIAL["verify_one"]])
    raw_wall = statistics.median(r["wall"] for r in runs[SEQUENTIAL["math_verify"]])
    base_cpu, pool_cpu = median_cpu(runs[SEQUENTIAL["verify_one"]]), median_cpu(runs[pool_name])
    startup = statistics.median(r["startup"] for r in runs[pool_name])
    lines = [
        f"## Verifier throughput: {n} records ({args.records}), {args.repeats} repeats, "
        f"{args.warm_up} warm-up items, fresh processes each repeat",
        "",
        f"{platform.node()}: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable by this process; "
        f"load average {load_before[0]:.1f} before and {load_after[0]:.1f} after (other jobs share the CPUs). "
        f"Pool start-up (zygote import + warm-up + forks), median {startup:.2f} s; "
        f"pool verdicts seen: {sorted({v for r in runs[pool_name] for v in r['verdicts']})}.",
        "",
        "| method | wall min s | median s | max s | items/s (median) | speed-up vs `verify_one` | vs math-verify "
        "| CPU s (median) | CPU ms per item | correct |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        walls = [r["wall"] for r in rs]
        med, cpu = statistics.median(walls), median_cpu(rs)
        lines.append(
            f"| {name} | {min(walls):.2f} | {med:.2f} | {max(walls):.2f} | {n / med:.0f} | {base_wall / med:.2f}x "
            f"| {raw_wall / med:.2f}x | {cpu:.2f} | {1000 * cpu / n:.2f} | {rs[-1]['correct']}/{n} |"
        )
    split_wall = statistics.median(r["wall"] for r in runs[split_name])
    split_cpu = median_cpu(runs[split_name])
    lines += [
        "",
        f"CPU cost relative to `verify_one` in one process: the pool {pool_cpu / base_cpu:.2f}x, "
        f"{args.workers} independent processes {split_cpu / base_cpu:.2f}x (1.00x = none; processes that "
        f"run side by side on this machine each get slower, pool or not). The pool reaches "
        f"{split_wall / statistics.median(r['wall'] for r in runs[pool_name]):.0%} of the independent "
        f"processes' speed-up.",
    ]
    emit(lines, args.out)



# ----------------------------------------------------------------------------------------------
# A short call: pool start on the clock (bench/run.py's row 5 at 500 and 5,000 items)

def short_call_records(data_dir: Path, n: int) -> Records:
    """The first `n` MATH test solutions (5,000 in all) against their own last box."""
    pairs = [(r["solution"], last_boxed(r["solution"])) for r in read_jsonl(data_dir / "math/test.jsonl")]
    return [(solution, answer) for solution, answer in pairs if answer][:n]


def descendants(root: int) -> list[int]:
    """Every live process below `root` (a pool's zygote and its workers), from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def run_short_call(records: Records, workers: int, timeout: float = 30.0) -> dict:
    """What `s2d verify` on a file costs: a fresh pool (zygote import and warm-up, forks), then every
    record. CPU: this process, the zygote and the workers (the peer's includes its import too)."""
    wall, cpu = time.perf_counter(), time.process_time()
    with Verifier(workers=workers, timeout=timeout) as verifier:
        verdicts = verifier.verify(records)
        cpu_pool = cpu_seconds(descendants(os.getpid()))
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu + cpu_pool,
            "correct": sum(v.correct for v in verdicts)}


def run_plain_loop(records: Records) -> dict:
    """math-verify's plain loop in this fresh process, its import on the clock too."""
    wall, cpu = time.perf_counter(), time.process_time()
    from math_verify import parse, verify

    correct = sum(bool(verify(parse(f"${g}$"), parse(c))) for c, g in records)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "correct": correct}


# ----------------------------------------------------------------------------------------------
# Agreement with a careful human on tests/data/verify_corpus.jsonl (bench/RESULTS-verify.md)

CORPUS = Path(__file__).resolve().parents[1] / "tests/data/verify_corpus.jsonl"
PEER_TIMEOUT = 30.0  # seconds per case, as s2d's pool gets here (Qwen2.5-Math's evaluate.py: 3, on a dedicated machine)
QWEN_CACHE = Path(__file__).resolve().parent / "peers/qwen25_math_verdicts.jsonl"
# Peer graders run from their upstream code in bench/peers/.venv (bench/peers/*.py say where each comes
# from, its licence and commit, and how a completion's answer is extracted for it).
PEERS = {
    "qwen25_math": "Qwen2.5-Math `math_equal` (QwenLM/Qwen2.5-Math@a45202b evaluation/grader.py, from a "
                   "checkout; extraction: its `extract_answer` + `strip_string`: Minerva's \"final answer is $...$. I "
                   "hope\", else the last `boxed`, else after \"the answer is\", else the last number)",
    "prm800k": "PRM800K `grade_answer` (openai/prm800k@7ecc794 prm800k/grading/grader.py, via PyPI `mathruler` "
               "0.1.0; extraction: the last `\\boxed{}`, none is no answer)",
}


def s2d_completion(row: dict) -> str:
    """How s2d sees a corpus case: a completion as it is; a bare answer as a marked final-answer line."""
    return f"Final Answer: {row['answer']}" if row["form"] == "answer" else row["answer"]


def _mv_text(text: str, form: str) -> str:
    return text if form == "completion" or "$" in text or "\\boxed" in text else f"${text}$"


def _math_verify_case(args: tuple[str, str, str]) -> bool | None:
    """math-verify called as its README shows: verify(parse(gold), parse(answer)); None if it raised."""
    gold, answer, form = args
    from math_verify import parse, verify

    try:
        return bool(verify(parse(_mv_text(gold, "answer")), parse(_mv_text(answer, form))))
    except Exception:
        return None


def agreement(workers: int) -> dict:
    import multiprocessing

    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    wall = time.perf_counter()
    with Verifier(workers=workers, timeout=30.0) as verifier:
        s2d = [v.correct for v in verifier.verify([(s2d_completion(r), r["gold"]) for r in rows])]
    s2d_wall = time.perf_counter() - wall
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        mv = pool.map(_math_verify_case, [(r["gold"], r["answer"], r["form"]) for r in rows], chunksize=16)
    return {"rows": rows, "s2d": s2d, "math-verify": mv, "s2d_wall": s2d_wall, **peer_verdicts(rows, workers)}


def _case_key(row: dict) -> str:
    import hashlib

    return hashlib.sha1(json.dumps([row["gold"], row["answer"], row["form"]]).encode()).hexdigest()[:16]


def peer_verdicts(rows: list[dict], workers: int) -> dict:
    """Each peer's verdict per case (True, False, "timeout", "error"; None: not run), and how it ran.

    PRM800K runs from PyPI every time. Qwen2.5-Math runs from a checkout named by
    $S2D_QWEN25_MATH_EVAL (its `evaluation/` folder) and its verdicts are recorded in
    bench/peers/qwen25_math_verdicts.jsonl; without a checkout the recorded verdicts are used.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import qwen25_math
    from peers.pool import ensure_venv, grade_all

    out, how = {}, {}
    try:
        python = ensure_venv()
    except (OSError, subprocess.CalledProcessError) as e:  # no PyPI, say: the other rows still come
        why = f"not run: bench/peers/.venv could not be made ({e})"
        return {"peers": out, "peers_how": {p: why for p in PEERS}}
    cases = [(r["gold"], r["answer"], r["form"]) for r in rows]
    wall = time.perf_counter()
    out["prm800k"] = grade_all("prm800k", cases, workers, PEER_TIMEOUT, python=python)
    how["prm800k"] = f"run now, {time.perf_counter() - wall:.0f} s wall"
    src = qwen25_math.source_dir()
    if src is not None:
        wall = time.perf_counter()
        out["qwen25_math"] = grade_all("qwen25_math", cases, workers, PEER_TIMEOUT, python=python)
        how["qwen25_math"] = (f"run now from a checkout (${qwen25_math.ENV}), "
                              f"{time.perf_counter() - wall:.0f} s wall, verdicts recorded in {QWEN_CACHE.name}")
        lines = [json.dumps({"upstream": qwen25_math.UPSTREAM, "timeout_s": PEER_TIMEOUT})]
        by_key = {_case_key(r): v for r, v in zip(rows, out["qwen25_math"])}  # a repeated case once
        lines += [json.dumps({"key": key, "v": v}) for key, v in by_key.items()]
        tmp = QWEN_CACHE.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(QWEN_CACHE)
    elif QWEN_CACHE.exists():
        recorded = [json.loads(line) for line in QWEN_CACHE.read_text().splitlines()]
        by_key = {d["key"]: d["v"] for d in recorded[1:]}
        out["qwen25_math"] = [by_key.get(_case_key(r)) for r in rows]
        missing = sum(v is None for v in out["qwen25_math"])
        how["qwen25_math"] = (f"verdicts recorded in {QWEN_CACHE.name} ({recorded[0]['upstream']}); set "
                              f"${qwen25_math.ENV} to a checkout's evaluation/ folder to rerun"
                              + (f"; {missing} cases have no recorded verdict (not rewarded)" if missing else ""))
    else:
        how["qwen25_math"] = f"not run: set ${qwen25_math.ENV} to a checkout's evaluation/ folder"
    return {"peers": out, "peers_how": how}


def part(row: dict) -> str:
    if row["rule"] == "peer-suite":
        return "Math-Verify / lighteval test tables"
    if row["rule"] == "peer-grader":
        return "Qwen2.5-Math / PRM800K grader cases"
    if row["source"].startswith("issue 23"):
        return "issue 23 classes (by hand)"
    return "MATH-500 / AIME rewrites and perturbations"


def agreement_report(res: dict) -> list[str]:
    rows = res["rows"]
    want = [r["expected"] == "correct" for r in rows]
    peers = res.get("peers", {})
    graders = {"s2d": res["s2d"], "math-verify (README call)": res["math-verify"]}
    graders.update({PEERS[p]: [v is True for v in peers[p]] for p in PEERS if p in peers})
    short = {name: name.split(" (")[0] for name in graders}
    parts = list(dict.fromkeys(part(r) for r in rows))
    everything = range(len(rows))

    def agree(got, idx) -> int:
        return sum(bool(got[i]) == want[i] for i in idx)

    def rate(got, idx) -> str:
        return f"{agree(got, idx)}/{len(idx)} ({agree(got, idx) / len(idx):.2%})"

    hacks = [i for i, r in enumerate(rows) if r.get("hack")]
    lines = [
        "# Verifier agreement with a careful human",
        "",
        f"{len(rows):,} cases in `tests/data/verify_corpus.jsonl` (made by `bench/make_verify_corpus.py`; "
        "the rules of each part are in its docstring): gold, answer, the verdict a careful human gives, and "
        "the source. A grader agrees when it rewards exactly the cases marked `correct` (`wrong` and "
        "`no_answer` both earn 0). Regenerated by `make bench` (`python bench/bench_verify.py --agreement "
        "--out bench/RESULTS-verify.md`).",
        "",
        "| grader | all cases | " + " | ".join(parts) + " | reward-hack cases rewarded |",
        "|---|---|" + "---|" * len(parts) + "---|",
    ]
    for name, got in graders.items():
        cells = [rate(got, [i for i in everything if part(rows[i]) == p]) for p in parts]
        taken = sum(bool(got[i]) for i in hacks)
        lines.append(f"| {name} | {rate(got, everything)} | " + " | ".join(cells) + f" | {taken}/{len(hacks)} |")
    for p in PEERS:
        if p not in peers:
            lines.append(f"| {PEERS[p]} | {res['peers_how'][p]} |" + " |" * len(parts) + " |")
    overridden = [r for r in rows if r.get("note")]
    suite = [i for i, r in enumerate(rows) if "suite_verdict" in r]
    on_suite = {short[name]: sum(bool(got[i]) == rows[i]["suite_verdict"] for i in suite)
                for name, got in graders.items()}
    lines += [
        "",
        f"s2d checked the corpus in {res['s2d_wall']:.1f} s wall with its pool "
        f"({len(os.sched_getaffinity(0))} CPUs usable, load average {os.getloadavg()[0]:.1f}).",
    ]
    if res.get("peers_how"):
        lines += [
            "",
            "The peers run upstream's own code (no port), in their own venv (`bench/peers/.venv`, upstream's "
            "pins: sympy 1.12, antlr4 4.11.1), one worker process per CPU, each case limited to "
            f"{PEER_TIMEOUT:.0f} s, as s2d's pool is here (a timeout or an exception earns 0, as in Qwen2.5-Math's own "
            "evaluate.py). "
            "Where each comes from, its licence, and why it is not a port: `bench/peers/qwen25_math.py`, "
            "`bench/peers/prm800k.py`. A bare answer (the unit-test cases, `form: answer`) goes to each "
            "grader as an already extracted answer. "
            + " ".join(f"{short[PEERS[p]]}: {res['peers_how'][p]}"
                       + (f"; timeouts: {sum(v == 'timeout' for v in peers[p])}, "
                          f"exceptions: {sum(v == 'error' for v in peers[p])}." if p in peers else ".")
                       for p in PEERS),
        ]
    if peers:
        no_box = [i for i in everything if rows[i]["form"] == "completion" and "\\boxed{" not in rows[i]["answer"]]
        lines += [
            "",
            "Much of the peers' disagreement is their extraction, not their comparison: of the completions with "
            f"no `\\boxed{{` ({len(no_box)}; a marked `Final Answer:` line, prose, a non-English marker), "
            + ", ".join(f"{short[PEERS[p]]} disagrees on {len(no_box) - agree([v is True for v in peers[p]], no_box)}"
                        for p in PEERS if p in peers)
            + f", s2d on {len(no_box) - agree(res['s2d'], no_box)}, math-verify on "
            f"{len(no_box) - agree(res['math-verify'], no_box)}.",
        ]
    lines += [
        "",
        f"Of the {sum(r['rule'] == 'peer-suite' for r in rows)} cases from the Math-Verify and lighteval test "
        f"tables, {len(overridden)} carry a verdict other than the suite's, each with its reason in the "
        "case's `note` (from `bench/verify_corpus_overrides.json`): "
        + "; ".join(f"{n} x {why[:90]}..." for why, n in _count(r["note"] for r in overridden)) + ". "
        "Against the suites' own verdicts instead: "
        + ", ".join(f"{name} {n}/{len(suite)}" for name, n in on_suite.items())
        + " (most of the difference: prose without a box or a marked line, which s2d leaves unrewarded on purpose).",
        "",
        "## Where a peer does better than s2d",
        "",
    ]
    better = []
    for label, groups in (("part", parts), ("rule", sorted({r["rule"] for r in rows}))):
        for g in groups:
            idx = [i for i in everything if (part(rows[i]) if label == "part" else rows[i]["rule"]) == g]
            mine = agree(res["s2d"], idx)
            better += [f"- {label} `{g}`: {short[name]} {agree(got, idx)}/{len(idx)}, s2d {mine}/{len(idx)}"
                       for name, got in graders.items() if name != "s2d" and agree(got, idx) > mine]
    lines += better or ["- nowhere: on every part and every rule of the corpus, s2d agrees at least as often "
                        "as each peer"]
    lines += ["", "## Where s2d disagrees", ""]
    misses = [i for i in everything if bool(res["s2d"][i]) != want[i]]
    lines += [f"- {rows[i]['source']}: gold `{rows[i]['gold'][:60]}`, answer `{rows[i]['answer'][-80:]}`; "
              f"expected {rows[i]['expected']}, s2d {'rewards' if res['s2d'][i] else 'does not reward'} it"
              for i in misses] or ["- none"]
    names = list(graders)
    lines += ["", "## Disagreements by rule of the case (cases where each grader disagrees)", "",
              "| rule | cases | " + " | ".join(short[n] for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for rule, n in _count(r["rule"] for r in rows):
        idx = [i for i in everything if rows[i]["rule"] == rule]
        miss = [len(idx) - agree(graders[name], idx) for name in names]
        if any(miss):
            lines.append(f"| {rule} | {n} | " + " | ".join(str(m) for m in miss) + " |")
    return lines


def _count(items) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


def agreement_main(args) -> None:
    lines = agreement_report(agreement(args.workers))
    emit(lines, args.out)


if __name__ == "__main__":
    main()
