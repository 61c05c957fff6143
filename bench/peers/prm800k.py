"""PRM800K's `grade_answer`, run from PyPI's `mathruler` (no port: its code is not in this repository).

    from prm800k import grade
    grade(gold="\\frac{31}{4}", answer="7 \\frac{3}{4}", form="answer")  # True

Upstream: openai/prm800k, prm800k/grading/grader.py (`grade_answer`) and math_normalize.py
(`normalize_answer`), commit 7ecc794703b2877f63226f2477a49b34f9b25163 (the files last changed in
00811d6); MIT License, Copyright (c) 2023 OpenAI. The repository's setup.py names a package `prm800k`
0.0.1 that was never published, so it is run from `mathruler` 0.1.0 on PyPI (hiyouga, Apache-2.0),
whose `mathruler/grader.py` and `mathruler/math_normalize.py` carry the same two files. Compared line
by line with upstream at that commit, they differ in imports, raw-string spellings of the same regexes,
one f-string, and one real change: `_strip_string` removes a bare `%` (`r"%"`) where upstream removes
`\\%` twice (`"\\\\%"` and `"\\%"` are the same string) and keeps a bare `%`. `grade` undoes that one
change by hiding bare `%` from mathruler's `normalize_answer` (`_upstream_normalize_answer`), so the
verdicts are upstream's. (`_normalize`, the grader's second normalisation, drops `%` in both.)

Extraction: `grade_answer(given_answer, ground_truth)` takes an answer already extracted. PRM800K's own
samples end with a `# Answer` line, which no completion of s2d's corpus has; the MATH convention that
the corpus and the graders around PRM800K's (mathruler's `evaluate`, PRM800K's ground truth solutions)
use is the last `\\boxed{...}`, brace-matched: `mathruler.grader.extract_boxed_content`, and no box is no
answer. A bare answer (corpus `form: answer`) is graded as it is.

Runs inside bench/peers/.venv (bench/peers/requirements.txt) through bench/peers/worker.py, which the
bench drives with a per-item timeout: sympy can hang on untrusted text, and upstream has no limit.
"""
from __future__ import annotations

import re

UPSTREAM = "openai/prm800k@7ecc794703b2877f63226f2477a49b34f9b25163:prm800k/grading/grader.py"
_HIDDEN_PERCENT = "\ue000"  # a private-use character: no step of `_strip_string` touches it


def _load():
    from mathruler import grader  # PyPI mathruler 0.1.0: PRM800K's grader.py + math_normalize.py

    original = grader.normalize_answer

    def _upstream_normalize_answer(answer):
        """Upstream keeps a bare `%` here (only `\\%` is removed); mathruler drops it."""
        if answer is None:
            return None
        hidden = re.sub(r"(?<!\\)%", _HIDDEN_PERCENT, answer)
        out = original(hidden)
        return out.replace(_HIDDEN_PERCENT, "%") if isinstance(out, str) else out

    grader.normalize_answer = _upstream_normalize_answer  # grade_answer looks the name up at call time
    return grader


_grader = None


def extract(completion: str) -> str | None:
    """The last `\\boxed{...}` of a completion (brace-matched), or None when there is none."""
    global _grader
    _grader = _grader or _load()
    boxed = _grader.extract_boxed_content(completion)
    return None if boxed == "None" and "\\boxed{None}" not in completion else boxed


def grade(gold: str, answer: str, form: str) -> bool:
    """PRM800K's verdict: `answer` a completion (`form="completion"`) or a bare answer."""
    global _grader
    _grader = _grader or _load()
    given = extract(answer) if form == "completion" else answer
    return bool(_grader.grade_answer(given, gold))
