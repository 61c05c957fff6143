"""A short verifier call: what makes it fast changes no verdict (issue 23, start-up).

Most of a short call's CPU (`s2d verify` on 500 records, the pool started on the clock) goes to
math-verify's LaTeX parser learning its prediction tables; the pool's processes parse two-stage
(`s2d_cli/two_stage_parse.py`: ANTLR's SLL prediction, LL only where SLL fails). Here, by effect: the
two-stage parser gives latex2sympy's own trees and errors, including on the inputs only its LL stage
can parse; the zygote every worker is forked from parses two-stage; and the pool's verdicts equal
in-process checking with latex2sympy's own parser on MATH solutions and on the verify corpus. Golds that
are plain numbers (most of MATH's) are parsed lazily, only when a prediction needs it: which golds those
are is checked on a table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
from conftest import shared_data_dir
from latex2sympy2_extended.latex2sympy2 import latex2sympy

from s2d_cli import two_stage_parse
from s2d_cli.grading import DEFAULT_RULES, OLD_RULES
from s2d_cli.verifier import Verifier, _plain_decimal_gold, verify_one

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()

# Inputs SLL prediction cannot finish, which the LL stage parses (found by running both on MATH-500
# answers and the verify corpus): polynomials, an interval, an equation, a labelled pair.
NEED_LL = [r"x^3+3x-6", r"x^5 - x^4 + x^3 - x^2 + x - 1", r"6r^2-4r-24", r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]",
           r"a^2 + b = 0", r"a_3 = 2, a_{37} = 19", r"15\mbox{ cm}^2"]
SLL_ENOUGH = [r"\frac{1}{2}", r"2\sqrt{2}", r"\left( 3, \frac{\pi}{2} \right)", r"[2, 5)", r"-\frac{3}{4}", r"\{1, 2\}"]
NOT_LATEX = [r"\frac{1}{", r"3 +* 4", r"x^", r"\left( 1, 2", r")("]  # syntax errors: both raise the same message


def _outcome(text: str):
    try:
        return "tree", sympy.srepr(latex2sympy(text))
    except Exception as e:  # noqa: BLE001  (the error itself is part of what must not change)
        return "error", str(e)


@pytest.fixture
def latex_parser_restored():
    yield
    two_stage_parse.uninstall()


def _math500() -> list[dict]:
    path = SHARED_DATA / "math500/test.jsonl"
    if not path.is_file():
        pytest.fail(f"{path} not found (set S2D_SHARED_DATA to the shared/data folder)")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_stage_parsing_gives_latex2sympys_own_trees_and_errors(latex_parser_restored):
    texts = [*NEED_LL, *SLL_ENOUGH, *NOT_LATEX, *list(dict.fromkeys(r["answer"] for r in _math500()))[:200]]
    two_stage_parse.uninstall()
    assert not two_stage_parse.installed()
    own = [_outcome(t) for t in texts]

    assert two_stage_parse.install() and two_stage_parse.installed()
    assert two_stage_parse.install()  # a second install is a no-op, not a second wrapper
    ll_stage = []
    two_stage = []
    for t in texts:
        before = two_stage_parse.ll_parses
        two_stage.append(_outcome(t))
        ll_stage.append(two_stage_parse.ll_parses - before)
    assert two_stage == own
    assert {kind for kind, _ in own[:len(NEED_LL) + len(SLL_ENOUGH)]} == {"tree"}
    assert {kind for kind, _ in own[len(NEED_LL) + len(SLL_ENOUGH):][:len(NOT_LATEX)]} == {"error"}
    # the LL stage ran exactly where SLL could not finish: the inputs that need it, and syntax errors
    assert ll_stage[:len(NEED_LL)] == [1] * len(NEED_LL)
    assert ll_stage[len(NEED_LL):len(NEED_LL) + len(SLL_ENOUGH)] == [0] * len(SLL_ENOUGH)
    assert ll_stage[len(NEED_LL) + len(SLL_ENOUGH):][:len(NOT_LATEX)] == [1] * len(NOT_LATEX)
    assert sum(ll_stage) < len(texts) // 2  # most MATH answers are SLL's alone: the speed-up

    two_stage_parse.uninstall()
    assert not two_stage_parse.installed() and [_outcome(t) for t in NEED_LL] == own[:len(NEED_LL)]


def test_the_zygote_parses_two_stage_before_it_forks():
    # the zygote's preparation, in a fresh process as the zygote runs it: every worker forks after it
    code = ("from s2d_cli import two_stage_parse; from s2d_cli.verifier import _warm_up; _warm_up(); "
            "print(two_stage_parse.installed(), two_stage_parse.ll_parses)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    installed, ll_parses = out.stdout.split()
    assert installed == "True"
    assert int(ll_parses) >= 1  # its warm-up polynomial x^2 + 2x + 1 went through both stages


def test_the_pool_grades_like_latex2sympys_own_parser_in_process(latex_parser_restored):
    two_stage_parse.uninstall()
    rows = _math500()
    pairs = [(r["solution"], r["answer"]) for r in rows[:60]]
    pairs += [(rows[i]["solution"], rows[i + 1]["answer"]) for i in range(30)]  # mostly wrong
    corpus = [json.loads(line) for line in (ROOT / "tests/data/verify_corpus.jsonl").read_text().splitlines()]
    pairs += [(f"Final Answer: {r['answer']}" if r["form"] == "answer" else r["answer"], r["gold"])
              for r in corpus[::30]]
    assert len(pairs) > 200
    with Verifier(workers=2, timeout=60.0) as verifier:  # generous: this compares verdicts, not speed
        pooled = verifier.verify(pairs)
    in_process = [verify_one(c, g) for c, g in pairs]
    assert not two_stage_parse.installed()  # the comparison really was against latex2sympy's own parser
    assert [i for i, (a, b) in enumerate(zip(pooled, in_process)) if a != b] == []
    assert sum(v.correct for v in pooled) > 90 and sum(not v.correct for v in pooled) > 60


@pytest.mark.parametrize(
    ("gold", "plain"),
    [
        ("161", True), (161, True), (27.0, True), (5e-05, True), ("-3", True), ("025", True), ("0.5", True),
        (r"\$18.90", True), (r"10{,}080", True), ("#### 1,600", True),
        (r"so the answer is \boxed{12}.", True),  # a solution: its box is the gold
        ("1,000", False), ("70,110", False),  # may be the list 1, 0 / 70, 110: math-verify reads those
        (r"\frac{1}{2}", False), ("x^2+1", False), (r"\text{(A)}", False), ("2516_8", False),
        (r"\boxed{1}, \boxed{2}", False),  # two boxes: the list "1, 2"
    ],
)
def test_golds_that_are_plain_numbers_are_left_for_a_prediction_to_parse(gold, plain):
    assert _plain_decimal_gold(gold, DEFAULT_RULES) is plain
    # with the old rules only the last box is the gold: the number 2
    assert _plain_decimal_gold(gold, OLD_RULES) is (plain or gold == r"\boxed{1}, \boxed{2}")


def test_a_plain_number_gold_still_grades_predictions_that_need_its_parse():
    pairs = [(r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{0.50}", "0.5"), (r"\boxed{\frac{3}{6}}", 0.5),
             (r"\boxed{\frac{1}{3}}", "0.5"), (r"\boxed{161}", "161"), (r"\boxed{16.1}", "161"),
             (r"\boxed{\sqrt{25921}}", "161")]
    with Verifier(workers=1, timeout=60.0) as verifier:
        verdicts = verifier.verify(pairs)
    assert [(v.verdict, v.correct) for v in verdicts] == [
        ("ok", True), ("ok", True), ("ok", True), ("ok", False), ("ok", True), ("ok", False), ("ok", True)]


def test_the_pool_grades_with_its_parents_s2d_not_one_in_the_current_directory(tmp_path):
    # `python -c` puts the current directory first on sys.path: the zygote must still import the s2d_cli
    # its parent runs, not another checkout's (here, one that refuses to be imported)
    (tmp_path / "s2d_cli").mkdir()
    (tmp_path / "s2d_cli/__init__.py").write_text("raise ImportError('the s2d_cli of the current directory')\n")
    script = tmp_path / "scripts/check.py"
    script.parent.mkdir()
    script.write_text("from s2d_cli.verifier import Verifier\n"
                      "with Verifier(workers=1, timeout=60.0) as v:\n"
                      "    print([x.correct for x in v.verify([(r'\\boxed{\\frac{1}{2}}', '0.5'), (r'\\boxed{3}', '4')])])\n")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[True, False]"
