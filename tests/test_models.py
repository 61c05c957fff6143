"""models.fuse_rms_norms: transformers' plain RMSNorm run as one `F.rms_norm` (on CUDA, one kernel).

  which classes    Qwen3 (4 norms a layer + the final one), Llama and Granite (2 a layer + 1) are
                   recognised by their forward's bytecode; Gemma-3's `1 + weight` norm and Cohere's
                   LayerNorm are not, and stay as they are
  float32          logits and every parameter's gradient bit-identical to transformers' own modules
  bfloat16         each output within one unit in the last place of transformers', and closer to the
                   float64 value (the weight is applied before the one rounding, not after)
  mixed dtypes     a float32 weight under a bf16 input keeps the module's own arithmetic
  load_model       on a CPU the norms stay transformers' (F.rms_norm is no single kernel there)
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    Qwen3Config,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from s2d_cli.models import build_tiny_model, fuse_rms_norms, load_model, rms_norm_fusable

SHAPE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(config_cls, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**SHAPE, **extra), dtype=torch.float32)
    for name, p in model.named_parameters():       # norms away from 1, so a wrong weight would show
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("config_cls, extra, expected", [
    (Qwen3Config, dict(head_dim=16), 2 * 4 + 1),     # input, post-attention, q and k norms; final norm
    (LlamaConfig, {}, 2 * 2 + 1),
    (GraniteConfig, {}, 2 * 2 + 1),
    (Gemma3TextConfig, dict(head_dim=16), 0),        # weight applied as 1 + weight
    (CohereConfig, {}, 0),                           # LayerNorm with a mean
])
def test_fused_float32_model_is_bit_identical(config_cls, extra, expected):
    ref = tiny(config_cls, **extra)
    fused = copy.deepcopy(ref)
    assert fuse_rms_norms(fused) == expected
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    a, b = ref(ids).logits, fused(ids).logits
    assert torch.equal(a, b)
    (a.float().logsumexp(-1).sum() + a[..., 5].sum()).backward()
    (b.float().logsumexp(-1).sum() + b[..., 5].sum()).backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_fused_bf16_norm_is_within_one_ulp_and_closer_to_float64():
    g = torch.Generator().manual_seed(0)
    norm = Qwen3RMSNorm(256, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = (torch.rand(256, generator=g) * 2 + 0.25).to(torch.bfloat16)
    x = (torch.randn(512, 256, generator=g) * 4).to(torch.bfloat16)
    hf = norm(x).float()
    fused_norm = copy.deepcopy(norm)
    assert fuse_rms_norms(fused_norm) == 1
    fused = fused_norm(x).float()
    assert fused.dtype == torch.float32 and fused_norm(x).dtype == torch.bfloat16
    x64, w64 = x.double(), norm.weight.double()
    exact = (w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).float()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-3)   # one ulp of bf16 near |exact|
    assert ((fused - hf).abs() <= ulp + 1e-6).all()
    assert 0.0 < (fused - hf).abs().max()                                 # two roundings vs one do differ
    err_fused, err_hf = (fused - exact).abs().mean(), (hf - exact).abs().mean()
    assert err_fused < err_hf


def test_mixed_dtypes_keep_the_module_arithmetic():
    norm = Qwen3RMSNorm(32)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 32).to(torch.bfloat16)
    want = norm(x)                                   # float32 weight * bf16 result: float32 out
    fuse_rms_norms(norm)
    got = norm(x)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


def test_recognised_by_bytecode_not_by_name():
    class Renamed(torch.nn.Module):               # same name pattern, other arithmetic
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            return hidden_states * self.weight

    assert rms_norm_fusable(Qwen3RMSNorm(8))
    assert not rms_norm_fusable(Renamed())
    assert fuse_rms_norms(Renamed()) == 0


def test_load_model_on_a_cpu_keeps_transformers_norms(tmp_path):
    build_tiny_model(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), device="cpu")
    norms = [m for m in model.modules() if rms_norm_fusable(m)]
    assert len(norms) == 2 * 4 + 1
    assert all("forward" not in vars(m) for m in norms)


def test_a_fused_model_survives_deepcopy_and_torch_save(tmp_path):
    model = tiny(Qwen3Config, head_dim=16)
    fuse_rms_norms(model)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    want = model(ids).logits
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (twin, loaded):
        norm = other.model.norm
        assert norm.forward.args[0] is norm               # bound to its own module, not the original
        assert torch.equal(other(ids).logits, want)
