"""s2d opd end to end on tiny random-init models, CPU, fixed seeds, values asserted.

  learning         --loss full halves the exact reverse KL(student || teacher) per token, measured on a
                   FIXED set of the initial student's samples with a plain unpacked forward of both models
  teacher = student  loss 0 and gradient 0 (sampled and full): every per-token advantage / KL is 0
  frozen teacher   eval mode and no_grad at every teacher call, no .grad and unchanged weights afterwards
  alpha            the reward-density knob: labels_used = distinct labelled prompts used (0 at alpha 0),
                   accuracy reported when prompts have answers, alpha > 0 without answers refused;
                   the advantage and the sparse surrogate by hand
  stages           stages/2b-opd.yaml resolves with the flags of its header command

Why --loss full for the learning test: the sampled loss is the score-function estimate of the same
gradient, unbiased but noisy; from a random student (near-uniform over ~500 tokens) against a peaked
teacher it needs far more samples per step than a CPU test can afford (measured: 16 completions per
step at lr 1e-2 does not move the KL in 30 steps; 64 per step at lr 3e-3 takes it from 2.1 to 1.3 in
30 steps from a closer student). The teacher is the one of test_kl_warmup.py (see there).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.models import build_tiny_model, load_model, load_tokenizer, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def s2d(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def make_teacher(out: Path, tokenizer, *, seed: int = 1, scale: float = 20.0) -> Path:
    """Another seed, head x20 (peaked), attention output zeroed (next token from the current one only)."""
    build_tiny_model(out.with_name(out.name + "-init"), tokenizer=tokenizer, seed=seed, hidden_size=64, num_layers=2)
    model = load_model(str(out.with_name(out.name + "-init")), device="cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return save_checkpoint(model, tokenizer, out)


@torch.no_grad()
def exact_reverse_kl(student: Path, teacher: Path, samples: list[tuple[list[int], list[int]]]) -> float:
    """Mean per completion token of sum_v p_s(v) (log p_s(v) - log p_t(v)), full logits, no packing."""
    s, t = load_model(str(student), device="cpu"), load_model(str(teacher), device="cpu")
    total, count = 0.0, 0
    for prompt, completion in samples:
        ids = torch.tensor([prompt + completion])
        p, c = len(prompt), len(completion)
        s_logp = s(ids).logits[0, p - 1:p - 1 + c].double().log_softmax(-1)
        t_logp = t(ids).logits[0, p - 1:p - 1 + c].double().log_softmax(-1)
        total += float((s_logp.exp() * (s_logp - t_logp)).sum())
        count += c
    return total / count


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """Student (hidden 32), teacher, unlabelled prompts, and 16 fixed samples of the initial student."""
    from s2d_cli.data import load_examples
    from s2d_cli.engines import SamplingConfig
    from s2d_cli.engines.hf import HFEngine
    from s2d_cli.rollout import PromptFields, encode_examples
    from s2d_cli.toy import toy_records

    root = tmp_path_factory.mktemp("opd")
    tok = load_tokenizer(str(tokenizer_dir))
    student = build_tiny_model(root / "student", tokenizer=tok, seed=0, hidden_size=32, num_layers=2)
    teacher = make_teacher(root / "teacher", tok)
    prompts = root / "prompts.jsonl"      # problems only: nothing to verify, no labels
    prompts.write_text("".join(json.dumps({"problem": r["problem"]}) + "\n"
                               for r in toy_records("toy:split=pool,n=64")))
    _, ids = encode_examples(tok, load_examples("toy:split=test,n=8"), PromptFields())
    groups = HFEngine(str(student), tokenizer=tok).generate(ids, SamplingConfig(n=2, max_new_tokens=24, seed=123))
    samples = [(p, c.token_ids) for p, group in zip(ids, groups) for c in group]
    return SimpleNamespace(root=root, tok=tok, student=student, teacher=teacher, prompts=prompts, samples=samples)


def opd(world, out: Path, *args, student=None, teacher=None, ok: bool = True):
    return s2d("opd", "--student", student or world.student, "--teacher", teacher or world.teacher,
               "--max-new-tokens", 24, "--set", "micro_batch_tokens=1024", "--out", out, *args, ok=ok)


# ------------------------------------------------------------------------------------------------
# learning

def test_full_loss_halves_the_exact_reverse_kl(world, tmp_path):
    out = tmp_path / "run"
    opd(world, out, "--dataset", world.prompts, "--loss", "full", "--steps", 30, "--n", 4,
        "--prompts-per-step", 4, "--lr", 1e-2)
    before = exact_reverse_kl(world.student, world.teacher, world.samples)
    after = exact_reverse_kl(out / "model", world.teacher, world.samples)
    print(f"full: reverse KL on fixed student samples {before:.3f} -> {after:.3f}")
    assert before > 4.0 and after <= 0.5 * before, (before, after)

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[0], rows[-1]
    # the sampled estimate and the exact value agree on average, and both fall
    assert abs(first["reverse_kl"] - first["reverse_kl_exact"]) < 0.5
    assert last["reverse_kl_exact"] < 0.6 * first["reverse_kl_exact"]
    assert all(0 < r["completion_len"] <= 24 and 0 <= r["truncation_rate"] <= 1 for r in rows)
    assert "accuracy" not in first                      # the prompts have no answers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "opd" and manifest["labels_used"] == 0 and manifest["loss"] == "full"


# ------------------------------------------------------------------------------------------------
# teacher == student

@pytest.mark.parametrize("loss", ["sampled", "full", "topk"])
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(world, tmp_path, loss):
    out = tmp_path / loss
    opd(world, out, "--dataset", world.prompts, "--loss", loss, "--steps", 1, "--n", 2,
        "--prompts-per-step", 2, "--lr", 1e-2, teacher=world.student)
    (row,) = metrics(out)
    assert row["loss"] == 0.0 and row["reverse_kl"] == 0.0
    assert row["grad_norm"] <= 1e-6
    if loss != "sampled":
        assert abs(row["reverse_kl_exact" if loss == "full" else "reverse_kl_topk"]) <= 1e-7


# ------------------------------------------------------------------------------------------------
# micro-batches add up

@pytest.mark.parametrize("loss", ["sampled", "full", "topk"])
def test_micro_batches_add_up_to_the_full_batch(world, tmp_path, loss):
    """Global normalisers: one step over the same (seeded) samples gives the same loss, metrics and
    gradient norm packed into one micro-batch or one per sequence."""
    rows = []
    for budget in (32, 4096):
        out = tmp_path / str(budget)
        s2d("opd", "--student", world.student, "--teacher", world.teacher, "--dataset", world.prompts,
            "--loss", loss, "--steps", 1, "--n", 2, "--prompts-per-step", 2, "--max-new-tokens", 24, "--lr", 1e-3,
            "--set", f"micro_batch_tokens={budget}", "--out", out)
        rows.append(metrics(out)[0])
    small, large = rows
    assert small["tokens"] == large["tokens"]                      # the same samples
    exact = {"full": ("reverse_kl_exact",), "topk": ("reverse_kl_topk",)}.get(loss, ())
    for key in ("loss", "reverse_kl", "grad_norm") + exact:
        assert small[key] == pytest.approx(large[key], rel=1e-4), key


# ------------------------------------------------------------------------------------------------
# the frozen teacher

def test_teacher_is_frozen(world, tmp_path, monkeypatch):
    import s2d_cli.opd as opd_module

    seen, calls = [], []
    real = opd_module.load_teacher

    def spy(*args, **kwargs):
        teacher = real(*args, **kwargs)
        teacher.base_model.register_forward_pre_hook(   # the trunk: what hidden_at runs
            lambda m, a, k: calls.append((m.training, torch.is_grad_enabled())), with_kwargs=True)
        seen.append(teacher)
        return teacher

    monkeypatch.setattr(opd_module, "load_teacher", spy)
    out = tmp_path / "run"
    opd(world, out, "--dataset", world.prompts, "--loss", "sampled", "--steps", 2, "--n", 2,
        "--prompts-per-step", 2, "--lr", 1e-2)
    (teacher,) = seen
    assert len(calls) >= 2 and set(calls) == {(False, False)}     # eval mode, no autograd graph, every call
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    before = load_model(str(world.teacher), device="cpu").state_dict()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(r["grad_norm"] > 0 for r in metrics(out))          # while the student did get gradients


# ------------------------------------------------------------------------------------------------
# alpha: the reward-density knob

def test_sequence_advantages_by_hand():
    from s2d_cli.opd import sequence_advantages

    # group [1, 0, 0, 0]: mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330
    # advantages 0.75 / 0.4330 = 1.7321 and -0.25 / 0.4330 = -0.5774, times alpha 0.5
    adv = sequence_advantages([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], n=4, alpha=0.5)
    assert adv == pytest.approx([0.8660, -0.2887, -0.2887, -0.2887, 0, 0, 0, 0], abs=1e-4)
    assert sequence_advantages([1.0, 0.0], n=2, alpha=0.0) == [0.0, 0.0]


def test_sparse_surrogate_by_hand():
    from s2d_cli.opd import sparse_surrogate

    # two sequences of 2 and 1 tokens, alpha*A = [2, -1], 3 tokens in the (global) batch:
    # value = -(2 + 2 - 1) / 3 = -1; d/dlogp = -alpha*A_b / 3 on the mask, 0 off it
    logp_BT = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    mask_BT = torch.tensor([[True, True], [True, False]])
    loss = sparse_surrogate(logp_BT, torch.tensor([2.0, -1.0]), mask_BT, num_tokens=3.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-1.0)
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-2 / 3, -2 / 3], [1 / 3, 0.0]]))


@pytest.mark.parametrize("alpha_adv", [None, [1.5, -0.5, 0.0]])
def test_full_loss_is_the_exact_kl_plus_the_sparse_surrogate_in_one_pass(alpha_adv):
    """--loss full folds the surrogate into the fused head: value and gradients equal chunked_kl's sum
    plus `sparse_surrogate` of the token log-probs, under autograd (float64)."""
    from s2d_cli import losses as L
    from s2d_cli.opd import full_loss, sparse_surrogate
    from s2d_cli.trainer import Sequence, pack

    seqs = [Sequence([1, 2], [3, 4, 5]), Sequence([1], [6]), Sequence([2, 2, 2], [7, 8])]
    adv = None if alpha_adv is None else torch.tensor(alpha_adv, dtype=torch.float64)
    for i, s in enumerate(seqs):
        s.scalars["alpha_adv"] = 0.0 if adv is None else float(adv[i])
    (mb,) = pack(seqs, 1000)
    g = torch.Generator().manual_seed(3)
    M, H, V = mb.targets.shape[0], 5, 11
    h = torch.randn(M, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    t_h, t_w = torch.randn(M, 4, generator=g, dtype=torch.float64), torch.randn(V, 4, generator=g, dtype=torch.float64)
    n_tok = 7.0                                          # the global count: other micro-batches exist
    alpha_adv_B = None if adv is None else mb.scalars["alpha_adv"].to(torch.float64)
    loss, kl, logp, t_logp = full_loss(h, w, t_h, t_w, mb, alpha_adv_B, n_tok, chunk_size=2)

    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref_kl = L.chunked_kl(ref_h, ref_w, t_h, t_w, direction="reverse", chunk_size=2)
    ref = ref_kl.sum() / n_tok
    ref_logp = L.chunked_token_logprobs(ref_h, ref_w, mb.targets)[0]
    if adv is not None:
        ref = ref + sparse_surrogate(mb.to_BT(ref_logp), alpha_adv_B, mb.mask_BT(), n_tok)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(kl, ref_kl.detach())
    torch.testing.assert_close(logp, ref_logp.detach())
    torch.testing.assert_close(t_logp, L.chunked_token_logprobs(t_h, t_w, mb.targets)[0])
    (2.0 * loss).backward()
    (2.0 * ref).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)


def test_alpha_spends_labels_and_reports_accuracy(world, tmp_path):
    labelled = "toy:split=train,n=6"
    out = tmp_path / "alpha"
    opd(world, out, "--dataset", labelled, "--alpha", 0.5, "--loss", "sampled", "--steps", 2, "--n", 2,
        "--prompts-per-step", 2, "--lr", 1e-2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels_used"] == 4 and manifest["alpha"] == 0.5      # 2 steps x 2 distinct prompts
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in metrics(out))

    refused = opd(world, tmp_path / "never", "--dataset", world.prompts, "--alpha", 0.5, "--steps", 1, ok=False)
    assert refused.exit_code == 2 and "no gold answer" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------------
# the stage file

def test_stage_yaml_resolves_with_its_header_command():
    from s2d_cli.config import resolve
    from s2d_cli.opd import OPDConfig

    path = REPO / "stages" / "2b-opd.yaml"
    argv = shlex.split(path.read_text().splitlines()[0].lstrip("# "))
    assert argv[:4] == ["s2d", "opd", "--config", "stages/2b-opd.yaml"]
    flags = {argv[i][2:].replace("-", "_"): argv[i + 1] for i in range(4, len(argv), 2)}
    assert set(flags) == {"student", "teacher", "dataset", "out"}
    cfg = resolve(OPDConfig, config_file=str(path), flags=flags)
    assert cfg.loss == "sampled" and cfg.alpha == 0.0 and cfg.temperature == 1.0 and 1e-6 <= cfg.lr <= 1e-5
    assert cfg.prompts_per_step % 8 == 0 and cfg.n >= 2


# ------------------------------------------------------------------------------------------------
# resume

def test_resumed_run_equals_an_uninterrupted_one(world, tmp_path):
    """Sampling is seeded per step, so a run resumed from its step-2 checkpoint samples and trains
    exactly as one that never stopped (what a kill after that checkpoint leaves: no manifest, no model,
    no step-4 checkpoint)."""
    import shutil

    from safetensors.torch import load_file

    def run(out):
        opd(world, out, "--dataset", world.prompts, "--loss", "sampled", "--steps", 4, "--n", 2,
            "--prompts-per-step", 2, "--lr", 1e-2, "--set", "save_every=2")

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    run(resumed)
    (resumed / "manifest.json").unlink()
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    run(resumed)
    a, b = (load_file(next((d / "model").glob("*.safetensors"))) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]
    assert [r["reverse_kl"] for r in metrics(resumed)] == [r["reverse_kl"] for r in metrics(straight)]
