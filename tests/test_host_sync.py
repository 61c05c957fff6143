"""A training step never makes the host wait on the device, and packed rows hand flash-attention their
sequence boundaries.

On a GPU the host queues kernels ahead of the device; anything that reads a device value back on the
host (`.item()`, `bool(t)`, `.tolist()`, a boolean-mask index, `nonzero`, `repeat_interleave` without
an output size ...) makes the host wait until every queued kernel has run, and the device then idles while
the host launches the next ones. These tests record, with a dispatch mode on the CPU, every such op a
step runs between building its micro-batches (`trainer.pack`) and reading its metrics back once at the
end (`trainer._host_floats`), and require none:

  sync-free step   grpo (a reference model, two PPO epochs), kl-warmup --targets full and opd --loss full,
                   on padded rows (sdpa on a GPU) and on packed rows (flash-attention)
  varlen rows      a packed micro-batch passes cu_seq_lens / max_length to every attention layer (no
                   layer derives them from the position ids, which costs flash-attention two syncs a
                   layer), and its log-probs and gradients equal the padded rows' under sdpa

transformers' own probe for packed sequences in `create_causal_mask` was such a sync at the start of
every forward; `attention.known_layout` skips it (the first test fails without it).

flash-attention does not run on a CPU, so "packed" rows run here on `varlen_attention`: transformers'
flash mask function, and an attention that, like flash-attention's varlen kernel, reads the boundaries
from cu_seq_lens_q and computes each sequence causally (sdpa per sequence). "packed-sdpa" rows are the
trainer's choice on a GPU without flash-attn: sdpa models `attention.enable`d, their packed rows run by
torch's varlen kernel (CUDA only), here `torch_varlen`, which computes the same per sequence.
"""
from __future__ import annotations

import collections
import contextlib
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from s2d_cli import attention, trainer
from s2d_cli.cli import app
from s2d_cli.losses import chunked_token_logprobs
from s2d_cli.models import build_tiny_model, load_model, load_tokenizer
from s2d_cli.trainer import Sequence, hidden_at, pack

VARLEN = "s2d_test_varlen"
CALLS: collections.Counter = collections.Counter()


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None), as flash-attention computes it."""
    with paused():      # the host reads below stand in for what flash-attention does on the device
        return _varlen_attention(query, key, value, attention_mask, scaling, **kwargs)


def _varlen_attention(query, key, value, attention_mask, scaling, **kwargs):
    gqa = query.shape[1] != key.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:                                  # varlen: one causal block per sequence of the row
        assert query.shape[0] == 1 and isinstance(kwargs.get("max_length_q"), int)
        assert cu.dtype == torch.int32 and int(cu[-1]) == query.shape[2]
        sizes = cu.diff().tolist()
        assert max(sizes) == kwargs["max_length_q"]
        CALLS["varlen"] += 1
        outs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
                for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))]
        return torch.cat(outs, 2).transpose(1, 2), None
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
    if attention_mask is not None:                      # flash's mask function hands over the 2-D padding mask
        mask = mask & attention_mask[:, None, None, -kv_len:].bool()
    elif query.shape[0] == 1 and kwargs.get("position_ids") is not None and q_len > 1:
        pos = kwargs["position_ids"].reshape(-1)
        assert bool((pos.diff() == 1).all()), "a packed row reached attention without its boundaries"
    CALLS["other"] += 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2), None


def torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, **_):
    """Stands in for torch.nn.attention.varlen.varlen_attn (CUDA only): [T, H, D] packed inputs, one
    causal block per sequence."""
    with paused():
        assert window_size == (-1, 0) and cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32
        sizes = cu_seq_q.diff().tolist()
        assert max(sizes) == max_q == max_k and sum(sizes) == query.shape[0]
        CALLS["torch_varlen"] += 1
        outs = [F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                               is_causal=True, scale=scale, enable_gqa=enable_gqa)
                for q, k, v in zip(query.split(sizes), key.split(sizes), value.split(sizes))]
        return torch.cat(outs, 1).transpose(0, 1)


def use_torch_varlen(monkeypatch, ok=lambda model, device: True):
    """Packed rows on sdpa, as `Trainer._pick_layout` chooses them on a GPU without flash-attn."""
    monkeypatch.setattr(attention, "varlen_ok", ok)
    monkeypatch.setattr(attention, "varlen_kernel", lambda: torch_varlen)


@pytest.fixture(autouse=True)
def varlen_registered(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    monkeypatch.setattr(trainer, "PACKED_ATTENTION", (*trainer.PACKED_ATTENTION, VARLEN))
    CALLS.clear()


# ------------------------------------------------------------------------------------------------
# the sync recorder

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
           "equal", "allclose", "is_nonzero"}


RECORDERS: list[SyncRecorder] = []


@contextlib.contextmanager
def paused():
    was = [r.on for r in RECORDERS]
    for r in RECORDERS:
        r.on = False
    try:
        yield
    finally:
        for r, on in zip(RECORDERS, was):
            r.on = on


class SyncRecorder(TorchDispatchMode):
    """Counts the ops that would make the host wait for a CUDA device, while `on`."""

    def __init__(self):
        super().__init__()
        self.on = False
        self.seen: collections.Counter = collections.Counter()

    def __enter__(self):
        RECORDERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        RECORDERS.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on:
            name = func._overloadpacket.__name__
            syncs = name in SYNCING
            if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
                syncs = True
            if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
                syncs = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None)
            if syncs:
                self.seen[name] += 1
        return func(*args, **kwargs)


def record_step_syncs(monkeypatch, invoke) -> tuple[collections.Counter, int]:
    """Run `invoke()` with the recorder on from each step's `pack` to its `_host_floats`; returns the ops
    seen and the number of steps."""
    rec = SyncRecorder()
    steps = []
    real_pack, real_host_floats = trainer.pack, trainer._host_floats

    def pack(*args, **kwargs):
        out = real_pack(*args, **kwargs)
        rec.on = True
        steps.append(len(out))
        return out

    def host_floats(values):
        rec.on = False
        return real_host_floats(values)

    monkeypatch.setattr(trainer, "pack", pack)
    monkeypatch.setattr(trainer, "_host_floats", host_floats)
    with rec:
        invoke()
    return rec.seen, len(steps)


def s2d(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("sync")
    tok = load_tokenizer(str(tokenizer_dir))
    student = build_tiny_model(root / "student", tokenizer=tok, seed=0, hidden_size=32, num_layers=2)
    teacher = build_tiny_model(root / "teacher", tokenizer=tok, seed=3, hidden_size=32, num_layers=2)
    rng = random.Random(0)
    rollouts = root / "rollouts.jsonl"
    records = []
    for p in range(4):
        prompt = [rng.randrange(3, len(tok)) for _ in range(rng.randint(4, 12))]
        for j in range(4):
            records.append({"id": f"p{p}", "sample": j, "prompt_ids": prompt, "reward": float(j % 2),
                            "completion_ids": [rng.randrange(3, len(tok)) for _ in range(rng.randint(1, 30))]})
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?"}) + "\n" for i in range(8)))
    return student, teacher, rollouts, prompts


COMMANDS = {
    "grpo": lambda s, t, r, p: ["grpo", "--model", s, "--rollouts", r, "-G", 4, "-P", 4,
                                "--set", "beta=0.04", "--set", "update_epochs=2"],
    "kl-warmup": lambda s, t, r, p: ["kl-warmup", "--student", s, "--teacher", t, "--rollouts", r,
                                     "--targets", "full", "--set", "batch_size=16"],
    "opd": lambda s, t, r, p: ["opd", "--student", s, "--teacher", t, "--dataset", p, "--loss", "full",
                               "--n", 2, "--max-new-tokens", 12, "--set", "prompts_per_step=4"],
}


@pytest.mark.parametrize("layout", ["padded", "packed", "packed-sdpa"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_training_step_never_waits_on_the_device(pair, tmp_path, monkeypatch, command, layout):
    monkeypatch.setattr(attention, "shared_ok", lambda *a, **k: False)   # padded rows, as sdpa on a GPU
    args = [*COMMANDS[command](*pair), "--steps", 2, "--out", tmp_path / "run",
            "--set", "micro_batch_tokens=64"]
    if layout == "packed":
        args += ["--set", f"attn_implementation={VARLEN}"]
    if layout == "packed-sdpa":
        use_torch_varlen(monkeypatch)
    seen, steps = record_step_syncs(monkeypatch, lambda: s2d(*args))
    assert steps == 2
    assert dict(seen) == {}
    # every training forward went through the varlen kernel, with boundaries
    assert (CALLS["varlen"] > 0) == (layout == "packed")
    assert (CALLS["torch_varlen"] > 0) == (layout == "packed-sdpa")
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


def test_the_recorder_sees_a_sync(monkeypatch):
    """The recorder is not blind: the probe `known_layout` removes is caught when it runs."""
    from transformers import masking_utils

    rec = SyncRecorder()
    rec.on = True
    with rec:
        masking_utils.find_packed_sequence_indices(torch.tensor([[0, 1, 2, 0, 1]]))
        x = torch.arange(4.0)
        x[x > 1].sum()
        with attention.known_layout():
            assert masking_utils.find_packed_sequence_indices(torch.tensor([[0, 1, 2, 0, 1]])) is None
    assert rec.seen == {"_local_scalar_dense": 1, "index": 1}
    assert masking_utils.find_packed_sequence_indices(torch.tensor([[0, 1, 2]])) is None   # restored: no packing
    assert masking_utils.find_packed_sequence_indices(torch.tensor([[0, 1, 0]])).tolist() == [[0, 0, 1]]


# ------------------------------------------------------------------------------------------------
# varlen rows against padded rows

@pytest.mark.parametrize("kernel", ["flash", "torch-varlen"])
def test_packed_rows_give_the_padded_rows_logprobs_and_gradients(pair, monkeypatch, kernel):
    student = str(pair[0])
    rng = random.Random(1)
    seqs = [Sequence(prompt_ids=[rng.randrange(3, 200) for _ in range(rng.randint(2, 9))],
                     completion_ids=[rng.randrange(3, 200) for _ in range(rng.randint(1, 14))]) for _ in range(7)]
    if kernel == "torch-varlen":
        use_torch_varlen(monkeypatch)
    counted = "varlen" if kernel == "flash" else "torch_varlen"

    def load(impl):
        if impl == VARLEN and kernel == "torch-varlen":        # sdpa, `enable`d as the trainer does on a GPU
            lm = load_model(student, device="cpu", dtype="float32")
            attention.enable(lm)
            return lm
        return load_model(student, device="cpu", dtype="float32", attn_implementation=impl)

    def logprobs(impl, layout, budget):
        lm = load(impl)
        micro = pack(seqs, budget, layout=layout)
        by_seq = {}
        with torch.no_grad():
            for mb in micro:
                logp, _ = chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets,
                                                 chunk_size=8)
                by_seq |= {id(s): logp[mb.seq_idx == i] for i, s in enumerate(mb.sequences)}
        return [by_seq[id(s)] for s in seqs], len(micro)

    ref_logp, _ = logprobs("sdpa", "padded", 10_000)
    for budget in (10_000, 40):
        logp, n_micro = logprobs(VARLEN, "packed", budget)
        assert n_micro == (1 if budget == 10_000 else len(pack(seqs, 40, layout="packed")))
        for a, b in zip(logp, ref_logp):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert CALLS[counted] == 2 * (1 + n_micro)           # 2 layers, every packed forward
    assert CALLS["other"] == 0

    # the gradient of one weighted sum over all tokens, both layouts, one micro-batch each
    def grads_of_sum(impl, layout):
        lm = load(impl).train()
        (mb,) = pack(seqs, 10_000, layout=layout)
        logp, _ = chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets)
        (logp * (1.0 + mb.tok_idx.float() / 10)).sum().backward()
        return {n: p.grad for n, p in lm.named_parameters()}

    g_pad, g_packed = grads_of_sum("sdpa", "padded"), grads_of_sum(VARLEN, "packed")
    for name in g_pad:
        torch.testing.assert_close(g_packed[name], g_pad[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("impl,says", [("no_such_kernel", "unknown"),
                                        ("flash_attention_2", "needs a CUDA GPU and the package")])
def test_an_attention_kernel_this_machine_lacks_is_one_line_and_writes_nothing(pair, tmp_path, monkeypatch,
                                                                              impl, says):
    from transformers import utils

    monkeypatch.setattr(utils, "is_flash_attn_2_available", lambda: False)   # as here: no flash-attn, no GPU
    result = CliRunner().invoke(app, ["kl-warmup", "--student", str(pair[0]), "--rollouts", str(pair[2]),
                                      "--steps", 1, "--out", str(tmp_path / "run"),
                                      "--set", f"attn_implementation={impl}"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"s2d: error: attn_implementation={impl}: {says}")
    assert not (tmp_path / "run").exists()


def test_a_teacher_that_cannot_read_packed_rows_takes_the_run_back_to_padded_rows(pair, tmp_path, monkeypatch):
    seen = []

    def ok(model, device):                  # the student (asked first) could, the teacher could not
        seen.append(model)
        return len(seen) == 1

    monkeypatch.setattr(attention, "shared_ok", lambda *a, **k: False)
    use_torch_varlen(monkeypatch, ok)
    s2d(*COMMANDS["kl-warmup"](*pair), "--steps", 1, "--out", tmp_path / "run", "--set", "micro_batch_tokens=64")
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert CALLS["torch_varlen"] == 0 and CALLS["varlen"] == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_a_packed_row_never_reaches_plain_sdpa(pair):
    lm = load_model(str(pair[0]), device="cpu", dtype="float32")
    (mb,) = pack([Sequence([5, 6, 7], [8, 9]), Sequence([5, 6], [10])], 100, layout="packed")
    with pytest.raises(RuntimeError, match="packed micro-batch"):    # sdpa would attend across sequences
        hidden_at(lm, mb)
