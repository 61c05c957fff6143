"""s2d kl-warmup end to end on tiny random-init models, CPU, fixed seeds, values asserted.

  learning        for each of --targets sampled / topk / full, the exact forward KL(teacher || student)
                  on HELD-OUT teacher rollouts at least halves; measured here with a plain unpacked
                  forward of both models (not the trainer's packed, chunked code)
  held-out eval   --eval-rollouts: the manifest's heldout_kl_start / heldout_kl_end equal that
                  measurement for --targets full (so packing and chunking change nothing)
  SFT input       problem + completion records, from a file or stdin: prompt rendered with the chat
                  template, completion tokenized with eos appended
  no top-K        --targets topk on rollouts without tensors: exit 2, one line, nothing written
  frozen teacher  --targets full: the teacher runs in eval mode under no_grad and never holds a .grad
  stages          stages/2a-kl-warmup.yaml resolves with the flags of its header command

The teacher is a tiny model with another seed and a sharpened head (x20: a peaked distribution, forward
KL ~3.5 nats from the near-uniform student) whose attention output is zeroed, so its next token depends
on the current token only; a random 2-layer teacher mixes the whole context, which a student cannot
imitate from a few hundred sequences in a few dozen steps.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from s2d_cli.artifacts import read_records
from s2d_cli.cli import app
from s2d_cli.models import build_tiny_model, load_model, load_tokenizer, save_checkpoint
from s2d_cli.trainer import MASTER_PATH

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def s2d(*args, ok: bool = True, input: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def make_teacher(out: Path, tokenizer, *, seed: int = 1, scale: float = 20.0) -> Path:
    """A peaked teacher whose next token depends on the current token only (see the module docstring)."""
    build_tiny_model(out.with_name(out.name + "-init"), tokenizer=tokenizer, seed=seed, hidden_size=64, num_layers=2)
    model = load_model(str(out.with_name(out.name + "-init")), device="cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return save_checkpoint(model, tokenizer, out)


@torch.no_grad()
def exact_kl(student, teacher, records: list[dict], direction: str = "forward") -> float:
    """Mean per completion token of KL(teacher || student) (forward) or KL(student || teacher) (reverse),
    from full-vocabulary logits of one unpacked forward per sequence (of models, or checkpoint paths)."""
    s, t = (m if isinstance(m, torch.nn.Module) else load_model(str(m), device="cpu") for m in (student, teacher))
    total, count = 0.0, 0
    for r in records:
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        p, c = len(r["prompt_ids"]), len(r["completion_ids"])
        s_logp = s(ids).logits[0, p - 1:p - 1 + c].double().log_softmax(-1)
        t_logp = t(ids).logits[0, p - 1:p - 1 + c].double().log_softmax(-1)
        a, b = (t_logp, s_logp) if direction == "forward" else (s_logp, t_logp)
        total += float((a.exp() * (a - b)).sum())
        count += c
    return total / count


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """Student (hidden 32), teacher, 384 training teacher rollouts and 16 held-out ones (top-8 stored)."""
    root = tmp_path_factory.mktemp("klw")
    tok = load_tokenizer(str(tokenizer_dir))
    student = build_tiny_model(root / "student", tokenizer=tok, seed=0, hidden_size=32, num_layers=2)
    teacher = make_teacher(root / "teacher", tok)
    common = ["--model", teacher, "--max-new-tokens", 24, "--topk", 8, "--backend", "hf"]
    s2d("rollout", *common, "--dataset", "toy:split=pool,n=96", "--n", 4, "--out", root / "train")
    s2d("rollout", *common, "--dataset", "toy:split=test,n=8", "--n", 2, "--out", root / "heldout")
    return SimpleNamespace(root=root, tok=tok, student=student, teacher=teacher, train=root / "train",
                           heldout=root / "heldout", heldout_records=read_records(root / "heldout"))


# ------------------------------------------------------------------------------------------------
# learning

@pytest.mark.parametrize("targets,steps", [("full", 30), ("topk", 30), ("sampled", 45)])
def test_forward_kl_on_heldout_teacher_rollouts_halves(world, tmp_path, targets, steps):
    out = tmp_path / targets
    s2d("kl-warmup", "--student", world.student, "--teacher", world.teacher, "--rollouts", world.train,
        "--eval-rollouts", world.heldout, "--targets", targets, "--steps", steps, "--lr", 1e-2,
        "--batch-size", 16, "--set", "micro_batch_tokens=1024", "--out", out)
    before = exact_kl(world.student, world.teacher, world.heldout_records)
    after = exact_kl(out / "model", world.teacher, world.heldout_records)
    print(f"{targets}: held-out forward KL {before:.3f} -> {after:.3f}")
    assert before > 3.0                      # a peaked teacher far from the near-uniform student
    assert after <= 0.5 * before, (before, after)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "kl-warmup" and manifest["labels_used"] == 0 and manifest["steps"] == steps
    assert manifest["num_sequences"] == 384 and manifest["heldout_sequences"] == 16
    start, end = manifest["heldout_kl_start"], manifest["heldout_kl_end"]
    assert end < start
    if targets == "full":   # the trainer's packed, chunked KL is the plain forward's, to float error
        assert manifest["heldout_metric"] == "forward_kl"
        assert start == pytest.approx(before, rel=1e-4) and end == pytest.approx(after, rel=1e-4)
    if targets == "sampled":   # cross-entropy = forward KL + the teacher's entropy
        assert manifest["heldout_metric"] == "ce" and start > before
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    key = "ce" if targets == "sampled" else "forward_kl"
    assert rows[-1][key] < rows[0][key] and all(r["completion_tokens"] > 0 for r in rows)


# ------------------------------------------------------------------------------------------------
# inputs

def test_problem_completion_records_are_sft(world, tmp_path):
    """`s2d toy --split sft` records: the chat-rendered problem, then the completion's tokens + eos."""
    from s2d_cli.data import DEFAULT_INSTRUCTION
    from s2d_cli.kl_warmup import KLWarmupConfig, load_sequences
    from s2d_cli.toy import toy_records

    records = toy_records("toy:split=sft,n=6")
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = world.tok
    cfg = KLWarmupConfig(student=str(world.student), rollouts=str(path), out=str(tmp_path / "o"))
    seqs = load_sequences(str(path), tok, cfg, vocab=len(tok), topk=False)
    r, s = records[0], seqs[0]
    text = tok.apply_chat_template([{"role": "user", "content": f"{r['problem']}\n{DEFAULT_INSTRUCTION}"}],
                                   tokenize=False, add_generation_prompt=True)
    assert s.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert s.completion_ids == tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(s.completion_ids[:-1]) == r["completion"]

    # the same records on stdin train as plain SFT (no teacher at all)
    out = tmp_path / "sft-run"
    s2d("kl-warmup", "--student", world.student, "--rollouts", "-", "--steps", 2, "--batch-size", 4,
        "--lr", 1e-3, "--out", out, input=path.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"] is None and manifest["targets"] == "sampled" and manifest["num_sequences"] == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["ce"] == pytest.approx(rows[0]["loss"], rel=1e-5)


def test_topk_without_tensors_is_a_usage_error(world, tmp_path):
    plain = tmp_path / "plain"
    s2d("rollout", "--model", world.teacher, "--dataset", "toy:split=test,n=2", "--max-new-tokens", 4,
        "--backend", "hf", "--out", plain)
    jsonl = tmp_path / "plain.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in read_records(plain)))
    for source in (plain, jsonl):
        out = tmp_path / "never"
        result = s2d("kl-warmup", "--student", world.student, "--rollouts", source, "--targets", "topk",
                     "--steps", 1, "--out", out, ok=False)
        assert result.exit_code == 2
        assert result.stderr == (f"s2d: error: --targets topk: {source} has no top-K tensors; "
                                 "rerun s2d rollout with --topk K\n")
        assert not out.exists()


# ------------------------------------------------------------------------------------------------
# the frozen teacher

def test_teacher_is_frozen(world, tmp_path, monkeypatch):
    import s2d_cli.kl_warmup as kl_warmup

    seen, calls = [], []

    def spy(*args, **kwargs):
        teacher = real(*args, **kwargs)
        teacher.base_model.register_forward_pre_hook(   # the trunk: what hidden_at runs
            lambda m, a, k: calls.append((m.training, torch.is_grad_enabled())), with_kwargs=True)
        seen.append(teacher)
        return teacher

    real = kl_warmup.load_teacher
    monkeypatch.setattr(kl_warmup, "load_teacher", spy)
    out = tmp_path / "run"
    s2d("kl-warmup", "--student", world.student, "--teacher", world.teacher, "--rollouts", world.train,
        "--targets", "full", "--steps", 2, "--batch-size", 4, "--lr", 1e-2, "--out", out)
    (teacher,) = seen
    assert len(calls) >= 2 and set(calls) == {(False, False)}     # eval mode, no autograd graph, every call
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    before = load_model(str(world.teacher), device="cpu").state_dict()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert json.loads((out / "manifest.json").read_text())["final_metrics"]["grad_norm"] > 0   # the student did learn


# ------------------------------------------------------------------------------------------------
# the stage file

def test_stage_yaml_resolves_with_its_header_command():
    from s2d_cli.config import resolve
    from s2d_cli.kl_warmup import KLWarmupConfig

    path = REPO / "stages" / "2a-kl-warmup.yaml"
    header = path.read_text().splitlines()[0]
    argv = shlex.split(header.lstrip("# "))
    assert argv[:4] == ["s2d", "kl-warmup", "--config", "stages/2a-kl-warmup.yaml"]
    flags = {argv[i][2:].replace("-", "_"): argv[i + 1] for i in range(4, len(argv), 2)}
    assert set(flags) == {"student", "teacher", "rollouts", "out"}
    cfg = resolve(KLWarmupConfig, config_file=str(path), flags=flags)
    assert cfg.student == "Qwen/Qwen3-1.7B" and cfg.targets == "topk" and 1e-6 <= cfg.lr <= 1e-5
    assert cfg.temperature == 1.0 and cfg.batch_size % 8 == 0


# ------------------------------------------------------------------------------------------------
# micro-batches add up

@pytest.mark.parametrize("targets", ["sampled", "full"])
def test_micro_batches_add_up_to_the_full_batch(world, tmp_path, targets):
    """The loss is normalised by the global token count, so one step over 8 sequences gives the same
    loss, metric and update whether they are packed into one micro-batch or into many."""
    runs = {}
    for budget in (64, 4096):
        out = tmp_path / str(budget)
        s2d("kl-warmup", "--student", world.student, "--teacher", world.teacher, "--rollouts", world.train,
            "--targets", targets, "--steps", 1, "--batch-size", 8, "--lr", 1e-3,
            "--set", f"micro_batch_tokens={budget}", "--out", out)
        runs[budget] = (json.loads((out / "metrics.jsonl").read_text()), weights(out))
    (small, w_small), (large, w_large) = runs[64], runs[4096]
    key = "ce" if targets == "sampled" else "forward_kl"
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-5)
    assert small[key] == pytest.approx(large[key], rel=1e-5) and small[key] == pytest.approx(small["loss"], rel=1e-5)
    assert small["grad_norm"] == pytest.approx(large["grad_norm"], rel=1e-4)
    for k in w_small:
        torch.testing.assert_close(w_small[k], w_large[k], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# resume

def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        state.update(load_file(f))
    return state


def cut_back_to_step_2(run: Path) -> None:
    """What a kill after the step-2 checkpoint leaves behind: no manifest, no final model, no step 4."""
    import shutil

    (run / "manifest.json").unlink()
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-000004")


def test_resumed_run_equals_an_uninterrupted_one(world, tmp_path):
    """Step k's sequences are a pure function of (seed, k), so a run resumed from its step-2 checkpoint
    trains on the same data as one that never stopped: same weights, each step logged once."""
    def run(out):
        s2d("kl-warmup", "--student", world.student, "--rollouts", world.train, "--eval-rollouts", world.heldout,
            "--targets", "topk", "--steps", 4, "--batch-size", 8, "--lr", 1e-2, "--set", "save_every=2", "--out", out)

    run(tmp_path / "straight")
    run(tmp_path / "resumed")
    cut_back_to_step_2(tmp_path / "resumed")
    run(tmp_path / "resumed")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    m_a, m_b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("straight", "resumed"))
    assert m_a["heldout_kl_start"] == m_b["heldout_kl_start"] and m_a["heldout_kl_end"] == m_b["heldout_kl_end"]
    # without its record of the start, a resumed run says the start is unknown (it used to evaluate the
    # resumed weights and report them as the start)
    cut_back_to_step_2(tmp_path / "resumed")
    (tmp_path / "resumed" / "heldout_start.json").unlink()
    run(tmp_path / "resumed")
    m_c = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert m_c["heldout_kl_start"] is None and m_c["heldout_kl_end"] == m_a["heldout_kl_end"]


def test_eval_every_writes_the_heldout_curve(world, tmp_path):
    """--set eval_every=2: out/heldout.jsonl holds the exact held-out forward KL of the weights at steps
    0, 2 and 4 (the start, the step-2 checkpoint's and the final model's); training is the same as
    without it; a run resumed at step 2 keeps the first two lines and writes the rest once."""
    def run(out, *extra):
        s2d("kl-warmup", "--student", world.student, "--teacher", world.teacher, "--rollouts", world.train,
            "--eval-rollouts", world.heldout, "--targets", "full", "--steps", 4, "--batch-size", 8, "--lr", 1e-2,
            "--set", "save_every=2", "--set", "keep_checkpoints=3", "--set", "micro_batch_tokens=1024",
            *extra, "--out", out)

    out = tmp_path / "curve"
    run(out, "--set", "eval_every=2")
    rows = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4] and all(set(r) == {"step", "forward_kl"} for r in rows)
    models = [world.student, out / "checkpoints" / "step-000002", out / "model"]
    for r, m in zip(rows, models):
        assert r["forward_kl"] == pytest.approx(exact_kl(m, world.teacher, world.heldout_records), rel=1e-4)
    assert rows[0]["forward_kl"] > rows[1]["forward_kl"] > rows[2]["forward_kl"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["heldout_kl_start"], manifest["heldout_kl_end"]) == (rows[0]["forward_kl"], rows[2]["forward_kl"])

    run(tmp_path / "plain")
    a, b = weights(out), weights(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a) and not (tmp_path / "plain" / "heldout.jsonl").exists()

    cut_back_to_step_2(out)
    run(out, "--set", "eval_every=2")
    assert [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()] == rows

    r = s2d("kl-warmup", "--student", world.student, "--rollouts", world.train, "--set", "eval_every=2",
            "--out", tmp_path / "bad", ok=False)
    assert r.exit_code == 2 and "eval_every: needs --eval-rollouts" in r.output and not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# half-precision weights: fp32 masters

def _update(run: Path, start: dict, *, masters: bool = False) -> torch.Tensor:
    """The whole update a run made: final (master or model) weights minus the start in the dtype the run
    loaded it in, flattened."""
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    final = load_file(ckpt / MASTER_PATH) if masters else weights(run)
    return torch.cat([(final[k].float() - start[k].to(weights(run)[k].dtype).float()).flatten()
                      for k in sorted(final)])


def test_bf16_weights_train_through_fp32_masters_like_fp32(world, tmp_path):
    """At lr 1e-5 an AdamW step (~1e-5 a weight) is below bf16's resolution for most weights: stepping
    bf16 weights directly keeps a tenth of the update's entries and points elsewhere (cosine 0.38 with the
    fp32 run's update, measured); the fp32 masters make the same update as fp32 training (cosine 0.9996),
    and the saved bf16 model is exactly the masters rounded."""
    def run(out, *sets):
        s2d("kl-warmup", "--student", world.student, "--rollouts", world.train, "--targets", "sampled",
            "--steps", 3, "--batch-size", 8, "--lr", 1e-5, *[x for kv in sets for x in ("--set", kv)], "--out", out)

    run(tmp_path / "fp32", "dtype=fp32")
    run(tmp_path / "masters", "dtype=bf16")
    run(tmp_path / "direct", "dtype=bf16", "master_weights=false")
    start = load_file(Path(world.student) / "model.safetensors")
    ref = _update(tmp_path / "fp32", start)
    masters = _update(tmp_path / "masters", start, masters=True)
    direct = _update(tmp_path / "direct", start)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))   # noqa: E731
    assert cos(masters, ref) > 0.99
    moved, ref_moved = int((masters != 0).sum()), int((ref != 0).sum())   # unused embedding rows stay put
    assert abs(moved - ref_moved) < 0.01 * ref_moved, (moved, ref_moved)
    assert cos(direct, ref) < 0.8 and (direct != 0).sum() < 0.5 * (ref != 0).sum()
    ckpt = sorted((tmp_path / "masters" / "checkpoints").glob("step-*"))[-1]
    m = load_file(ckpt / MASTER_PATH)
    w = weights(tmp_path / "masters")
    assert all(w[k].dtype == torch.bfloat16 and torch.equal(w[k], m[k].to(torch.bfloat16)) for k in m)
    assert not (sorted((tmp_path / "direct" / "checkpoints").glob("step-*"))[-1] / MASTER_PATH).exists()


def test_bf16_run_resumes_its_masters(world, tmp_path):
    """The masters are checkpointed: a bf16 run resumed from step 2 ends on the same masters and weights
    as one that never stopped (restarting the masters from the rounded bf16 weights would not)."""
    def run(out):
        s2d("kl-warmup", "--student", world.student, "--rollouts", world.train, "--targets", "sampled",
            "--steps", 4, "--batch-size", 8, "--lr", 1e-5, "--set", "dtype=bf16", "--set", "save_every=2",
            "--out", out)

    run(tmp_path / "straight")
    run(tmp_path / "resumed")
    cut_back_to_step_2(tmp_path / "resumed")
    run(tmp_path / "resumed")
    a, b = (load_file(tmp_path / d / "checkpoints" / "step-000004" / MASTER_PATH)
            for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("arch,extra,what", [
    ("phi", {}, "a bias on its output head"),
    ("gemma2", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
])
def test_heads_the_chunked_losses_do_not_compute_are_refused(world, tmp_path, arch, extra, what):
    """Phi's head has a bias, Gemma 2 soft-caps its logits: no constant scale of hidden @ W^T gives their
    log-probs (off by up to 43 nats on such tiny models), so training one is refused in one line, as
    student and as teacher, and no run directory is left. (A constant scale, Granite's or Cohere's, is
    trained: test_scaled_heads_kl_is_the_models_own.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, vocab_size=len(world.tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                               **extra)
    torch.manual_seed(0)
    model_dir = tmp_path / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    world.tok.save_pretrained(model_dir)
    for args in (["--student", model_dir], ["--student", world.student, "--teacher", model_dir,
                                            "--targets", "full"]):
        out = tmp_path / f"run-{len(args)}"
        result = s2d("kl-warmup", *args, "--rollouts", world.train, "--steps", 1, "--out", out, ok=False)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert f"{model_dir}: {arch} has {what}" in lines[0]
        assert not out.exists()


def test_scaled_heads_kl_is_the_models_own(world, scaled_head_dirs, tmp_path):
    """kl-warmup --targets full from a Granite student (logits / 4, refused before) to a Cohere teacher
    (logits x 2): the held-out KL before and after training (the chunked KL over `hidden_at`, packed) is
    the exact KL of transformers' own forwards, and training lowers it. With the two scales left out of
    the heads the KL would be another number."""
    student, teacher = scaled_head_dirs["granite"], scaled_head_dirs["cohere"]
    out = tmp_path / "run"
    s2d("kl-warmup", "--student", student, "--teacher", teacher, "--rollouts", world.train,
        "--eval-rollouts", world.heldout, "--targets", "full", "--steps", 3, "--lr", 1e-2, "--batch-size", 16,
        "--set", "micro_batch_tokens=1024", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    before = exact_kl(student, teacher, world.heldout_records)
    after = exact_kl(out / "model", teacher, world.heldout_records)
    assert manifest["heldout_kl_start"] == pytest.approx(before, rel=1e-4)
    assert manifest["heldout_kl_end"] == pytest.approx(after, rel=1e-4)
    assert after < before
    trained = load_model(str(out / "model"), device="cpu")
    assert trained.config.logits_scaling == 4.0                     # saved with the scale it trained under

    s, t = load_model(str(student), device="cpu"), load_model(str(teacher), device="cpu")
    s.config.logits_scaling, t.config.logit_scale = 1.0, 1.0        # logits = hidden @ W^T
    assert abs(exact_kl(s, t, world.heldout_records) - before) > 0.1 * before


def test_bad_token_ids_and_a_torn_metrics_line(world, tmp_path):
    """A negative token id is one located line (it used to be an IndexError deep in the embedding); a
    metrics.jsonl line torn by a crash is dropped on resume instead of failing it."""
    from s2d_cli.compat import embedding_rows

    records = read_records(world.train)[:8]
    records[2]["completion_ids"] = [4, -3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = s2d("kl-warmup", "--student", world.student, "--rollouts", bad, "--steps", 1, "--out",
                 tmp_path / "bad-run", ok=False)
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"s2d: error: {bad}: record 3: field 'completion_ids': token id -3 is outside the model's "
        f"{embedding_rows(str(world.student))} embedding rows"]
    assert not (tmp_path / "bad-run").exists()
    result = s2d("kl-warmup", "--student", world.student, "--rollouts", tmp_path / "nope", "--targets", "topk",
                 "--steps", 1, "--out", tmp_path / "bad-run", ok=False)    # not "has no top-K tensors"
    assert result.exit_code == 2 and result.stderr.strip() == f"s2d: error: {tmp_path / 'nope'}: no such file or directory"

    def run(out):
        s2d("kl-warmup", "--student", world.student, "--rollouts", world.train, "--targets", "sampled",
            "--steps", 4, "--batch-size", 8, "--lr", 1e-3, "--set", "save_every=2", "--out", out)

    run(tmp_path / "straight")
    run(tmp_path / "resumed")
    cut_back_to_step_2(tmp_path / "resumed")
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')         # a write cut short
    run(tmp_path / "resumed")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_targets_sampled_by_another_tokenizer_are_refused_whatever_the_teacher(world, tmp_path):
    """The top-K and sampled targets are the ids of the model that sampled them: the rollout artifact
    records its tokenizer's digest, and a student with another tokenizer is refused even when --teacher
    names a compatible model, or when the sampler's directory is gone."""
    from s2d_cli.compat import tokenizer_digest
    from s2d_cli.models import build_tokenizer

    other_tok = build_tokenizer(vocab_size=400)
    other = build_tiny_model(tmp_path / "other", tokenizer=other_tok, seed=3, hidden_size=32, num_layers=1)
    s2d("rollout", "--model", other, "--dataset", "toy:split=pool,n=4", "--n", 2, "--max-new-tokens", 8,
        "--topk", 4, "--backend", "hf", "--out", tmp_path / "foreign")
    manifest = json.loads((tmp_path / "foreign" / "manifest.json").read_text())
    assert manifest["tokenizer"] == tokenizer_digest(load_tokenizer(str(other)))
    assert json.loads((Path(world.train) / "manifest.json").read_text())["tokenizer"] == tokenizer_digest(world.tok)
    common = ["--student", world.student, "--rollouts", tmp_path / "foreign", "--targets", "topk", "--steps", 1,
              "--batch-size", 4]
    result = s2d("kl-warmup", *common, "--teacher", world.teacher, "--out", tmp_path / "a", ok=False)
    assert result.exit_code == 2, result.output
    # the sampler is named (information from the manifest), never read: the recorded digest decides
    assert f"{tmp_path / 'foreign'}: sampled by {other} with another tokenizer than the student's (digest " \
           in result.stderr
    import shutil
    shutil.rmtree(other)                       # the sampler is gone: the digest still tells
    result = s2d("kl-warmup", *common, "--out", tmp_path / "b", ok=False)
    assert result.exit_code == 2 and "with another tokenizer than the student's (digest" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rollout_topk_past_the_vocabulary_is_one_line(world, tmp_path):
    rows = json.loads((Path(world.teacher) / "config.json").read_text())["vocab_size"]
    result = s2d("rollout", "--model", world.teacher, "--dataset", "toy:split=test,n=1", "--max-new-tokens", 2,
                 "--topk", rows + 1, "--backend", "hf", "--out", tmp_path / "r", ok=False)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"s2d: error: --topk: expected at most the model's {rows} vocabulary rows, " \
                                    f"got {rows + 1}"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("field, value, message", [
    ("completion_ids", [5, 100000, 3], "field 'completion_ids': token id 100000 is outside the model's "
                                       "{rows} embedding rows"),
    ("prompt_ids", [1, 100000], "field 'prompt_ids': token id 100000 is outside the model's {rows} embedding rows"),
    ("completion", [1, 2], "field 'completion': expected text, got list"),
    ("prompt", 5, "field 'prompt': expected text, got int"),
    ("problem", ["what"], "field 'problem': expected text, got list"),
])
def test_ids_past_every_head_and_non_text_fields_are_refused(tiny_model_dir, tmp_path, field, value, message):
    """A token id no model has was cut off silently (the record trained on the part before it), and a list
    or number where text belongs was str()'d and trained on as "[1, 2]": both are bad input, one line."""
    from s2d_cli.compat import embedding_rows

    rec = {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]}
    if field in ("completion", "prompt", "problem"):
        rec = {"prompt": "1+1?", "completion": "2"}
        rec.pop("prompt" if field == "problem" else field, None)
    rec[field] = value
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec) + "\n")
    result = s2d("kl-warmup", "--student", tiny_model_dir, "--rollouts", bad, "--steps", 1, "--out",
                 tmp_path / "run", ok=False)
    rows = embedding_rows(str(tiny_model_dir))
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"s2d: error: {bad}: record 1: {message.format(rows=rows)}"]
    assert not (tmp_path / "run").exists()
