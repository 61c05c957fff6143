"""The grading rules of issue 23, one class at a time, on cases written by hand: each fixed class with
its rule on (s2d's default) and, where the old behaviour was wrong, what the rule off still gives."""
from __future__ import annotations

import pytest

from s2d_cli.grading import OLD_RULES, GradingRules, normalize_gold, verify_one

NO_NORMALIZE = GradingRules(normalize=False)


def graded(completion: str, gold, rules: GradingRules = GradingRules()) -> tuple[str, bool]:
    v = verify_one(completion, gold, rules)
    assert v.reward == (1.0 if v.correct else 0.0)
    return v.verdict, v.correct


# --------------------------------------------------------------------------------------------- boxes


@pytest.mark.parametrize(("completion", "gold", "correct"), [
    (r"The roots are $\boxed{1}$, $\boxed{2}$ and $\boxed{3}$.", "1, 2, 3", True),  # one list over 3 boxes
    (r"$\boxed{3}$ and $\boxed{1}$ and $\boxed{2}$", r"\{1, 2, 3\}", True),
    (r"\boxed{3} or \boxed{4}", "3", False),            # a hedge: never rewarded
    (r"\boxed{3} or \boxed{4}", "4", False),
    (r"First \boxed{5}, then \boxed{3}", "3", False),    # two contradicting boxes
    (r"\boxed{1}, \boxed{2}, \boxed{3}", "2", False),    # a list holding the gold among wrong values
    (r"\boxed{1, 2, 3}", "2", False),
    (r"\boxed{5} so again \boxed{5}", "5", True),         # the same answer twice is one answer
    (r"\boxed{\frac12}, i.e. \boxed{0.5}", r"\frac{1}{2}", True),  # equal values written two ways
])
def test_several_boxes_are_one_answer_or_one_list(completion, gold, correct):
    assert graded(completion, gold) == ("ok", correct)


def test_several_boxes_old_rule_is_the_last_box():
    assert graded(r"\boxed{1}, \boxed{2} and \boxed{3}", "1, 2, 3", OLD_RULES) == ("ok", False)
    assert graded(r"\boxed{3} or \boxed{4}", "4", OLD_RULES) == ("ok", True)  # the hack the rule closes
    assert verify_one(r"\boxed{3} or \boxed{4}", "4").multi_box


def test_a_gold_with_several_boxes_keeps_them_all():
    solution = r"So $x = \boxed{2}$ or $x = \boxed{-3}$."
    assert normalize_gold(solution) == "2, -3"
    assert normalize_gold(solution, OLD_RULES) == "-3"
    assert graded(r"\boxed{-3, 2}", solution) == ("ok", True)
    assert graded(r"\boxed{-3}", solution) == ("ok", False)
    assert normalize_gold(r"\boxed{7} and we check: \boxed{7}") == "7"  # the same box twice is one answer


def test_boxes_inside_the_thinking_are_drafts():
    completion = r"<think>maybe \boxed{4}</think> The answer is $\boxed{5}$."
    assert graded(completion, "5") == ("ok", True)
    assert graded(r"<think>\boxed{5}</think> I give up.", "5") == ("no_answer", False)


@pytest.mark.parametrize("completion", [
    r"\boxed{5} ... wait, it is \boxed{7",      # marin #9163: an unclosed last box
    r"so \boxed{\frac{1}{",
    r"\boxed{5} and \boxed{}",                  # an empty last box
])
def test_an_unclosed_or_empty_last_box_is_no_answer(completion):
    assert graded(completion, "5") == ("no_answer", False)
    assert graded(completion, "5", OLD_RULES) == ("no_answer", False)


# --------------------------------------------------------------------------------------------- final line


@pytest.mark.parametrize(("completion", "gold", "correct"), [
    (r"So $x = \boxed{2}$ is the first root.\n\nFinal Answer: 5", "5", True),   # a boxed intermediate
    (r"So $x = \boxed{2}$ is the first root.\n\nFinal Answer: 5", "2", False),
    (r"**Final Answer**\n\n$\frac{3}{4}$", "0.75", True),   # the answer on the line after the marker
    (r"Final Answer: The final answer is $\boxed{7}$. I hope it is correct.", "7", True),
    ("The answer is **73**.", "73", True),                 # Math-Verify #76: not read as 73**
    ("The answer is 18 dollars.", "18", True),
    ("#### 1,234", "1234", True),                          # GSM8K's own marker
])
def test_a_marked_final_line(completion, gold, correct):
    completion = completion.replace(r"\n", "\n")
    assert graded(completion, gold) == ("ok", correct)


def test_final_line_rule_off_keeps_the_box():
    completion = "So $x = \\boxed{2}$ is the first root.\n\nFinal Answer: 5"
    assert graded(completion, "2", GradingRules(final_line=False)) == ("ok", True)


@pytest.mark.parametrize(("completion", "gold"), [
    ("所以答案是 $\\frac{1}{2}$。", "0.5"),    # Chinese
    ("最终答案：12", "12"),
    ("よって、答えは 42 です", "42"),           # Japanese
    ("따라서 정답은 7", "7"),                    # Korean
    ("Ответ: $-3$", "-3"),                     # Russian
    ("Donc la réponse finale est 9.", "9"),   # French
    ("Por lo tanto, la respuesta es $2\\sqrt{2}$.", "2\\sqrt{2}"),  # Spanish
    ("Antwort: 15", "15"),                     # German
])
def test_non_english_text_without_a_box(completion, gold):
    assert graded(completion, gold) == ("ok", True)


@pytest.mark.parametrize("completion", [
    "We get 5, or maybe 6, 7 or 8.",           # verifiers #1028: the whole-text search finds 8 anyway
    "1 2 3 4 5 6 7 8 9 10",
    "The value is 8.",                         # unmarked: no answer
])
def test_no_box_and_no_marker_is_no_answer(completion):
    assert graded(completion, "8") == ("no_answer", False)


def test_no_box_old_rule_searches_the_whole_text():
    assert graded("We get 5, or maybe 6, 7 or 8.", "8", GradingRules(no_box="search")) == ("ok", True)
    assert graded("The answer is 3 or 4 or 5 or 6 or 8.", "8") == ("ok", False)  # a marked hedge: a set


# --------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(("completion", "gold", "correct", "old"), [
    (r"\boxed{1+\frac{1}{\mathrm{e}}}", r"1-\frac{1}{\mathrm{e}}", False, True),  # \mathrm{e} dropped as a unit
    (r"\boxed{1-\frac{1}{e}}", r"1-\frac{1}{\mathrm{e}}", True, True),
    (r"\boxed{3\mathrm{i}}", "3", False, True),
    (r"\boxed{2+3i}", r"2+3\mathrm{i}", True, True),
    (r"\boxed{2516_9}", "2516_8", False, True),        # a numeral's base is part of it
    (r"\boxed{2516_{8}}", "2516_8", True, True),
    (r"\boxed{2516}", "2516_8", True, True),           # the question named the base
    (r"\boxed{\text{A3}_{16}}", "A3_{16}", True, True),
    (r"\boxed{\frac{20,000}{\pi}}", r"\frac{20000}{\pi}", True, False),  # thousands comma in an expression
    (r"\boxed{1,000\pi}", r"1000\pi", True, False),
    (r"\boxed{1,000\pi}", r"\{1, 0\}", False, True),
    (r"\boxed{p=5,q=2;\ p=7,q=2}", r"p=5,q=2 \text{ and } p=7,q=2", True, False),  # labelled solutions
    (r"\boxed{p=7,q=2 \text{ or } p=5,q=2}", r"p=5,q=2 \text{ and } p=7,q=2", True, True),
    (r"\boxed{p=5,q=2}", r"p=5,q=2 \text{ and } p=7,q=2", False, False),
    (r"\boxed{x=1, x=2}", r"x=2 \text{ or } x=1", True, True),
    (r"\boxed{\frac{1}{2004!}}", r"\frac{1}{2006!}", False, True),   # Math-Verify #14
    (r"\boxed{\frac{1}{2006!}}", r"\frac{1}{2006!}", True, True),
    (r"\boxed{\pm 2021}", "2021", False, False),
    (r"\boxed{12:00}", "1:00", False, False),
    (r"\boxed{1:00}", "1:00", True, True),
    (r"\boxed{9:30 \text{ a.m.}}", "9:30", True, True),
])
def test_pre_normalisation(completion, gold, correct, old):
    assert graded(completion, gold) == ("ok", correct)
    assert graded(completion, gold, NO_NORMALIZE) == ("ok", old)


def test_rules_are_checked():
    with pytest.raises(ValueError, match="grade_boxes: expected all or last"):
        GradingRules(boxes="first")
    with pytest.raises(ValueError, match="grade_no_box: expected marked or search"):
        GradingRules(no_box="anything")
