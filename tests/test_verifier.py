"""The verifier: answer extraction, equivalences, the real benchmark golds, and the pool's timeouts/crashes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import shared_data_dir
from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.errors import UsageError
from s2d_cli.grading import OLD_RULES, GradingRules
from s2d_cli.verifier import Verdict, Verifier, last_boxed, normalize_gold, verify_many, verify_one

SHARED_DATA = shared_data_dir()

# Inputs math-verify needs seconds (or forever) for: a tower of powers, deep nesting, a 20k-term sum.
TOWER = r"\boxed{9^{9^{9^{9^{9}}}}}"
NESTED = r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}"
LONG_SUM = r"\boxed{" + "+".join(f"x_{{{i}}}" for i in range(20_000)) + "}"


def read_jsonl(name: str) -> list[dict]:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found (set S2D_SHARED_DATA to the shared/data folder)")
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{5}.", "5"),
        (r"\boxed{3} no wait \boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # the last one counts
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not grouping
        (r"$\boxed 5$", "5"),
        (r"\fbox{12}", "12"),
        (r"\boxed{3} and then \boxed{4", None),  # the last box is cut off: no answer, not the earlier 3
        ("no box at all", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        (27.0, "27"),
        (-1.0, "-1"),
        (0.5, "0.5"),
        (70, "70"),
        ("025", "25"),
        ("  073 ", "73"),
        ("Janet sells 9 eggs.\n#### 1,600", "1600"),
        ("70,110", "70,110"),  # a number or a list: both readings are tried
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        (r"So the answer is $\boxed{\text{east}}$.", r"\text{east}"),
        (5e-05, "0.00005"),  # str()/repr() give "5e-05", which math-verify reads as e - 5
        (-1.5e-07, "-0.00000015"),
        (2.5e20, "250000000000000000000"),
        ("2.5e6", "2500000"),
        ("5E-5", "0.00005"),
    ],
)
def test_normalize_gold(gold, expected):
    assert normalize_gold(gold) == expected


# --------------------------------------------------------------------------------------------- equivalences

EQUIVALENCES = [  # (completion, gold, correct?)
    (r"The answer is \boxed{0.5}.", r"\frac{1}{2}", True),
    (r"\boxed{\frac12}", "0.5", True),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True),
    (r"\boxed{0.6}", r"\frac{1}{2}", False),
    (r"\boxed{[2, 5)}", "[2,5)", True),
    (r"\boxed{(2, 5)}", "[2,5)", False),  # open vs half-open interval
    (r"\boxed{(-\infty, 3] \cup [5, \infty)}", r"(-\infty,3]\cup[5,\infty)", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)", False),
    (r"\boxed{-2, 1}", "1, -2", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True),
    (r"\boxed{3\sqrt{2}}", r"2\sqrt{2}", False),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{25}", "025", True),  # AIME golds are zero-padded strings
    (r"\boxed{025}", "25", True),
    (r"\boxed{52}", "025", False),
    (r"\boxed{27}", 27.0, True),  # AMC golds are floats
    (r"\boxed{-1}", -1.0, True),
    (r"\boxed{27.5}", 27.0, False),
    (r"\boxed{0.00005}", 5e-05, True),  # float golds in scientific notation
    (r"\boxed{5\times10^{-5}}", 5e-05, True),
    (r"\boxed{0.00006}", 5e-05, False),
    (r"\boxed{e-5}", 1e-05, False),  # Euler's number minus 5 is not 0.00001
    (r"\boxed{2500000}", "2.5e6", True),
    (r"\boxed{2.5e6}", "2500000", True),
    (r"\boxed{2600000}", "2.5e6", False),
    (r"\boxed{0.0000672}", ".0000672", True),  # small decimals: exact, not to 6 decimal places
    (r"\boxed{0.0000673}", ".0000672", False),
    (r"\boxed{0.000067}", ".0000672", False),
    (r"\boxed{0.0000001}", "0.0000002", False),
    (r"\boxed{6.72\times10^{-5}}", ".0000672", True),  # a float against a power of ten: relative 5e-6
    (r"\boxed{6.7\times10^{-5}}", ".0000672", False),
    (r"\boxed{10^{-7}}", "0.0000002", False),
    (r"\boxed{0.333333}", r"\frac{1}{3}", True),  # six significant digits still match a fraction
    (r"\boxed{0.33}", r"\frac{1}{3}", False),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{1000.0}", "1,000", True),
    (r"\boxed{2.50}", r"\$2.5", True),
    (r"\boxed{1,600}", "#### 1,600", True),  # GSM8K: thousands separators on either side
    (r"\boxed{1600}", "She earns 5 * 320 = 1600\n#### 1,600", True),
    (r"\boxed{16000}", "#### 1,600", False),
    (r"\boxed{\$32,348}", r"\$32,\!348", True),
    (r"\boxed{11111111100}", r"11,\! 111,\! 111,\! 100", True),
    (r"\boxed{18.9}", r"\$18.90", True),
    (r"\boxed{70, 110}", "70,110", True),  # MATH's "Enter all the solutions, separated by commas"
    (r"\boxed{110, 70}", "70,110", True),
    (r"\boxed{70, 100}", "70,110", False),
    (r"\boxed{70110}", "70,110", True),  # ... or the number: either reading counts
    (r"\boxed{81,256}", "81, 256", True),  # the same on the prediction side
    (r"\boxed{81,257}", "81, 256", False),
    (r"\boxed{58500}", "58,500", True),
    (r"\boxed{10{,}080}", "10, 80", False),  # LaTeX's thousands separators always make a number
    (r"\boxed{10,\!080}", "10080", True),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
    (r"\boxed{Evelyn}", r"\text{Evelyn}", True),
    (r"\boxed{\text{Bob}}", r"\text{Evelyn}", False),
    (r"\boxed{(C)}", r"\text{(C)}", True),
    (r"\boxed{\text{(D)}}", r"\text{(C)}", False),
    (r"\boxed{90}", r"90^\circ", True),
    (r"\boxed{\frac{270}{7}}", r"\frac{270}7\text{ degrees}", True),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
    (r"First \boxed{3}, but recheck: \boxed{5}", "5", False),  # two different boxes: a hedge, never rewarded
    (r"First \boxed{5}, but recheck: \boxed{3}", "5", False),
    (r"The answer is $5$.", "5", True),  # no box: math-verify's own extraction
    ("So the answer is 18 dollars.", "#### 18", True),  # no box: a marked final-answer line
]


@pytest.mark.parametrize(("completion", "gold", "correct"), EQUIVALENCES)
def test_equivalence_table(completion, gold, correct):
    v = verify_one(completion, gold)
    assert (v.verdict, v.correct, v.reward) == ("ok", correct, 1.0 if correct else 0.0), v


@pytest.mark.parametrize(
    "completion", ["I am not sure.", r"\boxed{}", r"... so the answer is \boxed{\frac{1}{", ""]
)
def test_no_answer(completion):
    v = verify_one(completion, "5")
    assert (v.verdict, v.correct, v.reward) == ("no_answer", False, 0.0)
    assert v.extracted in (None, "")


def test_integers_longer_than_pythons_int_str_limit_still_compare():
    big = "9" * 5000  # int() refuses more than 4,300 digits: this was an "error" verdict
    assert verify_one(rf"\boxed{{{big}}}", big) == Verdict(1.0, True, big, "ok")
    assert not verify_one(rf"\boxed{{{big}}}", "8" + big[1:]).correct
    assert normalize_gold("000" + big) == big


def test_extracted_is_the_box_content_or_the_list_of_different_boxes():
    v = verify_one(r"so \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}2")
    assert v == Verdict(1.0, True, r"\frac{\sqrt{3}}{2}", "ok")
    v = verify_one(r"maybe \boxed{4}? no: \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}2")
    assert v == Verdict(0.0, False, r"4, \frac{\sqrt{3}}{2}", "ok", multi_box=True)
    # the old rule (grade_boxes=last) takes the last box alone
    v = verify_one(r"maybe \boxed{4}? no: \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}2", GradingRules(boxes="last"))
    assert v == Verdict(1.0, True, r"\frac{\sqrt{3}}{2}", "ok")
    assert verify_one("So the total is 18 dollars.", "#### 18", OLD_RULES).correct  # the old whole-text search


def test_bad_input_is_an_error_verdict_not_an_exception():
    assert verify_one(r"\boxed{1}", None).verdict == "error"  # type: ignore[arg-type]
    assert verify_one(None, "1").verdict == "error"  # type: ignore[arg-type]


def test_small_benchmark_golds_match_their_own_boxed_answers():
    """AIME 24 ("025"), AIME 25 (ints), AMC 23 (27.0) and GSM8K ("#### 1,600"), as the datasets store them."""
    pairs = [(rf"\boxed{{{int(r['answer'])}}}", r["answer"]) for f in ("aime24", "aime25", "amc23")
             for r in read_jsonl(f"{f}/test.jsonl")]
    gsm8k = read_jsonl("gsm8k/test.jsonl")[:200]
    pairs += [(rf"\boxed{{{r['answer'].rsplit('####', 1)[1].strip()}}}", r["answer"]) for r in gsm8k]
    assert len(pairs) == 30 + 30 + 40 + 200
    verdicts = [verify_one(c, g) for c, g in pairs]
    assert [(c, g) for (c, g), v in zip(pairs, verdicts) if not v.correct] == []
    off_by_one = [(rf"\boxed{{{int(r['answer']) + 1}}}", r["answer"]) for r in read_jsonl("aime24/test.jsonl")]
    assert not any(verify_one(c, g).correct for c, g in off_by_one)


# --------------------------------------------------------------------------------------------- the pool


def test_math500_gold_solutions_verify_against_their_answers():
    rows = read_jsonl("math500/test.jsonl")
    assert len(rows) == 500
    pairs = [(r["solution"], r["answer"]) for r in rows]
    verifier = Verifier(workers=2, timeout=30.0)  # generous: this checks answers, not speed
    verdicts = verifier.verify(pairs[:250])
    pids = verifier.worker_pids()
    verdicts += verifier.verify(pairs[250:])
    # and a control: each of the first 100 solutions against the next problem's answer
    shifted = verifier.verify([(rows[i]["solution"], rows[i + 1]["answer"]) for i in range(100)])
    assert verifier.worker_pids() == pids and len(pids) == 2  # the same workers serve every call
    verifier.close()

    wrong = [(r["unique_id"], r["answer"], v) for r, v in zip(rows, verdicts) if not v.correct]
    assert wrong == []
    assert {v.verdict for v in verdicts} == {"ok"}
    assert verdicts[0].extracted == r"\left( 3, \frac{\pi}{2} \right)"  # the last box of the first solution
    # wrong, except where the two answers agree (problem 22's "5" and problem 23's "x=5")
    agree = [i for i in range(100) if verify_one(rf"\boxed{{{rows[i]['answer']}}}", rows[i + 1]["answer"]).correct]
    assert agree == [22]
    assert [i for i, v in enumerate(shifted) if v.correct] == agree

    deadline = time.monotonic() + 5  # close() leaves no process behind
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        verifier.verify(pairs[:1])


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped


@pytest.fixture(scope="module")
def pool():
    with Verifier(workers=2, timeout=1.0) as verifier:
        verifier.verify([(r"\boxed{1}", "1")])  # fork the workers now, outside the timed parts
        yield verifier


def test_pathological_answers_time_out_and_the_rest_still_verify(pool):
    pids_before = set(pool.worker_pids())
    batch = [(r"\boxed{\frac{1}{2}}", "0.5"), (TOWER, "5"), (r"\boxed{25}", "025"), (LONG_SUM, "5"),
             (r"\boxed{7}", "8"), (r"\boxed{2\sqrt2}", r"\sqrt8")]
    start = time.monotonic()
    verdicts = pool.verify(batch)
    elapsed = time.monotonic() - start
    assert [(v.verdict, v.correct) for v in verdicts] == [
        ("ok", True), ("timeout", False), ("ok", True), ("timeout", False), ("ok", False), ("ok", True)]
    assert elapsed < 3.0  # two 1 s deadlines, one per worker, in parallel
    assert set(pool.worker_pids()).isdisjoint(pids_before)  # both stuck workers were replaced
    # ... and the replacements work
    assert [v.correct for v in pool.verify([(r"\boxed{3}", 3.0)] * 5 + [(r"\boxed{4}", 3.0)])] == [True] * 5 + [False]


def test_a_third_pathological_shape_times_out_too(pool):
    start = time.monotonic()
    assert [v.verdict for v in pool.verify([(NESTED, "1"), (r"\boxed{1}", "1")])] == ["timeout", "ok"]
    assert time.monotonic() - start < 3.0


def test_long_completions_queued_behind_a_stuck_item_do_not_block_its_deadline():
    # 40 completions of ~40 KB go out in chunks of 10 (~400 KB, more than a socket buffer holds). Were the
    # second chunk pushed to the worker while it is stuck on item 9, the send would block the deadline.
    long = [(f"{'Let me think about it. ' * 1800}\\boxed{{{i}}}", str(i)) for i in range(40)]
    long[9] = (long[9][0][:-10] + TOWER, "9")
    with Verifier(workers=1, timeout=1.0) as verifier:
        verifier.verify([(r"\boxed{1}", "1")])
        start = time.monotonic()
        verdicts = verifier.verify(long)
        elapsed = time.monotonic() - start
    assert [v.verdict for v in verdicts] == ["ok"] * 9 + ["timeout"] + ["ok"] * 30
    assert all(v.correct for i, v in enumerate(verdicts) if i != 9)
    assert elapsed < 6.0


def test_a_crashed_worker_costs_only_its_own_item():
    with Verifier(workers=1, timeout=60.0) as verifier:
        assert verifier.verify([(r"\boxed{27}", 27.0)])[0].correct
        (pid,) = verifier.worker_pids()
        killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))  # like the OOM killer, mid-item
        killer.start()
        batch = [(TOWER, "5")] + [(rf"\boxed{{{i}}}", str(i)) for i in range(7)]  # chunks of 2 items
        verdicts = verifier.verify(batch)
        killer.join()
        assert [v.verdict for v in verdicts] == ["error"] + ["ok"] * 7
        assert all(v.correct for v in verdicts[1:])
        assert verifier.worker_pids() != [pid]


def test_works_from_an_unguarded_script_and_from_a_thread(tmp_path):
    # multiprocessing's spawn/forkserver would re-run this script in every worker (no __main__ guard);
    # the zygote never imports the caller's __main__. GRPO may verify from a non-main thread.
    script = tmp_path / "train.py"
    script.write_text(
        "import threading\n"
        "from s2d_cli.verifier import Verifier\n"
        "out = []\n"
        "def step():\n"
        "    with Verifier(workers=1, timeout=5.0) as v:\n"
        "        out.extend(x.verdict + str(x.correct) for x in v.verify([(r'\\boxed{1}', '1'), ('x', '1')]))\n"
        "t = threading.Thread(target=step)\n"
        "t.start()\n"
        "t.join()\n"
        "print(out)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip() == "['okTrue', 'no_answerFalse']", result.stderr


def test_verify_many_preserves_order():
    pairs = [(rf"\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(30)]
    verdicts = verify_many(pairs, workers=2, timeout=10.0)
    assert [v.correct for v in verdicts] == [i % 3 != 0 for i in range(30)]
    assert [v.extracted for v in verdicts] == [str(i) for i in range(30)]


# --------------------------------------------------------------------------------------------- pool options


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The error contract: exit 2, exactly one line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2d: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_timeout_must_be_finite_and_positive(timeout):
    # NaN compares false with everything: `timeout <= 0` let it through and every deadline vanished
    with pytest.raises(ValueError, match="--timeout") as e:
        Verifier(workers=1, timeout=timeout)
    assert isinstance(e.value, UsageError)  # one line, exit 2, when a command passes it on


def test_workers_zero_is_every_cpu_and_negative_is_refused():
    with pytest.raises(ValueError, match="--workers"):
        Verifier(workers=-1, timeout=1.0)
    with Verifier(workers=0, timeout=1.0) as verifier:
        assert verifier.n_workers == len(os.sched_getaffinity(0))


def test_no_more_workers_than_items():
    """`--workers 100000` forked 100000 workers for a one-record file (the shell hung); the pool grows only
    as far as a call has items for, and keeps its workers for the next call."""
    with Verifier(workers=64, timeout=10.0) as verifier:
        assert verifier.verify([(r"\boxed{1}", "1")])[0].correct
        assert len(verifier.worker_pids()) == 1
        assert all(v.correct for v in verifier.verify([(rf"\boxed{{{i}}}", str(i)) for i in range(3)]))
        assert len(verifier.worker_pids()) == 3


@pytest.mark.parametrize("args, message", [
    (["--timeout", "nan"], "--timeout: expected a finite number in (0, 86400], got nan"),
    (["--timeout", "inf"], "--timeout: expected a finite number in (0, 86400], got inf"),
    (["--set", "timeout=nan"], "--set: timeout: expected a finite number in (0, 86400], got nan"),
    (["--workers", "-1"], "--workers: expected a process count >= 0"),
    (["--set", "shard_size=0"], "shard_size: expected >= 1, got 0"),
    (["--set", "shard_size=-5"], "shard_size: expected >= 1, got -5"),
])
def test_verify_refuses_bad_pool_options_in_one_line(tmp_path, args, message):
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"completion": r"\boxed{1}", "answer": "1"}) + "\n")
    assert message in one_line_error(invoke("verify", records, *args, "--out", tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_verify_passes_float_golds_as_numbers_not_as_their_str(tmp_path):
    records = tmp_path / "in.jsonl"
    rows = [(r"\boxed{0.00005}", 5e-05), (r"\boxed{e-5}", 1e-05), (r"\boxed{27}", 27.0), (r"\boxed{0.25}", 0.25)]
    records.write_text("".join(json.dumps({"completion": c, "answer": a}) + "\n" for c, a in rows))
    assert '"answer": 5e-05' in records.read_text()  # how json writes the float
    result = invoke("verify", records, "--workers", 1, "--out", "-")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["answer"], r["correct"]) for r in out] == [(5e-05, True), (1e-05, False), (27.0, True), (0.25, True)]


@pytest.mark.parametrize("gold, message", [
    (["5"], 'field \'answer\': expected text or a number, got ["5"]'),  # was graded correct against \boxed{5}
    (True, "field 'answer': expected text or a number, got true"),  # was graded wrong whatever the answer
    ({"a": 1}, 'field \'answer\': expected text or a number, got {"a": 1}'),
    (float("nan"), "field 'answer': expected a finite number, got NaN"),  # the output then held invalid JSON
    (float("inf"), "field 'answer': expected a finite number, got Infinity"),
])
def test_verify_refuses_golds_that_are_not_text_or_finite_numbers(tmp_path, gold, message):
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"completion": r"\boxed{5}", "answer": "5"}) + "\n"
                       + json.dumps({"completion": r"\boxed{5}", "answer": gold}) + "\n")
    line = one_line_error(invoke("verify", records, "--out", tmp_path / "out"))
    assert line == f"s2d: error: {records}:2: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert verify_one(r"\boxed{5}", gold).verdict == "error"  # in-process: an error verdict, never a grade


# --------------------------------------------------------------------------------------------- --reward


@pytest.mark.parametrize("source, expected", [
    ("def fn(completion, answer):\n    return 1.0 +\n", "cannot import module 's2d_reward_probe' (SyntaxError: "),
    ("raise RuntimeError('no GPU here')\n", "cannot import module 's2d_reward_probe' (RuntimeError: no GPU here)"),
    ("def other(completion, answer):\n    return 1.0\n", "module 's2d_reward_probe' has no attribute 'fn'"),
    ("fn = 3\n", "not a function"),
])
def test_a_reward_module_that_fails_to_load_is_a_usage_error(tmp_path, monkeypatch, source, expected):
    from s2d_cli.rewards import load_reward_fn

    (tmp_path / "s2d_reward_probe.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "s2d_reward_probe", raising=False)
    with pytest.raises(UsageError) as e:
        load_reward_fn("s2d_reward_probe:fn")
    message = str(e.value)
    assert message.startswith("--reward s2d_reward_probe:fn: ") and expected in message, message
    assert len(message.splitlines()) == 1
    sys.modules.pop("s2d_reward_probe", None)


def test_a_reward_module_that_loads_gives_its_function(tmp_path, monkeypatch):
    from s2d_cli.rewards import load_reward_fn

    (tmp_path / "s2d_reward_ok.py").write_text("def fn(completion, answer):\n    return float(answer == '5')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("s2d_reward_ok:fn")
    assert (fn("x", "5"), fn("x", "6")) == (1.0, 0.0)
    assert load_reward_fn("math") is None
    sys.modules.pop("s2d_reward_ok", None)


# --------------------------------------------------------------------------------------------- grading rules


@pytest.fixture
def pools(monkeypatch):
    """Records the rules each Verifier is made with (the pools still run)."""
    import s2d_cli.verifier as verifier_module

    made = []

    class Recording(verifier_module.Verifier):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("rules"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(verifier_module, "Verifier", Recording)
    return made


def test_verify_and_eval_grade_by_their_grade_keys_and_record_them(tmp_path, pools):
    path = tmp_path / "in.jsonl"
    rows = [("a", r"\boxed{5}", "5"), ("a", r"\boxed{4} or \boxed{5}", "5"), ("b", r"\boxed{0.00005}", 5e-05),
            ("c", "x", "70,110")]
    path.write_text("".join(json.dumps({"id": i, "completion": c, "answer": a}) + "\n" for i, c, a in rows))
    result = invoke("verify", path, "--workers", 1, "--out", tmp_path / "v")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "v/manifest.json").read_text())
    assert manifest["config"]["grade_boxes"] == "all" and manifest["config"]["grade_no_box"] == "marked"
    assert manifest["verdict_rates"] == {"no_answer": 0.25, "timeout": 0.0, "error": 0.0, "multi_box": 0.25}
    assert "no-answer 25.0%, timeout 0.0%, error 0.0%, multi-box 25.0%" in result.stderr
    result = invoke("verify", path, "--workers", 1, "--out", "-", "--set", "grade_boxes=last")
    assert [json.loads(line)["correct"] for line in result.stdout.splitlines()] == [True, True, True, False]
    result = invoke("eval", "--rollouts", path, "--workers", 1)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["verdict_rates"]["multi_box"] == 0.25
    assert pools == [GradingRules(), GradingRules(boxes="last"), GradingRules()]
    result = invoke("verify", path, "--out", "-", "--set", "grade_boxes=first")
    assert result.exit_code == 2 and "grade_boxes: expected all or last, got 'first'" in result.stderr
