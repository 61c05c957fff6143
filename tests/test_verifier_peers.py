"""The peer graders of bench/RESULTS-verify.md give upstream's verdicts (bench/peers/).

PRM800K's `grade_answer` runs here from PyPI's mathruler, with bench/peers/prm800k.py's one correction
(upstream keeps a bare `%` in `normalize_answer`) and its last-box extraction; the cases are the
behaviours PRM800K's README and grader.py comments name. Qwen2.5-Math's `math_equal` needs a checkout
of its repository, so CI checks the verdicts the bench recorded from it
(bench/peers/qwen25_math_verdicts.jsonl) against Qwen's own unit-test asserts in evaluation/grader.py.
The driver's per-case timeout is checked with a stand-in worker that hangs.
"""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from peers import prm800k  # noqa: E402
from peers.pool import grade_all  # noqa: E402

# (gold, answer, PRM800K's verdict): grade_answer(answer, gold) on bare answers
PRM_CASES = [
    (r"\frac{31}{4}", r"7 \frac{3}{4}", True),  # "Play nice with mixed numbers"
    ("1000", "1,000", True),  # properly formatted commas are stripped ...
    ("(1,000, 2)", "(1000, 2)", True),  # ... but not tuple commas
    ("(1,2)", "(2,1)", False),  # tuple elements in order
    ("(1,2)", "[1,2]", False),  # the enclosing brackets must match
    (r"2\sqrt{2}", r"\sqrt{8}", True),  # sympy.simplify of the difference
    (r"\frac{1}{2}", r"\frac{2}{4}", False),  # "if fractions aren't reduced ... shouldn't be marked as correct"
    (r"\frac{1}{2}", "0.5", True),  # math_normalize: 0.5 -> \frac{1}{2}
    ("5", r"5\text{ cm}", True),  # units on the right removed
    ("evelyn", r"\text{Evelyn}", True),  # enclosing \text removed, case ignored
    ("10", "10.5", False),  # an integer gold needs a strict match
    ("5", "k=5%", False),  # upstream keeps the bare % (mathruler alone says True)
]


@pytest.mark.parametrize("gold,answer,verdict", PRM_CASES)
def test_prm800k_bare_answers(gold, answer, verdict):
    assert prm800k.grade(gold, answer, "answer") is verdict


def test_prm800k_keeps_a_bare_percent_like_upstream():
    prm800k.grade("1", "1", "answer")  # loads mathruler's grader and the correction
    from mathruler import grader

    assert grader.normalize_answer("k=5%") == "5%"  # upstream: only \% is removed; k= goes (<= 2 chars)
    assert grader.normalize_answer(r"k=5\%") == "5"


def test_prm800k_grades_the_last_box_of_a_completion():
    assert prm800k.grade("5", r"First $\boxed{4}$, then the answer is $\boxed{5}$.", "completion")
    assert not prm800k.grade("4", r"First $\boxed{4}$, then the answer is $\boxed{5}$.", "completion")
    assert prm800k.grade(r"\frac{1}{2}", r"so $\boxed{\frac{1}{2}}$", "completion")  # nested braces
    assert prm800k.extract("The answer is 5.") is None and not prm800k.grade("5", "The answer is 5.", "completion")
    assert prm800k.extract(r"so \boxed{\frac{1}{2}") is None  # an unclosed box is no answer


QWEN = "QwenLM/Qwen2.5-Math:evaluation/grader.py"
# evaluation/grader.py TestMathEquality: math_equal(prediction, reference) asserts, as (gold, answer)
QWEN_ASSERTS = [
    ("10", "10", True),
    ("0.1", "10%", True),
    ("0.2", "10%", False),
    ("20", "10", False),
    ("[1, 2, 3]", "[1, 2, 3]", True),
    ("[1, 2, 4]", "[1, 2, 3]", False),
    ("(1, 2, 3)", "(1, 2, 3)", True),
    ("x = y", "x = y", True),
    ("x = z", "x = y", False),
    ("10", "x = 10", True),
]


def test_recorded_qwen_verdicts_reproduce_its_own_asserts():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_verify import QWEN_CACHE, _case_key

    recorded = [json.loads(line) for line in QWEN_CACHE.read_text().splitlines()]
    assert recorded[0]["upstream"].startswith("QwenLM/Qwen2.5-Math@a45202bd16f1ec06f433442dc1152d0074773465:")
    by_key = {d["key"]: d["v"] for d in recorded[1:]}
    rows = [json.loads(line) for line in (ROOT / "tests/data/verify_corpus.jsonl").read_text().splitlines()]
    corpus = {(r["gold"], r["answer"]): r for r in rows if r["source"].startswith(QWEN)}
    for gold, answer, verdict in QWEN_ASSERTS:
        assert by_key[_case_key(corpus[(gold, answer)])] is verdict, (gold, answer)
    assert all(_case_key(r) in by_key for r in rows)  # every corpus case has a recorded verdict


def test_driver_kills_a_hung_case_and_goes_on(tmp_path):
    fake = tmp_path / "fake_worker.py"  # stands in for worker.py: "hang" never answers
    fake.write_text(
        "import json, sys, time\n"
        "print(json.dumps({'ready': sys.argv[-1]}), flush=True)\n"
        "for line in sys.stdin:\n"
        "    gold, answer, form = json.loads(line)\n"
        "    if gold == 'hang':\n"
        "        time.sleep(60)\n"
        "    print(json.dumps({'v': gold == answer} if gold != 'raise' else {'err': 'ValueError'}), flush=True)\n")
    python = tmp_path / "python"  # called as `python worker.py peer`: runs the stand-in instead
    python.write_text(f"#!/bin/sh\nshift\nexec {sys.executable} {fake} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    cases = [("1", "1", "answer"), ("hang", "x", "answer"), ("2", "3", "answer"), ("raise", "x", "answer"),
             ("4", "4", "answer")]
    assert grade_all("fake", cases, workers=1, timeout=1.0, python=python) == [True, "timeout", False, "error", True]
