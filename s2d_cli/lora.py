"""LoRA: train low-rank adapters on a frozen base instead of every weight (grpo, kl-warmup, opd).

    s2d grpo --model Qwen/Qwen3-8B --dataset math_train.jsonl --lora-rank 64 --out runs/teacher-grpo
    s2d kl-warmup ... --lora-rank 16 --set lora_alpha=32 --set lora_targets=q_proj,v_proj

Each adapted linear layer computes W x + (alpha / r) * B A x with W frozen, A [r, in] and B [out, r]
trained (B starts at zero, so step 1 starts from the base model). AdamW then holds two fp32 moments for
A and B only: for an 8B model at r = 64 over every attention and MLP projection, 0.17B trainable
parameters instead of 8B (see the README's LoRA section for the memory arithmetic).

The adapters come from `peft` (the `s2d[lora]` extra), injected into the loaded Hugging Face model in
place: the trainer keeps training that same module (its trunk, head and config unchanged), so the
chunked heads, packed / shared micro-batch rows and DDP work as for full training. What differs:
- checkpoints hold the adapter only (`adapter_model.safetensors` + `adapter_config.json`) beside the
  optimizer state; `out/adapter/` is the final adapter (`PeftModel.from_pretrained(base, out/adapter)`),
  `out/model/` the merged weights as a plain checkpoint (`merged_state_dict`);
- the reference model of `--beta > 0` is the same module with its adapters switched off
  (`adapter_off`): no second copy of the weights;
- sampling takes merged weights: the hf engine's fast decode step reads `merged_linear` (fresh tensors,
  W + s B A, the base weight untouched), the vLLM engine receives the merged weights of the adapted
  blocks after each update (`engine_weights`).

Deliberately left out: DoRA, rsLoRA, LoRA on the embeddings or the output head (the chunked heads read
`lm_head.weight` itself), QLoRA (a quantised base).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from .errors import UsageError

ADAPTER_WEIGHTS = "adapter_model.safetensors"   # what peft's save_pretrained writes
ADAPTER_NAME = "default"

LoraRankOpt = Annotated[int | None, typer.Option(
    "--lora-rank", help="Train rank-R LoRA adapters on a frozen base (0: every weight, the default).")]


@dataclass
class LoraFields:
    """LoRA options of every trainer (through TrainFields)."""
    lora_rank: int = 0                   # adapter rank r (0: full training, no adapters)
    lora_alpha: float | None = None      # scale alpha / r of the adapters' output; None: 2 r
    lora_dropout: float = 0.0            # dropout on the adapters' input while training
    lora_targets: list[str] | None = None   # linear module names to adapt; None: every linear layer of
                                         # the attention and MLP blocks (q/k/v/o, gate/up/down on Llama, Qwen)

    def check_lora(self) -> None:
        if self.lora_rank < 0:
            raise UsageError(f"--lora-rank: expected 0 (full training) or a rank >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UsageError(f"lora_alpha: expected > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"lora_dropout: expected a value in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not self.lora_targets:
            raise UsageError("lora_targets: expected module names, got an empty list")
        if self.lora_rank:
            require_peft()          # before the run directory is made


def require_peft():
    try:
        import peft
    except ImportError:
        raise UsageError("--lora-rank needs the peft package (pip install 's2d[lora]')") from None
    return peft


# ----------------------------------------------------------------------------------------------
# which modules

def block_linear_names(model: nn.Module) -> list[str]:
    """Names (last component) of the plain linear layers of the model's blocks, in model order: every
    nn.Linear but the output head."""
    head = model.get_output_embeddings()
    names: list[str] = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module is not head:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def target_names(model: nn.Module, targets: list[str] | None, where: str) -> list[str]:
    """`targets` checked against the model (None: all of `block_linear_names`); a name the model lacks
    (or the head, which the chunked heads read as a plain weight) is one line naming what it has."""
    have = block_linear_names(model)
    if not have:
        raise UsageError(f"{where}: {model.config.model_type} has no linear layers outside its head to adapt")
    if targets is None:
        return have
    bad = [t for t in targets if t not in have]
    if bad:
        raise UsageError(f"lora_targets: {where} ({model.config.model_type}) has no linear module {bad[0]!r}; "
                         f"its linear modules: {', '.join(have)}")
    return list(dict.fromkeys(targets))


# ----------------------------------------------------------------------------------------------
# wrapping, saving, loading

def wrap(model: nn.Module, cfg: LoraFields, *, name: str, seed: int = 0):
    """Inject rank-`cfg.lora_rank` adapters into `model` in place and freeze everything else; returns the
    `peft.PeftModel` around it (for saving and loading the adapter). `model` itself stays the object to
    train and call. A's init is drawn from `seed` (B starts at zero): the same run, the same adapters."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    targets = target_names(model, cfg.lora_targets, name)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                        lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # autocast_adapter_dtype: half-precision bases get fp32 adapters (AdamW steps them directly, no
        # master copies needed); an fp32 base keeps fp32 adapters
        peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME, autocast_adapter_dtype=True)
    if peft_model.base_model.model is not model:    # the trainer keeps training `model` itself
        raise RuntimeError("peft wrapped a copy of the model, not the model itself")
    return peft_model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The adapted linear layers of `model` (peft LoRA layers), in model order; [] for a plain model."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def is_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def save_adapter(peft_model, out_dir: Path, whole: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors into `out_dir` (which exists; the caller renames).
    whole: the model's tensors gathered whole (a sharded model's, keyed as its own state dict), saved in
    place of its parameters (under FSDP, DTensor shards that peft cannot save)."""
    state = None
    if whole is not None:
        state = {f"base_model.model.{k}": t for k, t in whole.items() if ".lora_" in k}
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state)
    (out_dir / "README.md").unlink(missing_ok=True)     # peft's model-card template, not ours to ship


def load_adapter(peft_model, ckpt: Path) -> None:
    """A checkpoint's adapter weights into the wrapped model, exactly (same dtype, no re-init)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = ckpt / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UsageError(f"{ckpt}: no {ADAPTER_WEIGHTS}; this checkpoint is of a full-training run "
                         "(a config change: use --force or another --out)")
    device = next(peft_model.parameters()).device
    state = load_file(path, device=str(device))
    result = set_peft_model_state_dict(peft_model, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{ckpt}: the adapter does not match the model (missing {missing[:3]}, "
                           f"unexpected {list(result.unexpected_keys)[:3]})")


# ----------------------------------------------------------------------------------------------
# merged weights and the adapter switched off

def delta(layer: nn.Module) -> torch.Tensor | None:
    """s B A of one LoRA layer's active adapter, in the base weight's dtype (None when off)."""
    if layer.disable_adapters or ADAPTER_NAME not in layer.lora_A:
        return None
    return _delta(layer, layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight,
                  layer.get_base_layer().weight.dtype)


def _delta(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((B.float() @ A.float()) * layer.scaling[ADAPTER_NAME]).to(dtype)


@torch.no_grad()
def merged_linear(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) that F.linear needs to compute what `layer` computes in eval mode: for a LoRA layer a
    fresh tensor W + s B A (W itself is not touched: merging in place and back would leave rounding in the
    frozen base), for a plain linear layer its own weight and bias."""
    if not hasattr(layer, "lora_A"):
        return layer.weight, layer.bias
    base = layer.get_base_layer()
    d = delta(layer)
    return (base.weight if d is None else base.weight + d), base.bias


def mergeable(layer: nn.Module) -> bool:
    """A plain LoRA over nn.Linear (no DoRA, no adapter bias, not merged into the base already)."""
    if not hasattr(layer, "lora_A"):
        return False
    return (type(layer.get_base_layer()) is nn.Linear and not getattr(layer, "merged_adapters", [])
            and not any(getattr(layer, "use_dora", {}).values())
            and not any(getattr(layer, "lora_bias", {}).values())
            and not getattr(layer, "fan_in_fan_out", False))


def _module_name(key: str) -> str:
    return key.rsplit(".", 1)[0]


@torch.no_grad()
def merged_state_dict(model: nn.Module, whole: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain model that computes what `model` (with its adapters) computes: the
    adapters' tensors dropped, `x.base_layer.weight` renamed `x.weight` and merged. The tensors of
    unadapted weights are the model's own (no copy). whole: the model's state dict gathered whole (a
    sharded model's), merged in place of the model's own parameters (DTensor shards under FSDP)."""
    if whole is None:
        merged_w = {name: merged_linear(m)[0] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    else:
        merged_w = {}
        for name, m in model.named_modules():
            if hasattr(m, "lora_A") and f"{name}.base_layer.weight" in whole:
                w = whole[f"{name}.base_layer.weight"]
                if not m.disable_adapters and ADAPTER_NAME in m.lora_A:
                    w = w + _delta(m, whole[f"{name}.lora_A.{ADAPTER_NAME}.weight"],
                                   whole[f"{name}.lora_B.{ADAPTER_NAME}.weight"], w.dtype)
                merged_w[name] = w
    out = {}
    for key, tensor in (model.state_dict() if whole is None else whole).items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            owner = _module_name(key).replace(".base_layer", "")
            key = key.replace(".base_layer.", ".")
            if key.endswith(".weight"):
                tensor = merged_w[owner]
        out[key] = tensor
    return out


def engine_weights(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs a sampling engine needs after an update. A plain model: its whole state dict
    (`weight_sync.full_tensors`: names, dtypes and shapes known before anything is gathered). A LoRA model:
    the merged weights of each transformer block that holds an adapter, and nothing else
    (the embeddings, norms outside those blocks and the head never change). Each adapted block goes whole,
    merged where adapted: vLLM fuses q/k/v and gate/up and processes a fused layer from the tensors that
    arrive, so sending q and v without k would be sending a third of a layer. Under FSDP every process
    iterates it in step: the adapted blocks' tensors are gathered whole (a collective per tensor) and merged."""
    from .engines.weight_sync import full_tensors

    if not is_lora(model):
        return full_tensors(model)   # under FSDP: gathered one tensor at a time
    return _merged_adapted_blocks(model)


def _merged_adapted_blocks(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    import re

    from .engines.weight_sync import full_tensors

    block = re.compile(r"^(.*?\.layers\.\d+)\.")
    adapted = {m.group(1) for name, mod in model.named_modules() if hasattr(mod, "lora_A")
               for m in [block.match(name + ".")] if m}
    whole = {key: tensor for key, tensor in full_tensors(model)      # no copy when not sharded
             if (m := block.match(key)) and m.group(1) in adapted}
    yield from merged_state_dict(model, whole).items()


@contextlib.contextmanager
def adapter_off(model: nn.Module):
    """`model` computes its base (adapters switched off) inside the block: the reference model of `--beta`
    with LoRA, no second copy of the weights. Nothing happens for a model without adapters. Only the
    flag its forward reads is flipped (peft's own `enable_adapters(False)` also clears requires_grad,
    which the optimizer and DDP must keep seeing set)."""
    layers = lora_layers(model)
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
