"""Grading: one completion against one gold answer, in this process — the pure half of the verifier.

    from s2d_cli.grading import GradingRules, verify_one
    verify_one(r"... so the answer is \\boxed{\\frac12}.", "0.5").correct    # True
    verify_one(r"\\boxed{3} or \\boxed{4}", "3").correct                     # False: two different answers
    verify_one(r"\\boxed{1}, \\boxed{2} and \\boxed{3}", "1, 2, 3").correct  # True: one list over three boxes
    verify_one("Final Answer: 5", 5).correct                                 # True: a marked final line
    verify_one("so it is 5", 5).verdict                                      # 'no_answer': nothing marked
    verify_one("so it is 5", 5, GradingRules(no_box="search")).correct       # True: the old whole-text search

`s2d_cli.verifier.Verifier` runs `verify_one` in worker processes with a wall-clock limit; call it
directly only on text you trust to parse quickly (math-verify has no usable time limit in-process).

What the answer is (`GradingRules`; each rule is the config key `grade_<rule>` of verify, eval, grpo
and opd, recorded in their manifests; the old behaviour is one `--set` away):
- With `boxes="all"`, the answer part is the text after the last `</think>` when there is one (a
  reasoning model's boxes inside its thinking are drafts), else the whole completion.
- `boxes="all"`: every `\\boxed{}` / `\\fbox{}` counts. Boxes that say the same thing are one answer;
  different ones are read together as one list ("a, b, c"), right only when the gold is that list —
  so `\\boxed{3} or \\boxed{4}`, two contradicting boxes, or a list that contains the gold among wrong
  values earn nothing. `boxes="last"`: only the last box counts (the MATH/AIME graders' rule, and
  s2d's before). A gold solution with several boxes is read the same way.
- A last box that is never closed (a truncated completion) is no answer (`no_answer`), whatever came
  before it; an empty `\\boxed{}` too.
- `final_line=True`: a clearly marked final-answer line after the last box replaces it (a boxed
  intermediate result, then "Final Answer: 5"). `FINAL_MARKERS` lists the markers: "Final Answer",
  "The answer is", a line that starts with "Answer", and their Chinese, Japanese, Korean, Russian, French, Spanish,
  Portuguese, German and Italian forms, and GSM8K's `####`. A word does not replace a box. The
  last marker that gives an answer counts; its answer is read from the first sentence after it (the
  next line when the marker ends its line; a display `\\[...\\]` opened on it, to its end): the text
  after its last " is " or " = " ("The largest $n$ is 34", "面积 = 72000 / 18 = 4000"), its `$...$` / `\\(...\\)` /
  `\\[...\\]` math (several: their list), a number followed by words ("18 dollars"), a trailing
  number, the only number among words; `**bold**` is removed. Two numbers among words are no answer.
- `no_box="marked"`: with no box, the answer is that marked line's; no marker, `no_answer` (so a
  completion cannot score by scattering numbers for a whole-text search to find). `no_box="search"`:
  math-verify's own extraction over the whole text, as before.
- `normalize=True`: before math-verify, `\\mathrm{e}` / `\\mathrm{i}` (and `\\text`, `\\operatorname`)
  are the constants e and i (math-verify drops them as units); `2516_8` is a numeral in base 8, equal
  only to the same digits in the same base (or with no base written); thousands commas inside an
  expression (`\\frac{20,000}{\\pi}`, `1,000\\pi`) are removed; labelled solutions
  (`p=5,q=2; p=7,q=2`, `x=1 \\text{ or } x=2`) are compared as a set of solutions; `12:00` is a time of
  day compared as one; `\\pm` on one side only never matches; two exact numbers (`1/2004!`,
  `1/2006!`) must be exactly equal. `normalize=False` hands the text to math-verify as before.

Gold answers are normalised first (`normalize_gold`): numbers, zero-padded AIME strings, GSM8K's
"#### N" tails, a solution's boxed answer. Two plain decimals ("0.0000672", "1,000", "\\$18.90")
are compared exactly; where math-verify matched numbers through a float (it rounds floats to 6 decimal
places), the two must also agree to a relative 5e-6 (`REL_TOL`), so 0.0000001 is not 0.0000002.
A bare "70,110" on either side may be the number or the list (MATH asks for lists "separated by
commas"): a prediction that matches the gold in either reading is right.

Left out on purpose: answers written in words, units beyond what math-verify strips, and any eval()
(math-verify hands sympy's parse_expr only strings of digits and operators).
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, fields
from decimal import Decimal

from .errors import UsageError

VERDICTS = ("ok", "no_answer", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    reward: float  # 1.0 correct, 0.0 otherwise
    correct: bool
    extracted: str | None  # the prediction as read from the completion; None when nothing was found
    verdict: str  # "ok" | "no_answer" | "timeout" | "error"
    multi_box: bool = False  # the answer was read from several different boxes (a list, or a hedge)


def _fail(verdict: str, extracted: str | None = None, multi_box: bool = False) -> Verdict:
    return Verdict(reward=0.0, correct=False, extracted=extracted, verdict=verdict, multi_box=multi_box)


class RulesError(UsageError, ValueError):
    """A bad grading rule: a ValueError to Python callers, one line and exit 2 at the shell."""


@dataclass(frozen=True)
class GradingRules:
    """How an answer is read and compared (see the module docstring); the defaults are s2d's rules."""

    boxes: str = "all"        # all: every box counts, different boxes are one list | last: the last box only
    final_line: bool = True   # a marked final-answer line after the last box replaces it
    no_box: str = "marked"    # marked: no box -> a marked final-answer line or no_answer | search: whole text
    normalize: bool = True    # pre-normalise e/i, bases, commas, labelled solutions, times, exact numbers

    def __post_init__(self):
        if self.boxes not in ("all", "last"):
            raise RulesError(f"grade_boxes: expected all or last, got {self.boxes!r}")
        if self.no_box not in ("marked", "search"):
            raise RulesError(f"grade_no_box: expected marked or search, got {self.no_box!r}")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULT_RULES = GradingRules()
OLD_RULES = GradingRules(boxes="last", final_line=False, no_box="search", normalize=False)  # s2d before issue 23


@dataclass
class GradingFields:
    """The grading rules as flat config keys, for the commands that grade (verify, eval, grpo, opd)."""

    grade_boxes: str = "all"      # all: several different boxes are one list (never one of them) | last
    grade_final_line: bool = True  # a marked "Final Answer: ..." line after the last box replaces it
    grade_no_box: str = "marked"  # no box: marked (a marked final-answer line, else no_answer) | search
    grade_normalize: bool = True  # pre-normalise before math-verify (\\mathrm{e}, 2516_8, 1,000\\pi, ...)

    def grading_rules(self) -> GradingRules:
        return GradingRules(boxes=self.grade_boxes, final_line=self.grade_final_line, no_box=self.grade_no_box,
                            normalize=self.grade_normalize)


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


def _boxes(text: str):
    """(start, end, content) of every top-level `\\boxed` / `\\fbox` in `text`, in order; content None for
    a box never closed (then the scan stops: everything after an unclosed brace is inside it)."""
    pos = 0
    for m in _BOXED_RE.finditer(text):
        if m.start() < pos:
            continue  # a box inside the previous box
        brace = _OPEN_BRACE_RE.match(text, m.end())
        if brace:
            close_at = _balanced(text, brace.end() - 1)
            if close_at is None:
                yield m.start(), len(text), None
                return
            yield m.start(), close_at + 1, text[brace.end() : close_at].strip()
            pos = close_at + 1
        else:
            line = _BARE_BOX_RE.match(text, m.end())
            token = line.group(1).rstrip(" .,;")
            yield m.start(), line.end(), token or None
            pos = line.end()


_OPEN_BRACE_RE = re.compile(r"\s*\{")
_BARE_BOX_RE = re.compile(r"\s*([^$\n]*)")


def all_boxed(text: str) -> list[str | None]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}` in `text`, in order, with nested braces; a box that
    is never closed gives None. `\\boxed 5` (no braces) gives the rest of the line up to a `$`."""
    return [content for _, _, content in _boxes(text)]


def _last_box_end(text: str) -> int:
    """Index just past the last box of `text`; -1 when there is none."""
    return max((end for _, end, _ in _boxes(text)), default=-1)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, with nested braces; None if there is none.

    `\\boxed 5` (no braces) gives the rest of the line up to a `$`. A last box that is never closed (a
    truncated completion) gives None rather than an earlier answer the model may have revised.
    """
    boxes = all_boxed(text)
    return boxes[-1] if boxes else None


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


def normalize_gold(answer, rules: GradingRules = DEFAULT_RULES) -> str:
    """Gold answer as text: 27.0 -> '27', 5e-05 -> '0.00005', '025' -> '25', '... #### 1,234' -> '1234',
    a solution -> its boxed answer (several different boxes: their list, with `boxes="all"`; the last
    box with `boxes="last"`). A bare '70,110' stays as it is: it may be a list (see `_readings`)."""
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
    if _BOXED_RE.search(s):  # a full solution: the gold is its boxed answer
        boxes = [b for b in all_boxed(s) if b]
        if rules.boxes == "all" and len(dict.fromkeys(map(answer_key, boxes))) > 1:
            s = ", ".join(dict.fromkeys(boxes))
        else:
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


def _close_enough(gold_parsed, pred_parsed, exact: bool) -> bool:
    """math-verify compares floats rounded to 6 decimal places, so 0.0000001 'equals' 0.0000002 and
    6.7e-5 equals 0.0000672. Where a float took part in a match of two single numbers, also ask for a
    relative error of at most REL_TOL. With `exact`, two numbers without floats (1/2004! and 1/2006!,
    which math-verify compares numerically and finds equal) must be exactly equal. Anything else (sets,
    intervals, symbols) keeps math-verify's word."""
    import sympy

    gold, pred = gold_parsed[0], pred_parsed[0]
    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return True
    if not (gold.has(sympy.Float) or pred.has(sympy.Float)):
        if exact and gold.is_number and pred.is_number and (gold.has(sympy.factorial) or pred.has(sympy.factorial)):
            a, b = gold.doit(), pred.doit()  # exact big integers: factorial(2006) has 5,700 digits, fine
            if a.is_Rational and b.is_Rational:
                return a == b
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


# ---------------------------------------------------------------------------------------------
# Pre-normalisation (GradingRules.normalize): what math-verify's LaTeX normalisation gets wrong

_CONSTANT_RE = re.compile(r"\\(?:mathrm|textrm|text|operatorname|mathit|rm)\s*\{\s*([ei])\s*\}|\\mathrm\s+([ei])(?![A-Za-z])")
# a thousands-comma number with a sign of being inside an expression: `{` before it, or `}`, a command,
# a letter or `^` after it (never a comma after it: "1,000, 2" may be a list)
_INNER_THOUSANDS_RE = re.compile(
    r"(?:(?<=\{)(\d{1,3}(?:,\d{3})+)(?![\d,])|(?<![\d,.])(\d{1,3}(?:,\d{3})+)(?=[}\\A-Za-z^]))")
_BASE_RE = re.compile(r"(?:\\text\{)?\s*([0-9A-Za-z]+)\s*\}?\s*_\s*\{?\s*\(?\s*(\d{1,2})\s*\)?\s*\}?")
_TIME_RE = re.compile(
    r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(?:\\(?:text|mathrm)\{\s*)?\\?\s*([ap])\.?\s*\\?\s*m\.?\s*\}?|(\d{1,2}):(\d{2})(?::(\d{2}))?",
    re.I)
_PM_RE = re.compile(r"\\[pm]p(?![A-Za-z])|±|∓")


def _prenormalize(text: str) -> str:
    """`\\mathrm{e}` -> `e`, `\\mathrm{i}` -> `i`, `\\frac{20,000}{\\pi}` -> `\\frac{20000}{\\pi}`."""
    s = _CONSTANT_RE.sub(lambda m: m.group(1) or m.group(2), text)
    if not _BARE_THOUSANDS_RE.fullmatch(s.strip().strip("$").strip()):  # a bare 70,110: see _readings
        s = _INNER_THOUSANDS_RE.sub(lambda m: (m.group(1) or m.group(2)).replace(",", ""), s)
        if re.search(r",\s", s):  # elements are separated by ", ": a comma with no space is a thousands one
            s = re.sub(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d.]|,\d)", lambda m: m.group().replace(",", ""), s)
    return s


def _base_numeral(text: str) -> tuple[str, int] | None:
    """'2516_8' -> ('2516', 8), '\\text{A3}_{16}' -> ('A3', 16); None unless the whole answer is one
    numeral with a base subscript whose digits fit that base."""
    m = _BASE_RE.fullmatch(text.strip().strip("$").strip())
    if not m:
        return None
    digits, base = m.group(1).upper(), int(m.group(2))
    if not 2 <= base <= 36 or any(int(d, 36) >= base for d in digits):
        return None
    return digits.lstrip("0") or "0", base


def _same_numeral(gold: str, pred: str) -> bool | None:
    """Compare answers where either is a numeral with a base: the same digits, and the same base unless one
    side writes none (the question named it). None when neither side has a base."""
    g, p = _base_numeral(gold), _base_numeral(pred)
    if g is None and p is None:
        return None
    plain = lambda s: re.sub(r"\s|\\text\{|\}", "", s.strip().strip("$")).upper().lstrip("0") or "0"  # noqa: E731
    g = g or (plain(gold), None)
    p = p or (plain(pred), None)
    return g[0] == p[0] and (g[1] is None or p[1] is None or g[1] == p[1])


def _time_of_day(text: str) -> tuple[int, int, int, str] | None:
    m = _TIME_RE.fullmatch(text.strip().strip("$").strip().rstrip("."))
    if not m:
        return None
    if m.group(1) is not None:
        return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), m.group(4).lower()
    return int(m.group(5)), int(m.group(6)), int(m.group(7) or 0), ""


_SOLUTION_SPLIT_RE = re.compile(r";|\\text\{\s*(?:and|or)\s*\}|\\\\|\b(?:and|or)\b")
_LABELLED_RE = re.compile(r"\s*([A-Za-z](?:_\{?\w+\}?)?)\s*=\s*([^=]+?)\s*")


def _solutions(text: str) -> list[dict[str, str]] | None:
    """'p=5,q=2; p=7,q=2' -> [{'p': '5', 'q': '2'}, {'p': '7', 'q': '2'}]; None unless every part is a
    list of `name = value`. A part that names a variable twice (`x=1, x=2`) is one solution per item."""
    s = re.sub(r"\\(?:[ ,;:!]|q?quad)", " ", text).strip().strip("$").strip()  # LaTeX spaces: `\ `, `\quad`
    if "=" not in s:
        return None
    out = []
    for part in _SOLUTION_SPLIT_RE.split(s):
        part = part.strip().strip(",").strip()
        if not part:
            continue
        items = [_LABELLED_RE.fullmatch(item) for item in part.split(",")]
        if not all(items):
            return None
        names = [m.group(1) for m in items]
        if len(set(names)) < len(names):
            out += [{m.group(1): m.group(2)} for m in items]
        else:
            out.append({m.group(1): m.group(2) for m in items})
    return out or None


def _same_solutions(gold: str, pred: str, rules: GradingRules) -> bool | None:
    """Labelled solutions compared as a set (each gold solution has an equal predicted one and back);
    None unless both sides are labelled solutions and one of them lists several."""
    g, p = _solutions(gold), _solutions(pred)
    if g is None or p is None or (len(g) < 2 and len(p) < 2):
        return None

    def match(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(_same(a[k], b[k], rules=rules) for k in a)

    return all(any(match(a, b) for b in p) for a in g) and all(any(match(a, b) for a in g) for b in p)


def _normalized_verdict(gold: str, pred: str, rules: GradingRules) -> bool | None:
    """The pre-normalisation's own comparisons (bases, times, labelled solutions, a one-sided ±); None
    when none of them applies and math-verify decides."""
    if bool(_PM_RE.search(gold)) != bool(_PM_RE.search(pred)):
        return False  # \pm 2021 is two numbers, 2021 one
    numeral = _same_numeral(gold, pred)
    if numeral is not None:
        return numeral
    g_time, p_time = _time_of_day(gold), _time_of_day(pred)
    if g_time and p_time:  # math-verify reads 12:00 as a ratio (zoo): compare clock readings
        return g_time[:3] == p_time[:3] and (g_time[3] == p_time[3] or "" in (g_time[3], p_time[3]))
    return _same_solutions(gold, pred, rules)


def _same(gold_text: str, pred_text: str, pred_parsed: list | None = None,
          rules: GradingRules = DEFAULT_RULES) -> bool:
    """Is the prediction (its text, and math-verify's parse of it where there is one) equivalent to
    the gold text?"""
    if rules.normalize:
        decided = _normalized_verdict(gold_text, pred_text, rules)
        if decided is not None:
            return decided
        gold_text, pred_text = _prenormalize(gold_text), _prenormalize(pred_text)
    gold_value, pred_value = _decimal(gold_text), _decimal(pred_text)
    if gold_value is not None and pred_value is not None:
        return gold_value == pred_value  # two plain decimals: exact, whatever their magnitude
    if pred_parsed is None:
        pred_parsed = _parse_answer(pred_text)
    gold_parsed = _parse_answer(gold_text)
    _, verify, _ = _math_verify()
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
        if _close_enough(gold_parsed, pred_parsed, exact=rules.normalize):
            return True
    return _canon(_clean_answer(pred_text)) == _canon(_clean_answer(gold_text)) != ""


# ---------------------------------------------------------------------------------------------
# Extraction: which part of a completion is its answer

# Markers of a final-answer line (`GradingRules.final_line`, `no_box="marked"`). Kept in the README.
FINAL_MARKERS = (
    r"final\s+answer(?:\s+is)?",      # Final Answer: 5 / The final answer is $5$ / **Final Answer**
    r"the\s+answer\s+is",             # The answer is 18.
    r"^[\s*#>-]*answer\b",             # a line that starts with "Answer" ("Answer: 18", "**Answer**", a display)
    r"^\s*####",                       # GSM8K's "#### 18"
    r"最终答案(?:是|为|為)?",            # Chinese
    r"答案(?:是|为|為)?",
    r"答え(?:は)?",                     # Japanese
    r"정답(?:은)?",                     # Korean
    r"ответ",                          # Russian
    r"réponse(?:\s+finale)?",          # French
    r"respuesta(?:\s+final)?",         # Spanish
    r"resposta(?:\s+final)?",          # Portuguese
    r"antwort",                        # German
    r"risposta(?:\s+finale)?",         # Italian
)
_MARKER_RE = re.compile("|".join(f"(?:{m})" for m in FINAL_MARKERS), re.IGNORECASE | re.MULTILINE)
_MATH_SPAN_RE = re.compile(  # `\$` inside is a dollar sign, not a delimiter
    r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_LEADING_NUMBER_RE = re.compile(r"([-+−]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?)\s+[^\W\d_]")
_MAX_BOXES = 16  # more distinct boxes than this is no answer anyone would grade as a list


def _clean_line(text: str) -> str:
    text = re.sub(r"\*\*|__", "", text)
    return text.lstrip(" \t*:：").rstrip(" \t*,.。")  # never "-" or "." on the left: -5, .4


def _marker_content(text: str, start: int) -> str:
    """The text after a marker: the rest of its line, extended to the end of a display (`\\[ ... \\]`,
    `$$ ... $$`) opened on it; the next line when the marker ends its line ("**Final Answer**")."""
    line_end = text.find("\n", start)
    end = len(text) if line_end < 0 else line_end
    rest = text[start:end]
    for opener, closer in (("\\[", "\\]"), ("$$", "$$")):
        at = rest.rfind(opener)
        if at >= 0 and closer not in rest[at + len(opener):]:
            close = text.find(closer, start + at + len(opener))
            if close >= 0:
                rest = text[start: close + len(closer)]
    content = _clean_line(rest)
    if not content and line_end >= 0:
        content = _clean_line(text[line_end + 1:].lstrip("\n").split("\n", 1)[0])
    return re.sub(r"^(?:is|est|es|é|ist|è|是|为|為|は|은|:|：)\s*", "", content, flags=re.I).strip()


def _final_line(text: str) -> tuple[int, str] | None:
    """(where the marker starts, its answer) for the last final-answer marker of `text` that gives one."""
    for m in reversed(list(_MARKER_RE.finditer(text))):
        answer = _line_answer(_marker_content(text, m.end()))
        if answer:
            return m.start(), answer
    return None


_IS_RE = re.compile(r"\s(?:is|are|equals|est|es|ist)\s|\s=\s")
_WORDS_NUMBER_RE = re.compile(r"(?<![A-Za-z0-9.,])[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?(?![A-Za-z0-9])")
_TRAILING_NUMBER_RE = re.compile(r"(?<![A-Za-z0-9.,])([-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?)\s*(?:[€$%°²]|[^\W\d_]{1,3}²?)?$")


def _line_answer(content: str) -> str | None:
    """The answer in a final-answer line's first sentence: what follows its last " is " / " = " outside
    math ("The largest $n$ is 34"), then its math spans (several: their list), a leading number followed
    by words ("18 dollars"), a trailing number ("计划的比例为13/28"), the only number among words, else
    the text itself when it looks like an answer (a number, a formula, a short word). Two numbers in
    words ("220 $ within 12 months") are no answer: which one is meant is a guess."""
    outside = _MATH_SPAN_RE.sub(lambda m: " " * len(m.group()), content)
    sentence_end = re.search(r"[.!?。](?:\s|$)", outside)  # "... is $5$. I hope it is correct."
    if sentence_end:
        content, outside = content[: sentence_end.start()], outside[: sentence_end.start()]
    cut = list(_IS_RE.finditer(outside))
    if cut and content[: cut[-1].start()].strip():  # "The largest $n$ is 34", "面积 = 72000 / 18 = 4000"
        content = content[cut[-1].end():].strip()
    spans = list(dict.fromkeys(next(g for g in m.groups() if g is not None).strip()
                               for m in _MATH_SPAN_RE.finditer(content)))
    spans = [s for s in spans if s]
    if spans:
        return ", ".join(spans)
    m = _LEADING_NUMBER_RE.match(content)
    if m:
        return m.group(1).replace("−", "-")
    content = content.rstrip(" .。!")
    if not re.match(r"[-+.\d\\(\[{$]", content):
        m = _TRAILING_NUMBER_RE.search(content)
        if m:
            return m.group(1)
        numbers = _WORDS_NUMBER_RE.findall(content)
        if len(numbers) == 1:  # "Jane started growing it 3 hours ago": one number among words
            return numbers[0]
    if re.search(r"[\d\\^=+(){}\[\]]", content) or re.fullmatch(r"[^\W\d_]{1,20}", content):
        return content
    return None


@dataclass(frozen=True)
class _Extracted:
    answers: tuple[str, ...] = ()   # the distinct answers found (by text); empty: no answer
    parsed: list | None = None      # math-verify's parse where the old whole-text search found it
    unclosed: bool = False          # the last box was never closed


def extract(completion: str, rules: GradingRules = DEFAULT_RULES) -> _Extracted:
    """What the completion answers, by `rules` (see the module docstring)."""
    text = completion
    if rules.boxes == "all" and "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    boxes = all_boxed(text)
    if boxes and boxes[-1] is None:
        return _Extracted(unclosed=True)
    final = _final_line(text) if (rules.final_line or rules.no_box == "marked") else None
    if boxes:
        last_box_end = _last_box_end(text)
        # a word ("so our answer: ... is correct") does not replace a box; a number or formula does
        if rules.final_line and final is not None and final[0] > last_box_end and re.search(r"[\d\\]", final[1]):
            return _Extracted(answers=(final[1],))
        if rules.boxes == "last":
            return _Extracted(answers=(boxes[-1],) if boxes[-1] else ())
        distinct = list(dict.fromkeys(b for b in boxes if b))
        return _Extracted(answers=tuple(distinct) if distinct and boxes[-1] else ())
    if rules.no_box == "marked":
        return _Extracted(answers=(final[1],) if final else ())
    pred = _parse(completion)  # math-verify's own extraction ("the answer is $5$", "... is 18.")
    if not pred:
        return _Extracted()
    return _Extracted(answers=(next((p for p in reversed(pred) if isinstance(p, str)), str(pred[0])),), parsed=pred)


def _one_answer(answers: tuple[str, ...], rules: GradingRules) -> tuple[str, bool]:
    """Several boxes as one answer: the box itself when they all say the same (`\\frac12` and `0.5`),
    else their list; and whether they differed."""
    distinct: list[str] = []
    for a in answers[:_MAX_BOXES + 1]:
        if not any(answer_key(a) == answer_key(b) or _same(b, a, rules=rules) for b in distinct):
            distinct.append(a)
    if len(distinct) == 1:
        return distinct[0], False
    return ", ".join(distinct), True


def prepare_gold(gold, rules: GradingRules = DEFAULT_RULES) -> str:
    """Normalise and parse a gold once (the parse is cached), so that a gold too slow to parse shows up
    as such in the verifier's pool before any prediction is checked against it."""
    gold_text = normalize_gold(gold, rules)
    for reading in _readings(gold_text):
        _parse_answer(_prenormalize(reading) if rules.normalize else reading)
    return gold_text


def verify_one(completion: str, gold, rules: GradingRules = DEFAULT_RULES) -> Verdict:
    """Check one completion against one gold answer, in this process, without a time limit. Never raises."""
    try:
        gold_text = normalize_gold(gold, rules)
        found = extract(completion, rules)
        if not found.answers:
            return _fail("no_answer")
        multi = len(found.answers) > 1
        if multi:
            extracted, multi = _one_answer(found.answers, rules)
        else:
            extracted = found.answers[0]
        if found.parsed is not None:
            preds = [(extracted, found.parsed)]
        else:
            preds = [(reading, None) for reading in _readings(extracted)]  # parsed when needed
        # 70,110 is a number or a list: a prediction that matches either reading is right
        correct = any(_same(g, text, parsed, rules) for g in _readings(gold_text) for text, parsed in preds)
        return Verdict(reward=1.0 if correct else 0.0, correct=correct, extracted=extracted, verdict="ok",
                       multi_box=multi)
    except Exception:  # a bad item is a verdict, never a crash of the caller
        return _fail("error")
