"""The verifier against tests/data/verify_corpus.jsonl: the verdicts a careful human gives (issue 23).

The corpus is data (bench/make_verify_corpus.py writes it; bench/RESULTS-verify.md reports the peers'
agreement on it). Here: it is what the generator makes, it is large and labelled as promised, s2d
agrees with it on at least 99.7 % of the cases, and no reward-hack case earns a reward.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_data_dir

from s2d_cli.verifier import Verifier

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests/data/verify_corpus.jsonl"
SHARED_DATA = shared_data_dir()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines()]


def test_the_corpus_is_what_its_generator_makes(rows):
    if not (SHARED_DATA / "aime24/test.jsonl").is_file():
        pytest.fail(f"{SHARED_DATA}: no AIME data (set S2D_SHARED_DATA to the shared/data folder)")
    made = subprocess.run([sys.executable, str(ROOT / "bench/make_verify_corpus.py"), "--data", str(SHARED_DATA)],
                          check=True, capture_output=True, text=True).stdout
    assert made == CORPUS.read_text()


def test_the_corpus_covers_every_gold_and_every_source(rows):
    assert len(rows) >= 2000
    assert all(r["expected"] in ("correct", "wrong", "no_answer") and r["form"] in ("completion", "answer")
               and r["gold"] is not None and r["source"] for r in rows)
    math500 = {r["source"].split(" (")[0] for r in rows if r["source"].startswith("MATH-500 #")}
    aime = {r["source"] for r in rows if r["source"].startswith("AIME")}
    assert len(math500) == 500 and len(aime) == 60
    for repo in ("huggingface/Math-Verify", "huggingface/lighteval", "QwenLM/Qwen2.5-Math", "openai/prm800k"):
        assert any(r["source"].startswith(repo) for r in rows), repo
    # each MATH-500 gold is written right and wrong at least once
    right = {r["source"] for r in rows if r["source"].startswith("MATH-500") and r["expected"] == "correct"}
    wrong = {r["source"] for r in rows if r["source"].startswith("MATH-500") and r["expected"] != "correct"}
    assert len(right) == 500 and len(wrong) == 500


def test_s2d_agrees_with_the_corpus_and_rewards_no_hack(rows):
    pairs = [(f"Final Answer: {r['answer']}" if r["form"] == "answer" else r["answer"], r["gold"]) for r in rows]
    with Verifier(workers=2, timeout=60.0) as verifier:  # generous: ~1 s of CPU at most, on a busy machine
        verdicts = verifier.verify(pairs)
    wrong = [(r["source"], r["expected"], v.extracted) for r, v in zip(rows, verdicts)
             if v.correct != (r["expected"] == "correct")]
    assert len(wrong) <= 0.003 * len(rows), wrong
    hacks = [(r["source"], r["rule"], v.extracted) for r, v in zip(rows, verdicts) if r.get("hack") and v.correct]
    assert hacks == []
    assert not any(v.verdict in ("timeout", "error") for v in verdicts)
