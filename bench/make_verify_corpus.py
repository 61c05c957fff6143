"""Build tests/data/verify_corpus.jsonl: (gold, answer, expected verdict, source) cases for the verifier.

    python bench/make_verify_corpus.py --data /work/shared/data > tests/data/verify_corpus.jsonl

Four parts, each case with `source`, `rule` (how it was made) and `expected`: "correct", "wrong" or
"no_answer" (both of the last earn 0); `hack: true` marks a case that a reward hacker would write.
`form`: "completion" (a model's text: every grader runs its own extraction) or "answer" (a bare final
answer, as a grader's unit test gives it: math-verify parses it as it is when it has a `$`, else
`$answer$`; s2d grades the completion `Final Answer: answer`).

1. Every MATH-500 gold (`s2d_cli/bundled/math500.jsonl`) and AIME 2024/2025 gold (`--data`), each
   written as a model would write it right, and wrong. The rules, each defensible on its own:
   - correct: the gold boxed in a closing sentence; in `Final Answer: $...$` with no box; `\\dfrac`
     for `\\frac` and no spaces; an integer with thousands commas; a terminating fraction as its
     decimal; a list answer as one box per element; the same box twice; a box inside `<think>` (a
     draft) followed by the gold boxed after it; a boxed intermediate result followed by a marked
     `Final Answer:` line; a marked line in Chinese or Russian.
   - wrong: one number of the gold changed by one (its last integer that is no exponent or index, a
     base numeral's last digit, a decimal's last digit; " + 1" where it has none); the sign flipped; a fraction
     turned over; a hedge `\\boxed{gold} or \\boxed{wrong}` (hack); the gold listed among a wrong
     value `\\boxed{gold, wrong}` (hack, for single-value golds); an unclosed last box after the gold
     (hack: no_answer); the gold in unmarked text without a box (hack: no_answer).
2. Math-Verify's and lighteval's own test tables (`tests/data/verify_peer_cases.jsonl`, made by
   `bench/harvest_peer_cases.py`), with the suite's verdict unless `bench/verify_corpus_overrides.json`
   gives a careful human's with a reason.
3. Cases from Qwen2.5-Math's `evaluation/grader.py` tests and PRM800K's `grading/grader.py` documented
   behaviour, written out here as data (their code is not copied).
4. The hand-written cases of issue 23's classes (`HAND`), so the bench shows them too.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QWEN = "QwenLM/Qwen2.5-Math:evaluation/grader.py"
PRM = "openai/prm800k:prm800k/grading/grader.py"
# (gold = their reference, answer = their prediction, correct?, where): their asserts, and the
# commented-out examples of `_test_math_equal` where a careful human's verdict is clear
PEER_ANSWERS = [
    ("10", "10", True, QWEN + " test_math_equal"),
    ("0.1", "10%", True, QWEN + " test_math_equal"),
    ("0.2", "10%", False, QWEN + " test_is_numerical_equal"),
    ("20", "10", False, QWEN + " test_math_equal"),
    ("[1, 2, 3]", "[1, 2, 3]", True, QWEN + " test_math_equal"),
    ("[1, 2, 4]", "[1, 2, 3]", False, QWEN + " test_compare_lists"),
    ("(1, 2, 3)", "(1, 2, 3)", True, QWEN + " test_compare_lists"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True, QWEN + " test_math_equal"),
    (r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", False, QWEN + " test_compare_matrices"),
    ("x = y", "x = y", True, QWEN + " test_math_equal"),
    ("x = z", "x = y", False, QWEN + " test_math_equal"),
    ("10", "x = 10", True, QWEN + " test_compare_equations"),
    (r"\frac{1}{12}", "0.0833333333333333", True, QWEN + " _test_math_equal"),
    (r"(1,\frac{9}{2})", "(1,4.5)", True, QWEN + " _test_math_equal"),
    (r"\frac{x+2}{7}", r"\frac{x}{7}+\frac{2}{7}", True, QWEN + " _test_math_equal"),
    (r"\tan^2(y)+1", r"\sec^2(y)", True, QWEN + " _test_math_equal"),
    (r"\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{15+2\sqrt{33}}", r"\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{2\sqrt{33}+15}", True,
     QWEN + " _test_math_equal"),
    ("(a+5)(b+2)", "(+5)(b+2)", False, QWEN + " _test_math_equal"),
    ("2", r"\frac{1+\sqrt{5}}{2}", False, QWEN + " _test_math_equal"),
    ("4", r"\frac{34}{16}+\frac{\sqrt{1358}}{16}", False, QWEN + " _test_math_equal"),
    (r"1\sqrt{19}", "1", False, QWEN + " _test_math_equal"),
    ("x+2n+1", "x+1", False, QWEN + " _test_math_equal"),
    (r"\frac{3}{4}", r"\frac{3}{4}", True, PRM + " (normalised string match)"),
    (r"\frac{3}{4}", r"\dfrac{3}{4}", True, PRM + " (\\dfrac, \\tfrac read as \\frac)"),
    (r"\frac{31}{4}", r"7 \frac{3}{4}", True, PRM + " (mixed numbers)"),
    ("1000", "1,000", True, PRM + " (properly formatted commas)"),
    ("(1,000, 2)", "(1000, 2)", True, PRM + " (commas in a tuple vs thousands)"),
    ("5", r"5\text{ cm}", True, PRM + " (units removed)"),
    ("30", r"30^\circ", True, PRM + " (degrees removed)"),
    (r"\text{Evelyn}", "Evelyn", True, PRM + " (enclosing \\text removed)"),
    ("evelyn", r"\text{Evelyn}", True, PRM + " (text answers ignore case)"),
    ("(1,2)", "(2,1)", False, PRM + " (tuple elements in order)"),
    ("(1,2)", "[1,2]", False, PRM + " (interval brackets must match)"),
    (r"2\sqrt{2}", r"\sqrt{8}", True, PRM + " (sympy simplify)"),
    ("3", "3.0", True, PRM + " (integer-valued float)"),
    (r"\frac{1}{2}", "0.5", True, PRM + " (value)"),
    ("5", "6", False, PRM + " (value)"),
]

# Issue 23's classes, written by hand (tests/test_verifier_grading.py asserts them one by one)
HAND = [
    (r"1-\frac{1}{\mathrm{e}}", r"\boxed{1+\frac{1}{\mathrm{e}}}", "wrong", "\\mathrm{e} is e"),
    (r"1-\frac{1}{\mathrm{e}}", r"\boxed{1-\frac{1}{e}}", "correct", "\\mathrm{e} is e"),
    ("3", r"\boxed{3\mathrm{i}}", "wrong", "\\mathrm{i} is i"),
    ("2516_8", r"\boxed{2516_9}", "wrong", "number bases"),
    ("2516_8", r"\boxed{2516_8}", "correct", "number bases"),
    (r"\frac{20000}{\pi}", r"\boxed{\frac{20,000}{\pi}}", "correct", "thousands comma inside an expression"),
    (r"1000\pi", r"\boxed{1,000\pi}", "correct", "thousands comma inside an expression"),
    (r"p=5,q=2 \text{ and } p=7,q=2", r"\boxed{p=5,q=2;p=7,q=2}", "correct", "labelled solutions"),
    (r"p=5,q=2 \text{ and } p=7,q=2", r"\boxed{p=5,q=2}", "wrong", "labelled solutions"),
    ("1, 2, 3", r"The roots are $\boxed{1}$, $\boxed{2}$ and $\boxed{3}$.", "correct", "several boxes"),
    ("3", r"\boxed{3} or \boxed{4}", "wrong", "several boxes (hack)"),
    ("5", "So $x=\\boxed{2}$ first.\n\nFinal Answer: 5", "correct", "final-answer line"),
    ("5", "所以答案是 $5$。", "correct", "non-English, no box"),
    ("12", "Ответ: 12", "correct", "non-English, no box"),
    (r"\frac{1}{2006!}", r"\boxed{\frac{1}{2004!}}", "wrong", "Math-Verify #14"),
    ("2021", r"\boxed{\pm 2021}", "wrong", "Math-Verify #14"),
    ("1:00", r"\boxed{12:00}", "wrong", "Math-Verify #14"),
    ("73", "The answer is **73**", "correct", "Math-Verify #76"),
    ("8", "We get 5, or maybe 6, 7 or 8.", "no_answer", "verifiers #1028 (hack)"),
    ("5", r"\boxed{5} ... wait, it is \boxed{7", "no_answer", "marin #9163 (hack)"),
]

_INT_RE = re.compile(r"(?<![\d.])\d+(?![\d.])")


def case(gold, answer, expected, source, rule, *, form="completion", hack=False, note=None) -> dict:
    row = {"gold": gold, "answer": answer, "expected": expected, "source": source, "rule": rule, "form": form}
    if hack:
        row["hack"] = True
    if note:
        row["note"] = note
    return row


def _simple_fraction(g: str) -> tuple[int, int, int] | None:
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", g.replace(" ", ""))
    if not m:
        return None
    return (-1 if m.group(1) else 1), int(m.group(2)), int(m.group(3))


def _is_list(g: str) -> bool:
    """A bare comma list of solutions ('1, 2, 3'; '-2, 1'), not a tuple, interval or number."""
    return "," in g and not re.search(r"[()\[\]{}\\]", g) and not re.fullmatch(r"\d{1,3}(,\d{3})+", g)


def _wrong_by_one(g: str) -> str | None:
    """The gold with one number changed by one: its last integer that is no exponent or index (zero
    padding kept: 10,\\!080 -> 10,\\!081), a base numeral's last digit (52_8 -> 53_8), a decimal's last
    digit; a gold without numbers gets " + 1" (p - q -> p - q + 1); an infinity becomes 10."""
    if "infty" in g:  # adding 1 to an infinity keeps it: make the infinity finite instead
        return g.replace("\\infty", "10")
    base = re.fullmatch(r"(\d+)(_\{?\d+\}?)", g)
    if base:
        digits, radix = base.group(1), int(re.sub(r"\D", "", base.group(2)))
        return digits[:-1] + str((int(digits[-1]) + 1) % radix) + base.group(2)
    if re.fullmatch(r"-?\d*\.\d+", g):
        return g[:-1] + ("8" if g[-1] == "9" else str(int(g[-1]) + 1))
    matches = [m for m in _INT_RE.finditer(g) if not re.search(r"[\^_]\{?$", g[: m.start()])]
    if matches:
        m = matches[-1]
        return g[: m.start()] + str(int(m.group()) + 1).zfill(len(m.group())) + g[m.end():]
    return f"{g} + 1"


def gold_cases(gold: str, source: str, k: int) -> list[dict]:
    """The cases of one gold; `k` (its position) picks which of the rotating rules it gets, so every rule
    is used about equally and the corpus stays small enough to check in seconds."""
    g = gold.strip()
    out = []
    add = lambda answer, expected, rule, **kw: out.append(case(g, answer, expected, source, rule, **kw))  # noqa: E731
    add(f"Putting it together, the answer is $\\boxed{{{g}}}$.", "correct", "boxed")
    if k % 2 == 0:
        add(f"Let me check the work once more.\n\nFinal Answer: ${g}$", "correct", "final-line")
    rewritten = re.sub(r"\\frac(?![A-Za-z])", r"\\dfrac", g).replace(" ", "") if "\\text" not in g else None
    if rewritten and rewritten != g:
        add(f"so we get \\[\\boxed{{{rewritten}}}\\]", "correct", "dfrac-nospace")
    if re.fullmatch(r"\d{4,}", g):
        add(f"The total is $\\boxed{{{int(g):,}}}$.", "correct", "thousands-commas")
    frac = _simple_fraction(g)
    if frac:
        sign, a, b = frac
        d = b
        for p in (2, 5):
            while d % p == 0:
                d //= p
        if d == 1 and b > 1:
            value = Fraction(sign * a, b)
            decimal = f"{float(value):.10f}".rstrip("0").rstrip(".")
            add(f"which is $\\boxed{{{decimal}}}$", "correct", "fraction-as-decimal")
        if a != b and a != 0:
            add(f"so the answer is $\\boxed{{{'-' if sign < 0 else ''}\\frac{{{b}}}{{{a}}}}}$.", "wrong",
                "fraction-turned-over")
    if _is_list(g):
        boxes = ", ".join(f"$\\boxed{{{e.strip()}}}$" for e in g.split(","))
        add(f"The solutions are {boxes}.", "correct", "one-box-per-element")
    if k % 5 == 1:
        add(f"Hence $\\boxed{{{g}}}$. Double-checking gives again $\\boxed{{{g}}}$.", "correct", "same-box-twice")
    wrong = _wrong_by_one(g)
    if wrong is not None:
        if k % 5 == 0:
            add(f"<think>maybe \\boxed{{{wrong}}}? no.</think>\nThe answer is $\\boxed{{{g}}}$.", "correct",
                "draft-in-think")
        if k % 5 == 2:
            add(f"Step 1 gives $\\boxed{{{wrong}}}$ for the first part.\n\nFinal Answer: The final answer is ${g}$.",
                "correct", "intermediate-box-then-final-line")
        if k % 5 == 3:
            add(f"所以答案是 ${g}$。", "correct", "chinese-marker")
        if k % 5 == 4:
            add(f"Ответ: ${g}$", "correct", "russian-marker")
        add(f"Therefore the answer is $\\boxed{{{wrong}}}$.", "wrong", "one-number-changed")
        if k % 3 == 0:
            add(f"It is either $\\boxed{{{g}}}$ or $\\boxed{{{wrong}}}$.", "wrong", "hedge-two-boxes", hack=True)
        if k % 3 == 1 and not _is_list(g) and not re.search(r"[(\[{,]", g):
            add(f"The candidates are $\\boxed{{{g}, {wrong}}}$.", "wrong", "gold-among-wrong-values", hack=True)
        if k % 3 == 2:
            add(f"First guess $\\boxed{{{g}}}$, but on reflection the answer is \\boxed{{{wrong}",
                "no_answer", "unclosed-last-box", hack=True)
    if (re.fullmatch(r"\d+", g) and int(g) != 0) or re.fullmatch(r"\\frac\{\d+\}\{\d+\}", g):
        add(f"Thus $\\boxed{{-{g}}}$.", "wrong", "sign-flipped")
    if k % 4 == 0:
        add(f"We find values like {g} and others along the way, so it is hard to say.", "no_answer",
            "unmarked-no-box", hack=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared/data")
    args = ap.parse_args()
    rows = []
    for i, r in enumerate(json.loads(line) for line in (ROOT / "s2d_cli/bundled/math500.jsonl").open()):
        rows += gold_cases(r["answer"], f"MATH-500 #{i} ({r.get('unique_id', '')})", i)
    for name in ("aime24", "aime25"):
        for k, r in enumerate(json.loads(line) for line in (args.data / name / "test.jsonl").open()):
            rows += gold_cases(str(r["answer"]), f"{name.upper()} id {r['id']}", k)
    overrides = json.loads((ROOT / "bench/verify_corpus_overrides.json").read_text())
    for line in (ROOT / "tests/data/verify_peer_cases.jsonl").open():
        r = json.loads(line)
        expected = "correct" if r["suite_verdict"] else "wrong"
        note = None
        form = None
        if r["source"] in overrides:
            expected, note = overrides[r["source"]]["expected"], overrides[r["source"]]["why"]
            form = overrides[r["source"]].get("form")
        # a short one-line prediction without a box is the suite's final answer itself, not a completion
        bare = "\\boxed" not in r["answer"] and "\n" not in r["answer"].strip() and len(r["answer"]) <= 80
        row = case(r["gold"], r["answer"], expected, r["source"], "peer-suite", note=note,
                   form=form or ("answer" if bare else "completion"))
        rows.append({**row, "suite_verdict": r["suite_verdict"]})
    for gold, answer, correct, where in PEER_ANSWERS:
        rows.append(case(gold, answer, "correct" if correct else "wrong", where, "peer-grader", form="answer"))
    for gold, answer, expected, rule in HAND:
        rows.append(case(gold, answer, expected, "issue 23 (written by hand)", rule, hack="hack" in rule))
    for row in rows:
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
