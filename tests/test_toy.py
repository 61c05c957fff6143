"""The toy task: gold solutions verify, slips do not, splits are held out, seeds reproduce, `s2d toy` writes."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.data import load_examples
from s2d_cli.errors import UsageError
from s2d_cli.toy import DEFAULT_N, parse_levels, parse_spec, toy_records, worked_solution
from s2d_cli.verifier import last_boxed, verify_one


def test_worked_solutions_by_hand():
    # 37 + 48: units 7 + 8 = 15 (write 5, carry 1), tens 3 + 4 + 1 = 8 -> 85
    assert worked_solution(1, (37, 48)) == ("7 + 8 = 15. 3 + 4 + 1 = 8. The answer is \\boxed{85}.", 85)
    # a carry of 0 is written too, so every line has the same shape
    assert worked_solution(1, (30, 43)) == ("0 + 3 = 3. 3 + 4 + 0 = 7. The answer is \\boxed{73}.", 73)
    # 37 + 48 + 25: units 7 + 8 + 5 = 20 (carry 2), tens 3 + 4 + 2 + 2 = 11 -> 110
    assert worked_solution(2, (37, 48, 25)) == (
        "7 + 8 + 5 = 20. 3 + 4 + 2 + 2 = 11. The answer is \\boxed{110}.", 110)
    # 7 * 348: 7 * 8 = 56 (carry 5), 7 * 4 + 5 = 33 (carry 3), 7 * 3 + 3 = 24 -> 2436
    assert worked_solution(3, (7, 348)) == (
        "7 * 8 = 56. 7 * 4 + 5 = 33. 7 * 3 + 3 = 24. The answer is \\boxed{2436}.", 2436)
    # (137 + 248) * 7 = 385 * 7 = 2695
    assert worked_solution(4, (137, 248, 7)) == (
        "7 + 8 = 15. 3 + 4 + 1 = 8. 1 + 2 + 0 = 3. 137 + 248 = 385. "
        "7 * 5 = 35. 7 * 8 + 3 = 59. 7 * 3 + 5 = 26. The answer is \\boxed{2695}.", 2695)
    # a units column misadded by one is carried through: 7 + 8 = 16 -> 86
    assert worked_solution(1, (37, 48), slip=(0, 1)) == (
        "7 + 8 = 16. 3 + 4 + 1 = 8. The answer is \\boxed{86}.", 86)
    # a slip in the hundreds column of the product: off by 100
    assert worked_solution(3, (7, 348), slip=(2, -1))[1] == 2336
    # a slip in the sum of level 4 changes what is multiplied: (385 + 10) * 7
    assert worked_solution(4, (137, 248, 7), slip=(1, 1))[1] == 395 * 7
    # a column never sums to -1: the slip goes the other way
    assert worked_solution(1, (10, 10), slip=(0, -1))[1] == 21


@pytest.mark.parametrize("split", ["test", "train", "pool", "sft"])
def test_gold_solutions_verify_and_off_by_one_does_not(split):
    records = toy_records(f"toy:split={split},n=80,levels=1-4,seed=3")
    assert {r["level"] for r in records} == {1, 2, 3, 4}
    for r in records:
        assert r["problem"].startswith("Compute ") and r["id"].startswith(f"toy-{split}-")
        gold = verify_one(r["solution"], r["answer"])
        assert gold.correct and gold.extracted == r["answer"], r
        wrong = r["solution"].replace(f"\\boxed{{{r['answer']}}}", f"\\boxed{{{int(r['answer']) + 1}}}")
        assert not verify_one(wrong, r["answer"]).correct, wrong


def test_sft_error_rate_and_wrong_completions():
    records = toy_records("toy:split=sft,n=2000,error_rate=0.3,seed=0")
    assert len(records) == 2000
    wrong = [r for r in records if r["corrupted"]]
    assert abs(len(wrong) / 2000 - 0.3) < 0.035  # sd of the fraction ~ 0.010
    for r in records[:300]:
        v = verify_one(r["completion"], r["answer"])
        assert v.correct is (not r["corrupted"]), r
        assert (r["completion"] == r["solution"]) is (not r["corrupted"])
    # the slips do not move the problems: same problems at any error rate, nested corruption
    clean = toy_records("toy:split=sft,n=2000,seed=0")
    assert [r["problem"] for r in clean] == [r["problem"] for r in records]
    assert not any(r["corrupted"] for r in clean)
    assert all(r["completion"] == r["solution"] for r in clean)
    lighter = toy_records("toy:split=sft,n=2000,error_rate=0.1,seed=0")
    assert {r["id"] for r in lighter if r["corrupted"]} <= {r["id"] for r in wrong}


def test_seeds_reproduce_and_differ():
    assert toy_records("toy:split=train,n=50,seed=1") == toy_records("toy:split=train,n=50,seed=1")
    assert toy_records("toy:split=train,n=50,seed=1") != toy_records("toy:split=train,n=50,seed=2")


def test_defaults_and_held_out_test():
    test = toy_records("toy")
    assert len(test) == DEFAULT_N["test"] == 200 and test[0]["id"] == "toy-test-0"
    assert {r["level"] for r in test} == {1, 2, 3}
    test_problems = {r["problem"] for r in test} | {r["problem"] for r in toy_records("toy:seed=7,levels=1-4")}
    for split in ("train", "pool", "sft"):
        for seed in (0, 7):
            records = toy_records(f"toy:split={split},seed={seed},levels=1-4")
            problems = [r["problem"] for r in records]
            assert len(records) == DEFAULT_N[split]
            assert len(set(problems)) == len(problems)  # distinct within a split
            assert not test_problems & set(problems)


def test_answers_match_the_problem():
    for r in toy_records("toy:split=pool,n=400,levels=1-4"):
        nums = [int(x) for x in re.findall(r"\d+", r["problem"])]
        shape = {1: r"Compute \d+ \+ \d+\.", 2: r"Compute \d+ \+ \d+ \+ \d+\.", 3: r"Compute \d \* \d{3}\.",
                 4: r"Compute \(\d{3} \+ \d{3}\) \* \d\."}[r["level"]]
        assert re.fullmatch(shape, r["problem"]), r
        value = nums[0] * nums[1] if r["level"] == 3 else (nums[0] + nums[1]) * nums[2] if r["level"] == 4 \
            else sum(nums)
        assert str(value) == r["answer"] == last_boxed(r["solution"])
        assert int(r["answer"]) >= 0


def test_solutions_are_short(tokenizer_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))  # the tiny models' digit-split BPE
    records = toy_records("toy:split=sft,n=400,levels=1-4,error_rate=0.5")
    lengths = {level: max(len(tok.encode(r["completion"]).ids) for r in records if r["level"] == level)
               for level in (1, 2, 3, 4)}
    assert lengths[1] <= 34 and lengths[2] <= 40 and lengths[3] <= 48 and lengths[4] <= 114, lengths


def test_spec_parsing():
    cfg = parse_spec("toy:split=sft,n=12,levels=1+3,seed=4,error_rate=0.25")
    assert (cfg.split, cfg.n, parse_levels(cfg.levels), cfg.seed, cfg.error_rate) == ("sft", 12, [1, 3], 4, 0.25)
    assert parse_levels(parse_spec("toy:levels=1,3,n=5").levels) == [1, 3]
    assert parse_levels("2-4") == [2, 3, 4]
    bad = {
        "toy:splt=test": "unknown key 'splt'",
        "toy:split=dev": "split: expected one of test, train, pool, sft",
        "toy:n=abc": "n: expected an integer",
        "toy:n=0": "n: expected a positive integer",
        "toy:levels=0-2": "levels",
        "toy:levels=x": "levels",
        "toy:split=train,error_rate=0.3": "error_rate applies to split=sft only",
        "toy:error_rate=2,split=sft": "error_rate",
        "toy:seed=1,seed=2": "given twice",
        "toy:test": "expected key=value",
        "toyx": "not a toy spec",
    }
    for spec, message in bad.items():
        with pytest.raises(UsageError, match=re.escape(message)):
            toy_records(spec)
    with pytest.raises(UsageError, match="distinct"):
        toy_records("toy:split=test,n=5000,levels=1")  # 8100 level-1 problems, 1 in 5 held out


def test_load_examples_maps_fields():
    examples = load_examples("toy:split=test,n=6", require_answer=True)
    assert [e.id for e in examples] == [f"toy-test-{i}" for i in range(6)]
    records = toy_records("toy:split=test,n=6")
    assert [(e.problem, e.answer, e.meta["level"]) for e in examples] == \
        [(r["problem"], r["answer"], r["level"]) for r in records]


def test_cli_writes_file_and_streams(tmp_path):
    runner = CliRunner()
    out = tmp_path / "sub" / "sft.jsonl"
    result = runner.invoke(app, ["toy", "--split", "sft", "--n", "30", "--error-rate", "0.3", "--seed", "0",
                                 "--levels", "1-3", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == toy_records("toy:split=sft,n=30,error_rate=0.3,seed=0")
    assert not list(out.parent.glob("*.tmp"))

    result = runner.invoke(app, ["toy", "--split", "test", "--n", "3", "--out", "-"])
    assert result.exit_code == 0
    assert [json.loads(line) for line in result.stdout.splitlines()] == toy_records("toy:n=3")

    result = runner.invoke(app, ["toy", "--split", "dev", "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "split" in result.stderr
    assert not (tmp_path / "x.jsonl").exists()
