"""Packed training rows on sdpa, each GRPO group's prompt computed once.

A padded micro-batch pays for its padding, and a GRPO batch recomputes every prompt G times (once per
completion). The "shared" layout removes both: one row [1, L] holds groups one after another, a group
being a prompt followed by the completions that share it,

    [ prompt_0 | c_00 | c_01 | ... | c_0k ][ prompt_1 | c_10 | ... ] ...

with positions restarting at 0 for every prompt and every completion continuing at len(prompt). A prompt
token attends causally within its prompt; a completion token attends to its whole prompt and to its own
earlier tokens, never to the other completions of its group. That is exactly what each sequence sees
on its own (same keys, same positions), so log-probs and gradients equal the padded path's; the prompt's
hidden states are computed once and their gradient sums the contributions of all its completions.

Mechanism: the models keep transformers' own modules; only their attention implementation becomes
"s2d_sdpa" (`enable(model)`), registered with transformers' AttentionInterface. Its mask function
returns the active `Segments` layout while `active(layout)` is entered around a forward (and defers to
sdpa's mask otherwise), so every attention layer receives the layout as its `attention_mask` and runs
one sdpa call per block: causal over a prompt (or a lone sequence), and prompt + completion with a
"whole prompt, causal completion" mask. Any other call (the rollout engine's prefill, generate) sees a
normal sdpa mask and runs transformers' sdpa attention unchanged. Gradient checkpointing recomputes a
layer with the arguments it saved, the layout included.

Where it is used (`shared_ok`): CPU training with sdpa, on model types whose attention has no sliding
window or logit soft-capping. On a GPU the per-block calls would be launch-bound (hundreds per layer), so
GPUs keep padded micro-batches (sdpa) or packed rows (flash-attention varlen). `S2D_SHARED_PREFIX=0`
turns it off.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NAME = "s2d_sdpa"
# model types whose decoder attention is plain causal self-attention through AttentionInterface
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "olmo2")

_ACTIVE: list[Segments] = []


@dataclass
class Segments:
    """The layout of one packed row: groups of (prompt length, completion lengths), in row order."""
    groups: list[tuple[int, list[int]]]
    _blocks: dict = field(default_factory=dict, repr=False)

    def blocks(self, device: torch.device) -> tuple[list[int], list[tuple[int | None, torch.Tensor | None]]]:
        """The row cut into attention blocks: their sizes, and per block (prompt block, mask). A prompt, or
        a group of one sequence, attends causally to itself (None, None); a completion of n tokens
        attends to its prompt block's keys and its own under `mask` [n, p + n]."""
        key = str(device)
        if key not in self._blocks:
            sizes, calls, masks = [], [], {}
            for p, cs in self.groups:
                if len(cs) == 1:                       # nothing shared: one causal block
                    sizes.append(p + cs[0])
                    calls.append((None, None))
                    continue
                prompt = len(sizes)
                sizes.append(p)
                calls.append((None, None))
                for n in cs:
                    if (p, n) not in masks:            # row r may see the prompt and completion tokens <= r
                        masks[p, n] = torch.ones(n, p + n, dtype=torch.bool, device=device).tril(diagonal=p)
                    sizes.append(n)
                    calls.append((prompt, masks[p, n]))
            self._blocks[key] = (sizes, calls)
        return self._blocks[key]


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention-function signature: query [1, Hq, L, D], key/value [1, Hkv, L, D] ->
    ([1, L, Hq, D], None)."""
    if not isinstance(attention_mask, Segments):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise NotImplementedError("the shared-prefix layout has no sliding window or soft-capping (see shared_ok)")
    sizes, calls = attention_mask.blocks(query.device)
    # split, not one slice per block: a slice's backward writes a zero tensor of the whole row, split's
    # backward is one concatenation; 4-D pieces, or sdpa takes its slow math path on a CPU
    qs, ks, vs = query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)
    gqa = query.shape[1] != key.shape[1]
    p_drop = dropout if module.training else 0.0
    outs = []
    for i, (prompt, mask) in enumerate(calls):
        if mask is None:
            o = F.scaled_dot_product_attention(qs[i], ks[i], vs[i], dropout_p=p_drop, is_causal=True, scale=scaling,
                                               enable_gqa=gqa)
        elif mask.shape[0] == 0:
            o = qs[i]                                                   # an empty completion: no queries
        else:
            o = F.scaled_dot_product_attention(qs[i], torch.cat([ks[prompt], ks[i]], 2),
                                               torch.cat([vs[prompt], vs[i]], 2), attn_mask=mask,
                                               dropout_p=p_drop, scale=scaling, enable_gqa=gqa)
        outs.append(o)
    return torch.cat(outs, 2).transpose(1, 2), None                      # [1, L, Hq, D]


def _mask(*args, **kwargs):
    if _ACTIVE:
        return _ACTIVE[-1]
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _mask)


def shared_ok(model, device: torch.device | None) -> bool:
    """Whether `model` trains on this device with the shared-prefix layout (see the module docstring)."""
    if os.environ.get("S2D_SHARED_PREFIX", "1") == "0":
        return False
    if device is not None and torch.device(device).type != "cpu":
        return False
    cfg = model.config
    if (getattr(cfg, "_attn_implementation", None) or "sdpa") not in ("sdpa", NAME):
        return False
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return False
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return False
    return not getattr(cfg, "attn_logit_softcapping", None)


def enable(model) -> None:
    """Route `model`'s attention through `attention` (sdpa unless a `Segments` layout is active)."""
    _register()
    model.config._attn_implementation = NAME
    for sub in model.modules():            # modules that cache their own config copy
        c = getattr(sub, "config", None)
        if c is not None and c is not model.config and getattr(c, "_attn_implementation", None) == "sdpa":
            c._attn_implementation = NAME


def _no_packing(position_ids):
    return None


@contextlib.contextmanager
def known_layout():
    """Within this block, transformers' mask builder does not probe `position_ids` for packed sequences.

    With no attention mask and no cache, `create_causal_mask` checks whether the position ids restart
    inside a row (`masking_utils.find_packed_sequence_indices`), a `.all()` that makes the CPU wait until
    the GPU has finished all queued work, at the start of every forward. The trainer's rows say what they
    are: padded rows hold one sequence each, shared rows carry their own mask (`Segments`), and packed rows
    pass flash-attention's varlen boundaries, which its mask ignores. So the probe's answer is never
    needed there."""
    try:
        from transformers import masking_utils
    except ImportError:                     # pragma: no cover - transformers is a dependency
        yield
        return
    probe = getattr(masking_utils, "find_packed_sequence_indices", None)
    if probe is None or probe is _no_packing:
        yield
        return
    masking_utils.find_packed_sequence_indices = _no_packing
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = probe


@contextlib.contextmanager
def active(layout: Segments):
    """Within this block, a forward of an `enable`d model builds `layout` as its attention mask."""
    _ACTIVE.append(layout)
    try:
        yield
    finally:
        _ACTIVE.pop()
