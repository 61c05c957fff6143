"""Evaluation metrics against numbers worked out by hand: unbiased pass@k, the clustered 95% CI, maj@n."""
from __future__ import annotations

import math

import pytest

from s2d_cli.metrics import majority_correct, mean_ci95, pass_at_k, summarize


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 1 / 4),               # pass@1 is c / n
    (4, 3, 1, 3 / 4),
    (4, 1, 2, 1 - 3 / 6),           # 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    (5, 2, 2, 1 - 3 / 10),          # 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    (10, 3, 5, 1 - 21 / 252),       # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
    (4, 3, 2, 1.0),                 # n - c = 1 < k: every pair holds a correct sample
    (4, 0, 2, 0.0),                 # C(4,2)/C(4,2) = 1
    (4, 4, 4, 1.0),
    (4, 1, 4, 1.0),                 # n - c = 3 < 4
    (16, 1, 8, 1 - 6435 / 12870),   # 1 - C(15,8)/C(16,8) = 1 - 6435/12870 = 0.5
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_probability_that_k_draws_without_replacement_hit():
    # brute force over all k-subsets of 5 samples with 2 correct: 7 of the 10 pairs hold a correct one
    import itertools

    samples = [1, 1, 0, 0, 0]
    pairs = list(itertools.combinations(samples, 2))
    assert sum(any(p) for p in pairs) / len(pairs) == pytest.approx(pass_at_k(5, 2, 2)) == pytest.approx(0.7)


def test_mean_ci95_clustered_by_prompt():
    # per-prompt accuracies 0.5, 0.75, 0.25, 0.5: mean 0.5, squared deviations 0 + 1/16 + 1/16 + 0 = 1/8,
    # sample variance (1/8)/3 = 1/24, se = sqrt((1/24)/4) = 0.10206, 1.96 * se = 0.20004
    mean, lo, hi = mean_ci95([0.5, 0.75, 0.25, 0.5], num_samples=16)
    se = math.sqrt(1 / 24 / 4)
    assert mean == pytest.approx(0.5)
    assert lo == pytest.approx(0.5 - 1.96 * se) == pytest.approx(0.29996, abs=1e-5)
    assert hi == pytest.approx(0.5 + 1.96 * se) == pytest.approx(0.70004, abs=1e-5)


def test_mean_ci95_one_prompt_and_clipping():
    # one prompt: binomial se over its samples, sqrt(0.5 * 0.5 / 4) = 0.25, so 0.5 +- 0.49
    assert mean_ci95([0.5], num_samples=4) == pytest.approx((0.5, 0.01, 0.99))
    # 1, 0, 1, 0: se = sqrt((4 * 0.25 / 3) / 4) = 0.2887, 0.5 +- 0.566 is clipped to [0, 1]
    assert mean_ci95([1, 0, 1, 0], num_samples=4) == pytest.approx((0.5, 0.0, 1.0))
    assert mean_ci95([1.0, 1.0, 1.0], num_samples=3) == pytest.approx((1.0, 1.0, 1.0))


def _s(extracted, correct):
    return {"extracted": extracted, "correct": correct}


@pytest.mark.parametrize("samples, expected", [
    ([_s("5", True), _s("5", True), _s("4", False)], True),               # 5 wins 2:1
    ([_s("7", False), _s("7", False), _s("12", True)], False),            # a wrong answer wins 2:1
    ([_s("3", True), _s("4", False), _s("4", False), _s("3", True)], True),   # 2:2 tie: the earliest (3)
    ([_s("4", False), _s("3", True), _s("4", False), _s("3", True)], False),  # 2:2 tie: the earliest (4)
    ([_s("1 / 2", True), _s("1/2", True), _s("3", False)], True),         # whitespace does not split votes
    ([_s(None, False), _s(None, False), _s("5", True)], True),            # no answer casts no vote
    ([_s(None, False), _s(None, False)], False),                          # nobody answered
    # gold 0.5: every correct sample is one vote for the right answer, however it is written: 3:2
    ([_s(r"\frac{1}{2}", True), _s("0.5", True), _s(r"\dfrac12", True), _s("3", False), _s("3", False)], True),
    ([_s("3", False), _s("3", False), _s("0.5", True), _s(r"\frac12", True)], False),  # 2:2, "3" first
    ([_s("0.5", True), _s("3", False), _s(r"\frac12", True), _s("3", False)], True),   # 2:2, right first
    # wrong answers written alike are one answer: "1,000" and "1000" tie 2:2 with the right one, and come first
    ([_s("1,000", False), _s("0.5", True), _s("1000", False), _s(r"\frac12", True)], False),
    ([_s(r"\dfrac{1}{3}", False), _s(r"\frac{1}{3}", False), _s("0.5", True)], False),  # 2:1
    ([_s("7", False), _s("8", False), _s("9", False), _s("0.5", True), _s("1/2", True)], True),  # 2:1:1:1
    ([_s("9" * 5000, False), _s("9" * 5000, False), _s("1", True)], False),  # any length of answer votes
])
def test_majority_correct_by_hand(samples, expected):
    assert majority_correct(samples) is expected


def test_summarize_by_hand():
    # prompt a (Algebra, level 1): 2 of 4 correct; prompt b (Geometry, level 1): 0 of 4; prompt c (Algebra,
    # level 3): 4 of 4. accuracy (0.5 + 0 + 1) / 3 = 0.5; pass@2: a 1 - C(2,2)/C(4,2) = 5/6, b 0, c 1 -> 11/18
    def group(pid, subject, level, correct, answers):
        return [{"id": pid, "subject": subject, "level": level, "correct": c, "extracted": e,
                 "completion_ids": [1] * (i + 1), "finish_reason": "length" if i == 0 else "stop"}
                for i, (c, e) in enumerate(zip(correct, answers))]

    records = (group("a", "Algebra", 1, [True, True, False, False], ["2", "2", "3", "3"])
               + group("b", "Geometry", 1, [False] * 4, ["1", "1", "2", None])
               + group("c", "Algebra", 3, [True] * 4, ["9"] * 4))
    m = summarize(records, dataset="handmade", model=None)
    assert (m["n"], m["num_prompts"], m["num_samples"]) == (4, 3, 12)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["pass@k"] == pytest.approx({"1": 0.5, "2": 11 / 18, "4": 2 / 3})
    assert m["maj@n"] == pytest.approx(2 / 3)   # a: 2:2 tie, "2" first and correct; b wrong; c right
    assert m["by_subject"] == {"Algebra": {"accuracy": 0.75, "num_prompts": 2},
                               "Geometry": {"accuracy": 0.0, "num_prompts": 1}}
    assert m["by_level"] == {"1": {"accuracy": 0.25, "num_prompts": 2}, "3": {"accuracy": 1.0, "num_prompts": 1}}
    assert m["mean_completion_tokens"] == pytest.approx(2.5)   # lengths 1, 2, 3, 4 in every group
    assert m["truncation_rate"] == pytest.approx(0.25)


def test_eval_table_title_keeps_a_long_model_path_whole():
    """The title used to wrap to the table's width, cutting a model path in two on a log file."""
    import io

    from rich.console import Console

    from s2d_cli.metrics import print_metrics

    model = "runs/toy/seed-0/bridge-rl-grpo-after-kl-warmup-and-opd/model"
    m = {"dataset": "math500", "model": model, "n": 4, "accuracy": 0.25, "accuracy_ci95": [0.1, 0.4],
         "pass@k": {"1": 0.25, "4": 0.5}, "maj@n": 0.3, "num_prompts": 8}
    buf = io.StringIO()
    print_metrics(Console(file=buf, width=50, force_terminal=False), m)
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"math500 — {model}"
    assert any("accuracy (avg@4)" in line and "0.250  [0.100, 0.400]" in line for line in lines)
