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
window or logit soft-capping. On a GPU the per-block calls would be launch-bound (hundreds per layer).
`S2D_SHARED_PREFIX=0` turns it off.

Packed rows on a GPU without the flash-attn package (`varlen_ok`): the same `enable`d attention runs a
packed row [1, L] of whole sequences through torch's own flash-attention varlen kernel
(`torch.nn.attention.varlen.varlen_attn`, torch >= 2.9), given the boundaries the trainer passes with
every packed micro-batch (cu_seq_lens_q / max_length_q). No padding is computed: a GRPO batch of
completions of 40..256 tokens costs its real tokens, where padded rows cost rows x longest. The kernel
is tried once per device, dtype and head shape against sdpa (forward and backward) before a run uses it;
a build where it fails, a float32 model or a model type not in SUPPORTED keeps padded rows.
`S2D_VARLEN=0` turns it off.
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
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:                    # a packed row: the trainer passes its sequences' boundaries
        return packed_attention(query, key, value, cu, kwargs["max_length_q"], scaling,
                                dropout if module.training else 0.0), None
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
    return _plain_attention(model)


def _plain_attention(model) -> bool:
    """sdpa (or `enable`d) attention of a SUPPORTED type: full causal self-attention in every layer, no
    sliding window, no soft-capping."""
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


# ------------------------------------------------------------------------------------------------
# packed rows through torch's flash-attention varlen kernel

def varlen_kernel():
    """`torch.nn.attention.varlen.varlen_attn` (torch >= 2.9; flash-attention on CUDA), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _params(fn) -> frozenset:
    import inspect

    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def packed_attention(query, key, value, cu_seq_lens: torch.Tensor, max_length: int, scaling: float | None,
                     dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each sequence of a packed row: query [1, Hq, L, D], key/value [1, Hkv, L, D],
    `cu_seq_lens` [n + 1] int32 (where each sequence starts, then L) -> [1, L, Hq, D].

    torch's varlen_attn changed its keywords across releases (2.9: is_causal; 2.10: window_size and
    scale; 2.12: enable_gqa): the call adapts to the signature it finds."""
    if dropout:
        raise NotImplementedError("packed rows run torch's varlen kernel, which has no attention dropout")
    fn = varlen_kernel()
    if fn is None:
        raise RuntimeError("packed rows need torch.nn.attention.varlen (torch >= 2.9)")
    params = _params(fn)
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)    # [L, H, D]
    kw = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:                             # older builds: one key/value head per query head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1, output_size=q.shape[1]), \
                v.repeat_interleave(rep, dim=1, output_size=q.shape[1])
    if "window_size" in params:
        kw["window_size"] = (-1, 0)       # causal
    else:
        kw["is_causal"] = True
    if scaling is not None:
        if "scale" in params:
            kw["scale"] = scaling
        else:                             # the kernel's default scale is D ** -0.5
            q = q * (scaling * q.shape[-1] ** 0.5)
    out = fn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **kw)
    return out.unsqueeze(0)


def varlen_ok(model, device: torch.device | None) -> bool:
    """Whether `model` trains on this device with packed rows through `packed_attention` (see the module
    docstring): a CUDA device, half-precision weights, plain attention without dropout, and a kernel that
    agrees with sdpa on this head shape."""
    if os.environ.get("S2D_VARLEN", "1") == "0" or device is None or torch.device(device).type != "cuda":
        return False
    if not _plain_attention(model) or getattr(model.config, "attention_dropout", 0.0):
        return False
    weight = model.get_input_embeddings().weight
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return kernel_agrees(str(weight.device), weight.dtype, heads, kv_heads, head_dim)


@functools.cache
def kernel_agrees(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """`packed_attention` on two sequences of a random packed row gives per-sequence causal sdpa's output
    and gradients (float32 reference; 5 % relative error allowed in half precision, where bf16 rounding
    gives 0.3 % and attention across the boundary 66 %, without the causal mask 80 %: random inputs). False
    where the kernel is missing, refuses the shape, or disagrees."""
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 11]
    L = sum(lengths)

    def rand(h):
        return torch.randn(1, h, L, head_dim, generator=gen).to(device, dtype).requires_grad_()

    q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
    grad = torch.randn(1, L, heads, head_dim, generator=gen).to(device, dtype)
    cu = torch.tensor([0, lengths[0], L], dtype=torch.int32, device=device)
    with torch.enable_grad():             # whatever the caller's grad mode: backward is part of the test
        try:
            out = packed_attention(q, k, v, cu, max(lengths), head_dim ** -0.5)
            got = [out.detach().float(), *(g.float() for g in torch.autograd.grad(out, (q, k, v), grad))]
        except Exception:                 # missing kernel, unsupported shape or dtype: padded rows instead
            return False
        qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
        ref = torch.cat([F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=heads != kv_heads)
                         for a, b, c in zip(qf.split(lengths, 2), kf.split(lengths, 2), vf.split(lengths, 2))],
                        2).transpose(1, 2)
        want = [ref.detach(), *torch.autograd.grad(ref, (qf, kf, vf), grad.float())]
    tol = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5     # relative, over the whole tensor
    return all(g.shape == w.shape and float((g - w).norm()) <= tol * float(w.norm()) for g, w in zip(got, want))
