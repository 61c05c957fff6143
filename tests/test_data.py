"""Prompt datasets: bundled sets and their counts, gold answer mapping, field overrides, prompt rendering."""
from __future__ import annotations

import hashlib
import json

import pytest
from conftest import shared_data_dir

from s2d_cli.data import (
    BUNDLED,
    BUNDLED_DIR,
    DEFAULT_INSTRUCTION,
    encode_prompt,
    gold_from_text,
    load_examples,
    prompt_is_chat,
    render_prompt,
    to_examples,
)
from s2d_cli.errors import UsageError

COUNTS = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "gsm8k": 1319}
SHARED_FILE = {"math500": "math500/test.jsonl", "aime24": "aime24/test.jsonl", "aime25": "aime25/test.jsonl",
               "amc23": "amc23/test.jsonl", "gsm8k": "gsm8k/test.jsonl"}


@pytest.fixture(scope="module")
def bundled():
    return {name: load_examples(name) for name in COUNTS}


def test_bundled_counts_ids_and_golds(bundled):
    assert set(BUNDLED) == set(COUNTS)
    for name, count in COUNTS.items():
        examples = bundled[name]
        assert len(examples) == count, name
        assert all(ex.problem.strip() and ex.answer for ex in examples), name
        if name != "gsm8k":  # GSM8K has no id field: ids are line indices
            assert len({ex.id for ex in examples}) == count, name
    math500 = bundled["math500"][0]
    assert (math500.id, math500.answer) == ("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)")
    assert math500.meta == {"subject": "Precalculus", "level": 2}
    assert {ex.meta["level"] for ex in bundled["math500"]} == {1, 2, 3, 4, 5}


def test_gold_answer_mapping(bundled):
    # GSM8K: the text after "#### " (thousands separators dropped); first test record ends "#### 18"
    assert bundled["gsm8k"][0].answer == "18"
    assert bundled["gsm8k"][0].id == "0"
    assert "2125" in [ex.answer for ex in bundled["gsm8k"]]          # "#### 2,125" in the file
    assert all("####" not in ex.answer and "," not in ex.answer for ex in bundled["gsm8k"])
    # AIME 2024: zero-padded strings stay text ("025", never 25)
    aime24 = [ex.answer for ex in bundled["aime24"]]
    assert aime24[:8] == ["204", "113", "371", "385", "110", "104", "721", "025"]
    assert "073" in aime24
    # AIME 2025: integers in the file become text
    assert [ex.answer for ex in bundled["aime25"]][:3] == ["70", "588", "16"]
    # AMC 2023: floats such as 27.0 and -1.0 become "27" and "-1"
    amc = [ex.answer for ex in bundled["amc23"]]
    assert amc[:4] == ["27", "36", "45", "3159"] and "-1" in amc
    assert not any("." in a for a in amc)


@pytest.mark.parametrize("value, gold", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("so 1,000 in all\n#### 1,000", "1000"),
    ("We get $\\boxed{3}$ first, then $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("the area is \\boxed{4\\sqrt{2}}", "4\\sqrt{2}"),
    (27.0, "27"),
    (-1.0, "-1"),
    (5e-05, "0.00005"),  # not str()'s "5e-05", which math-verify reads as e - 5
    (0.125, "0.125"),
    (70, "70"),
    ("025", "025"),
    ("  7 ", "7"),
    (None, None),
])
def test_gold_from_text(value, gold):
    assert gold_from_text(value) == gold


def test_math_train_record_with_only_a_solution_maps_to_its_last_boxed():
    path = shared_data_dir() / "math" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert "answer" not in first
    (ex,) = to_examples([first], str(path), require_answer=True)
    # "... So $a+b=-3+3=\boxed{0}$."
    assert (ex.id, ex.answer) == ("train/algebra/0.json", "0")
    assert ex.meta == {"subject": "Algebra", "level": 5}
    # a solution with two boxes: the last one is the answer, nested braces intact
    record = {"problem": "p", "solution": "First $\\boxed{1}$, finally $\\boxed{\\dfrac{3}{4}}$."}
    assert to_examples([record], "x.jsonl")[0].answer == "\\dfrac{3}{4}"


@pytest.mark.parametrize("answer, shown", [(["5"], '["5"]'), (False, "false"), (float("nan"), "NaN")])
def test_a_gold_that_is_not_text_or_a_finite_number_is_refused(answer, shown):
    records = [{"problem": "p", "answer": "4"}, {"problem": "q", "answer": answer}]
    with pytest.raises(UsageError) as e:
        to_examples(records, "x.jsonl", require_answer=True)
    assert str(e.value).startswith("x.jsonl:2: field 'answer': expected ") and str(e.value).endswith(f"got {shown}")


def test_prompt_answer_and_id_field_overrides(tmp_path):
    path = tmp_path / "custom.jsonl"
    rows = [{"task": "What is 2 + 2?", "final": "4", "answer": "not this", "key": "q1"},
            {"task": "What is 3 + 4?", "final": 7, "answer": "nor this", "key": "q2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(str(path), prompt_field="task", answer_field="final", id_field="key")
    assert [(ex.id, ex.problem, ex.answer) for ex in examples] == [
        ("q1", "What is 2 + 2?", "4"), ("q2", "What is 3 + 4?", "7")]
    # without the override no prompt field is found: the error names the fields and the fix
    with pytest.raises(UsageError, match=r"custom\.jsonl:1: missing field .*problem.*--prompt-field"):
        load_examples(str(path))
    with pytest.raises(UsageError, match=r"custom\.jsonl:1: missing field 'nope'"):
        load_examples(str(path), prompt_field="task", answer_field="nope")
    with pytest.raises(UsageError, match=r"custom\.jsonl:1: no gold answer"):
        to_examples([{"task": "t"}], str(path), prompt_field="task", require_answer=True)


@pytest.mark.parametrize("command, module", [("rollout", "rollout"), ("eval", "evaluate")])
def test_field_override_flags_reach_the_prompts(tmp_path, monkeypatch, command, module):
    import importlib

    from typer.testing import CliRunner

    from s2d_cli.cli import app
    from s2d_cli.rollout import load_prompts

    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"task": "What is 2 + 2?", "final": "4", "key": "q1"}) + "\n")
    seen = []
    monkeypatch.setattr(importlib.import_module(f"s2d_cli.{module}"), "run", seen.append)  # resolve only
    result = CliRunner().invoke(app, [command, "--model", "m", "--dataset", str(path), "--prompt-field", "task",
                                      "--answer-field", "final", "--id-field", "key"])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert (cfg.prompt_field, cfg.answer_field, cfg.id_field) == ("task", "final", "key")
    (ex,) = load_prompts(cfg, require_answer=True)
    assert (ex.id, ex.problem, ex.answer) == ("q1", "What is 2 + 2?", "4")


def test_unknown_dataset_name_is_one_line():
    with pytest.raises(UsageError) as e:
        load_examples("no-such-set")
    assert "'no-such-set'" in str(e.value) and "\n" not in str(e.value)


def test_chat_template_when_present_plain_prompt_otherwise(tokenizer_dir):
    from s2d_cli.models import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    assert tok.chat_template and prompt_is_chat(tok, "auto")
    chat = render_prompt(tok, "What is 1 + 1?")
    assert chat == f"<|im_start|>user\nWhat is 1 + 1?\n{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    plain = render_prompt(tok, "What is 1 + 1?", chat="plain")
    assert plain == f"What is 1 + 1?\n{DEFAULT_INSTRUCTION}\n"
    assert render_prompt(tok, "Q", instruction="", chat="plain") == "Q\n"
    # a base model's tokenizer (no template): plain text under "auto", an error under "chat"
    tok.chat_template = None
    assert not prompt_is_chat(tok, "auto")
    assert render_prompt(tok, "What is 1 + 1?") == plain
    with pytest.raises(UsageError, match="no chat template"):
        render_prompt(tok, "What is 1 + 1?", chat="chat")
    # the rendered chat text already holds its special tokens: encoding adds none
    ids = encode_prompt(tok, chat, chat_rendered=True)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == chat


def test_bundled_files_are_byte_identical_to_shared_data():
    root = shared_data_dir()
    if not (root / "SHA256SUMS").is_file():
        pytest.skip(f"{root} not present")
    sums = dict(reversed(line.split()) for line in (root / "SHA256SUMS").read_text().splitlines() if line.strip())
    for name, rel in SHARED_FILE.items():
        bundled = hashlib.sha256((BUNDLED_DIR / BUNDLED[name]).read_bytes()).hexdigest()
        shared = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        assert bundled == shared == sums[rel], name


def test_records_without_a_gold_are_refused_or_left_out_on_request(tmp_path, capsys):
    """MATH train has two solutions whose last box is empty: the stage configs' `missing_answer: skip`
    leaves such records out (and says how many); by default they are refused, naming the line."""
    from s2d_cli.data import load_examples
    from s2d_cli.errors import UsageError

    path = tmp_path / "train.jsonl"
    rows = [{"problem": "1 + 1?", "solution": "so \\boxed{2}"}, {"problem": "2 + 2?", "solution": "\\boxed{}"},
            {"problem": "3 + 3?", "solution": "thus \\boxed{6}"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsageError, match=r"train.jsonl:2: no gold answer .*--set missing_answer=skip"):
        load_examples(str(path), require_answer=True)
    kept = load_examples(str(path), require_answer=True, skip_missing_answers=True)
    assert [(e.id, e.answer) for e in kept] == [("0", "2"), ("2", "6")]
    assert "left out 1 of 3 records with no gold answer" in " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------------------------------------- dataset folders, hub ids

GSM_TRAIN = [{"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"},
             {"question": "Bo has 10 pens and loses 4. How many?", "answer": "10 - 4 = 6\n#### 6"}]
GSM_TEST = [{"question": "Cy has 7 cats and 1 dog. How many pets?", "answer": "7 + 1 = 8\n#### 8"}]
SOCRATIC = [{"question": "How many legs do 3 ducks have?", "answer": "How many? 3 * 2 = 6\n#### 6"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """GSM8K-shaped dataset folders built here: save_to_disk (a DatasetDict and a single Dataset), and the
    hub repository layout of openai/gsm8k (one folder per subset, train-/test- parquet files in each)."""
    import datasets

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("folders")
    train, test = datasets.Dataset.from_list(GSM_TRAIN), datasets.Dataset.from_list(GSM_TEST)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "dict"))
    test.save_to_disk(str(root / "single"))
    for subset, rows in (("main", {"train": GSM_TRAIN, "test": GSM_TEST}), ("socratic", {"train": SOCRATIC})):
        (root / "hub" / subset).mkdir(parents=True)
        for split, recs in rows.items():
            datasets.Dataset.from_list(recs).to_parquet(str(root / "hub" / subset / f"{split}-00000-of-00001.parquet"))
    (root / "flat" / "data").mkdir(parents=True)
    train.to_parquet(str(root / "flat" / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(root / "flat" / "data" / "test-00000-of-00001.parquet"))
    return root


def questions(examples) -> list[str]:
    return [ex.problem for ex in examples]


def test_save_to_disk_folders_load_their_split(folders):
    assert questions(load_examples(str(folders / "dict"))) == [r["question"] for r in GSM_TRAIN]   # train default
    test = load_examples(str(folders / "dict"), split="test")
    assert questions(test) == [GSM_TEST[0]["question"]] and test[0].answer == "8"
    assert [ex.answer for ex in load_examples(f"{folders / 'dict'}:split=test")] == ["8"]
    assert [ex.answer for ex in load_examples(str(folders / "single"), split="validation")] == ["8"]   # one split
    with pytest.raises(UsageError, match=r"dict: no split 'validation' \(it has train, test;"):
        load_examples(str(folders / "dict"), split="validation")


def test_hub_layout_folders_take_a_subset_and_a_split(folders):
    hub = folders / "hub"
    assert [ex.answer for ex in load_examples(f"{hub}:main")] == ["5", "6"]
    assert [ex.answer for ex in load_examples(f"{hub}:main,split=test")] == ["8"]
    assert [ex.answer for ex in load_examples(f"{hub}:main", split="test")] == ["8"]
    assert questions(load_examples(f"{hub}:socratic")) == [SOCRATIC[0]["question"]]
    with pytest.raises(UsageError, match=r"holds several subsets \(main, socratic\): name one, e\.g\. --dataset .*hub:main"):
        load_examples(str(hub))
    flat = folders / "flat"
    assert [ex.answer for ex in load_examples(str(flat))] == ["5", "6"]
    assert [ex.answer for ex in load_examples(str(flat), split="test")] == ["8"]
    with pytest.raises(UsageError, match="could not load split 'validation'"):
        load_examples(str(flat), split="validation")


def test_hub_ids_pass_their_subset_and_split_to_datasets(monkeypatch):
    """No download: `datasets.load_dataset` is replaced by a recorder that returns GSM8K-shaped rows."""
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, **_):
        calls.append((path, name, split))
        return GSM_TEST if split == "test" else GSM_TRAIN

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert [ex.answer for ex in load_examples("openai/gsm8k:main")] == ["5", "6"]
    assert [ex.answer for ex in load_examples("openai/gsm8k:main,split=test")] == ["8"]
    load_examples("openai/gsm8k", split="test")
    load_examples("openai/gsm8k:subset=socratic,split=train")
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test"),
                     ("openai/gsm8k", None, "test"), ("openai/gsm8k", "socratic", "train")]
    with pytest.raises(UsageError, match=r"'test': expected split=NAME \(the subset is 'main'\)"):
        load_examples("openai/gsm8k:main,test")


@pytest.mark.parametrize("command, split", [("rollout", "train"), ("grpo", "train"), ("opd", "train"),
                                            ("eval", "test")])
def test_default_split_is_train_for_training_and_test_for_eval(command, split):
    from typer.main import get_command

    from s2d_cli.cli import app

    cfg = get_command(app).commands[command].resolved_config()
    assert cfg.split == split
