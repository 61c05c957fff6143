"""Teacher/student compatibility (s2d_cli.compat), by hand and through both commands.

  vocabularies     a tokenizer trained on another corpus is refused by opd and kl-warmup with one line
                   naming the first differing token id and both token strings; nothing is written
  special tokens   a different eos, a different chat template: refused, naming what differs
  embedding rows   equal rows pass (also padded past the tokenizer, as Qwen3's 151,936 rows for 151,669
                   tokens); different rows are refused unless --allow-vocab-size-mismatch, and with it the
                   KLs use the first min(V_s, V_t) rows: a model whose first rows equal the other's but
                   which has 14 extra, heavily weighted rows is at KL 0 from it (the extra rows would
                   carry most of the mass if they were not dropped)
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.compat import check_rows, check_tokenizers, first_vocab_difference
from s2d_cli.errors import UsageError
from s2d_cli.models import build_tiny_model, build_tokenizer, load_model, load_tokenizer, save_checkpoint

EXTRA_ROWS = 14


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def s2d(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def widen(model_dir: Path, out: Path, tokenizer, extra: int = EXTRA_ROWS) -> Path:
    """The same model with `extra` more embedding / head rows; the new head rows point along the
    hidden state's dominant directions with a large norm, so they would take most of the softmax mass."""
    model = load_model(str(model_dir), device="cpu")
    rows = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + extra, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[rows:] = 50.0 * head[:rows].mean(0) + torch.randn(extra, head.shape[1])
        model.get_input_embeddings().weight[rows:] = 0.0
    assert model.config.vocab_size == rows + extra
    return save_checkpoint(model, tokenizer, out)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("compat")
    tok = load_tokenizer(str(tokenizer_dir))
    student = build_tiny_model(root / "student", tokenizer=tok, seed=0, hidden_size=32, num_layers=1)
    other_tok = build_tokenizer(["the cat sat on the mat"] * 20 + ["12 + 34 = 46"] * 20, vocab_size=300)
    other = build_tiny_model(root / "other", tokenizer=other_tok, seed=1, hidden_size=32, num_layers=1)
    wide = widen(student, root / "wide", tok)
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"problem": "Compute 2 + 3."}) + "\n" + json.dumps({"problem": "Compute 4 * 5."}) + "\n")
    sft = root / "sft.jsonl"
    sft.write_text(json.dumps({"problem": "Compute 2 + 3.", "completion": "2 + 3 = 5. \\boxed{5}"}) + "\n")
    return SimpleNamespace(root=root, tok=tok, student=student, other=other, other_tok=other_tok, wide=wide,
                           prompts=prompts, sft=sft)


# ------------------------------------------------------------------------------------------------
# vocabularies

def test_different_tokenizer_is_refused_naming_the_token_id(pair, tmp_path):
    a, b = pair.tok, pair.other_tok
    # the first id whose token differs, found independently of compat's table
    i = next(i for i in range(min(len(a), len(b))) if a.convert_ids_to_tokens(i) != b.convert_ids_to_tokens(i))
    assert i >= 3   # both start with the same special tokens and byte alphabet; the merges differ
    expected = (f"s2d: error: student and teacher tokenizers differ at token id {i}: "
                f"student {a.convert_ids_to_tokens(i)!r}, teacher {b.convert_ids_to_tokens(i)!r} "
                f"(sizes {len(a)} and {len(b)}); dense KLs need one shared vocabulary\n")
    assert first_vocab_difference(a, b) == (i, a.convert_ids_to_tokens(i), b.convert_ids_to_tokens(i))

    runs = [("opd", "--student", pair.student, "--teacher", pair.other, "--dataset", pair.prompts, "--steps", 1),
            ("kl-warmup", "--student", pair.student, "--teacher", pair.other, "--rollouts", pair.sft, "--steps", 1)]
    for args in runs:
        out = tmp_path / args[0]
        result = s2d(*args, "--out", out, ok=False)
        assert result.exit_code == 2 and result.stderr == expected, result.stderr
        assert not out.exists()


def test_a_token_only_one_side_has_is_a_difference(pair):
    bigger = copy.deepcopy(pair.tok)
    bigger.add_tokens(["<tool_call>"])
    with pytest.raises(UsageError, match=rf"token id {len(pair.tok)}: student \(none\), teacher '<tool_call>'"):
        check_tokenizers(pair.tok, bigger)


def test_special_tokens_and_chat_template_must_match(pair):
    check_tokenizers(pair.tok, copy.deepcopy(pair.tok))          # identical: accepted
    other_eos = copy.deepcopy(pair.tok)
    other_eos.eos_token = "<|endoftext|>"
    with pytest.raises(UsageError, match=r"eos tokens differ: student '<\|im_end\|>' \(id 2\), "
                                         r"teacher '<\|endoftext\|>' \(id 0\)"):
        check_tokenizers(pair.tok, other_eos)
    other_template = copy.deepcopy(pair.tok)
    other_template.chat_template = pair.tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>model")
    with pytest.raises(UsageError, match="chat templates differ"):
        check_tokenizers(pair.tok, other_template)
    no_template = copy.deepcopy(pair.tok)
    no_template.chat_template = None
    with pytest.raises(UsageError, match="only the student has one"):
        check_tokenizers(pair.tok, no_template)


# ------------------------------------------------------------------------------------------------
# embedding rows

def test_rows_by_hand():
    assert check_rows(498, 498, 498, allow_vocab_size_mismatch=False) == 498
    # Qwen3: both heads padded past the tokenizer to the same size: no flag needed
    assert check_rows(151_669, 151_936, 151_936, allow_vocab_size_mismatch=False) == 151_936
    with pytest.raises(UsageError, match=r"\(151936 and 152064 embedding rows\).*--allow-vocab-size-mismatch "
                                         r"to compare the first 151936 rows"):
        check_rows(151_665, 151_936, 152_064, allow_vocab_size_mismatch=False)
    assert check_rows(151_665, 151_936, 152_064, allow_vocab_size_mismatch=True) == 151_936
    assert check_rows(151_665, 152_064, 151_936, allow_vocab_size_mismatch=True) == 151_936
    with pytest.raises(UsageError, match="student model has 490 embedding rows but its tokenizer produces ids up to 497"):
        check_rows(498, 490, 498, allow_vocab_size_mismatch=True)


def test_size_mismatch_is_refused_without_the_flag(pair, tmp_path):
    out = tmp_path / "never"
    result = s2d("opd", "--student", pair.student, "--teacher", pair.wide, "--dataset", pair.prompts,
                 "--steps", 1, "--out", out, ok=False)
    rows = len(pair.tok)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert f"({rows} and {rows + EXTRA_ROWS} embedding rows)" in result.stderr
    assert "--allow-vocab-size-mismatch" in result.stderr and not out.exists()


@torch.no_grad()
def test_the_extra_rows_would_matter(pair):
    """Guard against a vacuous test below: over ALL rows of the wide head, the wide model is far from
    the narrow one (the extra rows take most of the mass on average); over the shared rows it is identical."""
    narrow, wide = load_model(str(pair.student), device="cpu"), load_model(str(pair.wide), device="cpu")
    ids = torch.tensor([pair.tok("Compute 2 + 3. The answer is")["input_ids"]])
    h = wide.model(ids).last_hidden_state[0]
    assert torch.equal(h, narrow.model(ids).last_hidden_state[0])     # the trunks agree exactly
    rows = len(pair.tok)
    p_wide = (h @ wide.lm_head.weight.T).softmax(-1)
    assert float(p_wide[:, rows:].sum(-1).mean()) > 0.5
    torch.testing.assert_close((h @ wide.lm_head.weight[:rows].T).log_softmax(-1), narrow(ids).logits[0].log_softmax(-1))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_opd_with_the_flag_uses_the_shared_rows(pair, tmp_path, loss):
    out = tmp_path / loss
    s2d("opd", "--student", pair.student, "--teacher", pair.wide, "--dataset", pair.prompts, "--loss", loss,
        "--steps", 1, "--n", 2, "--prompts-per-step", 2, "--max-new-tokens", 6, "--allow-vocab-size-mismatch",
        "--out", out)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["loss"]) < 1e-6 and abs(row["reverse_kl"]) < 1e-5 and row["grad_norm"] < 1e-4
    if loss == "full":
        assert abs(row["reverse_kl_exact"]) < 1e-5
    assert json.loads((out / "manifest.json").read_text())["vocab"] == len(pair.tok)


def test_kl_warmup_with_the_flag_uses_the_shared_rows(pair, tmp_path):
    """The wide model as the STUDENT this time (the other direction), the narrow one as the teacher."""
    rollouts = tmp_path / "rollouts"
    s2d("rollout", "--model", pair.student, "--dataset", pair.prompts, "--n", 2, "--max-new-tokens", 6,
        "--topk", 4, "--backend", "hf", "--out", rollouts)
    for targets in ("full", "topk"):
        out = tmp_path / targets
        s2d("kl-warmup", "--student", pair.wide, "--teacher", pair.student, "--rollouts", rollouts,
            "--eval-rollouts", rollouts, "--targets", targets, "--steps", 1, "--batch-size", 2,
            "--allow-vocab-size-mismatch", "--out", out)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["vocab"] == len(pair.tok)
        # top-K: the KL of the coarsened distributions, and the stored log-probs are float32 from generate
        assert abs(manifest["heldout_kl_start"]) < (1e-6 if targets == "full" else 1e-4), manifest["heldout_kl_start"]
