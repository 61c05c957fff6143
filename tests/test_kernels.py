"""The opt-in speed switches (`s2d_cli.kernels`): each path computes the plain path's numbers.

Regional torch.compile and activation checkpointing run here for real (float32, equal to the plain path
to 1e-5); liger-kernel is Triton (CUDA only), so on a CPU its switch is a no-op with one line, and the
code that applies it on CUDA runs against a stand-in of liger's table of apply functions.
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from s2d_cli import kernels
from s2d_cli.errors import UsageError
from s2d_cli.losses import chunked_token_logprobs
from s2d_cli.models import tiny_config
from s2d_cli.trainer import Sequence, hidden_at, pack


def tiny_qwen3(layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("qwen3", vocab_size=96, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    lm.config.use_cache = False
    return lm.train()


def batch() -> list[Sequence]:
    g = torch.Generator().manual_seed(1)
    return [Sequence(torch.randint(3, 96, (p,), generator=g).tolist(), torch.randint(3, 96, (c,), generator=g).tolist())
            for p, c in ((5, 9), (7, 4), (3, 12))]


def logprobs_and_grads(lm) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training path: padded rows through the trunk, the chunked head, a weighted sum, backward."""
    lm.zero_grad(set_to_none=True)
    (mb,) = pack(batch(), 10_000, layout="padded")
    logp_M, _ = chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets)
    (logp_M * torch.linspace(0.1, 1.0, len(logp_M))).sum().backward()
    return logp_M.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}


def assert_same(got, want, tol=1e-5):
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=tol, atol=tol, msg=name)


def test_regional_compile_equals_plain(monkeypatch):
    """Every decoder layer compiled (aot_eager: dynamo + AOTAutograd's forward and backward graphs, what
    inductor would turn into kernels), compiled once for both layers, same log-probs and gradients."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("S2D_COMPILE", "aot_eager")
    monkeypatch.setenv("S2D_COMPILE_CACHE", "/nonexistent-unused")    # aot_eager writes no kernels
    plain = tiny_qwen3()
    compiled = copy.deepcopy(plain)
    want = logprobs_and_grads(plain)
    torch._dynamo.reset()
    counters.clear()
    assert kernels.compile_layers(compiled) == 2
    got = logprobs_and_grads(compiled)
    assert_same(got, want)
    # one frame compiled for the layer class, reused by the second layer (no guard on the layer index)
    assert counters["frames"]["ok"] == 1
    assert kernels.COMPILE_CLOCK.count >= 1 and kernels.COMPILE_CLOCK.seconds > 0
    assert_same(logprobs_and_grads(compiled), want)            # the second step runs the compiled graph
    torch._dynamo.reset()


@pytest.mark.parametrize("limit, recomputed", [("", [2, 2, 2]), ("1", [2, 1, 1])])
def test_activation_checkpointing_equals_plain(monkeypatch, limit, recomputed):
    """Checkpointed layers run their forward twice (once more in backward), the others once; the numbers
    are the plain path's either way."""
    monkeypatch.setenv("S2D_CHECKPOINT_LAYERS", limit)
    plain = tiny_qwen3(layers=3)
    ckpt = copy.deepcopy(plain)
    want = logprobs_and_grads(plain)
    assert kernels.checkpoint_layers(ckpt, enabled=True) == (3 if not limit else 1)
    calls = [0, 0, 0]
    for i, layer in enumerate(ckpt.model.layers):      # a wrapper, not a hook: recomputation skips hooks
        def counted(*args, i=i, fwd=layer.mlp.forward, **kw):
            calls[i] += 1
            return fwd(*args, **kw)
        layer.mlp.forward = counted
    got = logprobs_and_grads(ckpt)
    assert calls == recomputed
    assert_same(got, want, tol=1e-6)


def test_checkpointing_off_and_bad_value(monkeypatch):
    lm = tiny_qwen3()
    assert kernels.checkpoint_layers(lm, enabled=False) == 0
    assert not lm.is_gradient_checkpointing
    monkeypatch.setenv("S2D_CHECKPOINT_LAYERS", "half")
    with pytest.raises(UsageError, match="S2D_CHECKPOINT_LAYERS=half"):
        kernels.checkpoint_layers(lm, enabled=True)


def test_switches_off_by_default(monkeypatch):
    """Nothing set: no compile, no liger, fused AdamW as the trainer always had."""
    for var in ("S2D_COMPILE", "S2D_LIGER", "S2D_FUSED_ADAMW", "S2D_CHECKPOINT_LAYERS"):
        monkeypatch.delenv(var, raising=False)
    lm = tiny_qwen3()
    assert kernels.apply_training_switches(lm, torch.device("cpu"), grad_checkpointing=False) == {
        "checkpointed_layers": 0, "compiled_layers": 0, "compile_backend": None, "fused_adamw": True}
    assert all(not hasattr(layer, "_compiled_call_impl") or layer._compiled_call_impl is None
               for layer in lm.model.layers)
    assert kernels.apply_liger(lm, "cuda") == ()                # unset: liger is not even imported
    monkeypatch.setenv("S2D_FUSED_ADAMW", "0")
    assert kernels.fused_adamw() is False
    monkeypatch.setenv("S2D_COMPILE", "1")
    assert kernels.compile_backend() == "inductor"


def test_liger_on_cpu_is_a_noop_with_one_line(monkeypatch, capsys, tiny_model_dir):
    """models.load_model calls the liger hook for every model; on a CPU it says so once and changes nothing."""
    from s2d_cli.models import load_model

    monkeypatch.setenv("S2D_LIGER", "1")
    monkeypatch.setattr(kernels, "_NOTED", set())
    monkeypatch.setitem(sys.modules, "liger_kernel", None)       # never imported on a CPU
    plain = tiny_qwen3()
    forwards = [m.forward for m in plain.modules()]
    assert kernels.apply_liger(plain, torch.device("cpu")) == ()
    assert [m.forward for m in plain.modules()] == forwards
    load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    err = [x for x in capsys.readouterr().err.splitlines() if "[s2d]" in x]    # not transformers' progress bars
    assert len(err) == 1
    err = err[0]
    assert "S2D_LIGER=1: liger-kernel is Triton, CUDA only; not applied on cpu" in err


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in for liger_kernel.transformers.monkey_patch with a qwen3 apply function of liger's
    signature (0.8.5) that records its arguments."""
    calls = []

    def apply_liger_kernel_to_qwen3(rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=True, swiglu=True, model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy,
                          rms_norm=rms_norm, swiglu=swiglu, model=model))

    mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {"qwen3": apply_liger_kernel_to_qwen3}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", mod)
    monkeypatch.setattr(kernels, "_NOTED", set())
    return calls


def test_liger_on_cuda_calls_ligers_apply_function(monkeypatch, fake_liger, capsys):
    monkeypatch.setenv("S2D_LIGER", "rope,rms_norm")
    lm = tiny_qwen3()
    assert kernels.apply_liger(lm, torch.device("cuda")) == ("rope", "rms_norm")
    # the instance, the chosen kernels, and liger's losses off (its fused linear CE is on by default)
    assert fake_liger == [dict(rope=True, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True,
                               swiglu=False, model=lm)]
    assert "liger-kernel on qwen3: rope, rms_norm" in capsys.readouterr().err
    monkeypatch.setenv("S2D_LIGER", "1")
    assert kernels.apply_liger(lm, "cuda") == ("rope", "swiglu", "rms_norm")
    assert fake_liger[-1]["swiglu"] is True
    lm.config.model_type = "gpt_bigcode"                         # no liger kernels for it: left alone
    assert kernels.apply_liger(lm, "cuda") == ()
    assert len(fake_liger) == 2
    assert "no kernels for model type gpt_bigcode" in capsys.readouterr().err


def test_liger_refusals(monkeypatch):
    monkeypatch.setenv("S2D_LIGER", "rope,flash")
    with pytest.raises(UsageError, match="unknown kernel 'flash'"):
        kernels.liger_ops()
    monkeypatch.setenv("S2D_LIGER", "1")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)       # not installed
    with pytest.raises(UsageError, match=r"pip install 's2d\[liger\]'"):
        kernels.apply_liger(tiny_qwen3(), "cuda")


# ----------------------------------------------------------------------------------------------
# bench/bench_step.py: the training-step row's wiring and arithmetic (its speed lives in the bench)

def bench_step():
    import importlib

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module("bench_step")


def test_step_row_mfu_by_hand():
    """Qwen3-0.6B, tied: embedding 151,936 x 1,024 = 155,582,464; a layer q 1,024 x 2,048 + k, v 1,024 x 1,024
    each + o 2,048 x 1,024 + MLP 3 x 1,024 x 3,072 + norms 128 + 128 + 1,024 + 1,024 = 15,730,944, x 28;
    final norm 1,024: N = 596,049,920. The issue's liger step, 71.7k tokens/s: 6 N x 71,700 / 989e12 = 25.9 %."""
    bs = bench_step()
    with torch.device("meta"):
        n = bs.unique_params(bs.build("0.6b", "meta"))
    assert n == 155_582_464 + 28 * 15_730_944 + 1_024 == 596_049_920
    assert bs.mfu(n, 71_700) == pytest.approx(6 * 596_049_920 * 71_700 / 989e12)
    assert round(bs.mfu(n, 71_700), 3) == 0.259


def test_step_row_runs_one_step():
    """One timed step of each side on a tiny shape: 2 x 16 tokens, N by hand (embedding 96 x 32 = 3,072 once;
    q 1,024 + k 512 + v 512 + o 1,024 + MLP 6,144 + norms 80; final norm 32: 12,400), tokens/s and MFU from
    the step's own seconds, and both sides' first loss the same next-token cross-entropy (same weights,
    same tokens; about ln 96 = 4.56 nats for a random-init model)."""
    bs = bench_step()
    out = {side: bs.child(side, "tiny", batch=2, seq=16, steps=1) for side in ("s2d", "peer")}
    for x in out.values():
        assert x["tokens"] == 32 and x["params"] == 12_400 and len(x["step_s"]) == 1
        assert x["tok_per_s"] == pytest.approx(32 / x["step_s"][0])
        assert x["mfu"] == pytest.approx(6 * 12_400 * x["tok_per_s"] / 989e12)
    assert out["s2d"]["loss"][0] == pytest.approx(out["peer"]["loss"][0], abs=1e-5)
    assert abs(out["s2d"]["loss"][0] - 4.564) < 0.1
    assert out["peer"]["peer"] == "transformers"                 # liger-kernel only on CUDA


def test_trl_liger_peer_wiring(tmp_path, monkeypatch):
    """bench/child.py's "liger" side of the update row: TRL's GRPOTrainer with use_liger_kernel=True, whose
    liger config keeps TRL's own chunked head (fused linear cross-entropy off), handed to transformers'
    apply_liger_kernel with the trainer's model before the timed steps. liger-kernel is Triton, so on a CPU
    the apply function is a recorder; the rest of the peer runs for real (1 warm-up + 1 timed step)."""
    import importlib

    bench_step()                                        # puts bench/ on sys.path
    run, child = importlib.import_module("run"), importlib.import_module("child")
    import transformers.integrations.liger as hf_liger

    profile = {"model": dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2), "teacher": None,
               "big_vocab": None, "micro_batch_tokens": 4096,
               "rows": {"update": dict(prompts=2, group=2, max_new_tokens=8, steps=1)}}
    spec = run.build_fixtures(profile, tmp_path, ["update"], tmp_path)["update"]
    calls = []
    monkeypatch.setattr(hf_liger, "apply_liger_kernel", lambda model, config: calls.append((model, config)))
    out = child.update_trl({**spec, "trl_liger": True}, tmp_path / "run")
    assert len(calls) == 1
    model, config = calls[0]
    assert type(model).__name__ == "Qwen3ForCausalLM" and config == {"fused_linear_cross_entropy": False}
    assert len(out["tok_per_s"]) == 1 and out["tok_per_s"][0] > 0
    calls.clear()
    child.update_trl(spec, tmp_path / "plain")          # the plain peer never applies liger
    assert calls == []


def test_trainer_hook(tmp_path, monkeypatch, tiny_model_dir):
    """The trainer applies the switches to the model it trains: here checkpointing of 1 of 2 layers, layers
    compiled (not run: compilation is lazy), foreach AdamW instead of the fused default."""
    from s2d_cli.trainer import Trainer, TrainFields

    monkeypatch.setenv("S2D_CHECKPOINT_LAYERS", "1")
    monkeypatch.setenv("S2D_COMPILE", "aot_eager")
    monkeypatch.setenv("S2D_FUSED_ADAMW", "0")
    tr = Trainer(TrainFields(steps=1, grad_checkpointing=True), model=str(tiny_model_dir), out=str(tmp_path / "run"),
                 kind="test", config={"x": 1})
    layers = tr.lm.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert not tr.optimizer.param_groups[0]["fused"]
