"""The hf engine's sampling loop: one prefill per distinct prompt, a lean decode step, finished rows dropped.

    rows = sample(model, prompts, n=4, max_new_tokens=64, stop_ids=[eos], pad_id=0, temperature=1.0,
                  logprobs=True, topk=8, generator=torch.Generator().manual_seed(0))
    rows[i * 4 + j].token_ids        # sample j of prompt i; .logprobs, .topk_ids, .topk_logprobs

What it saves over `model.generate` (measured in bench/, `make bench` rows 1, 3 and 6):
- a group of n samples shares its prompt: the prompt is prefilled once and its KV cache repeated n
  times, instead of n identical prefills;
- for Llama-family decoders (Llama, Qwen2, Qwen3, Mistral without a sliding window: `fast_decode_ok`)
  each decode step is a straight-line function of the module's own weights over a preallocated KV cache
  (`_FastDecoder`): the same arithmetic as the transformers modules (logits equal to 1e-5 on CPU,
  tested; bit-identical on the CPUs measured), without the per-call wrapper, mask-building and cache
  bookkeeping that cost a tiny model more than its matmuls. On a CPU a small model's q/k/v and
  gate/up projections run as one GEMM each, Qwen3's q and k norms as one, and RMSNorm as five kernels
  instead of `F.rms_norm`'s ten (a quarter less time per decode step on the bench's 2-layer CPU
  shape, the same tokens);
- rows that emitted a stop token leave the batch (the KV cache is compacted once a quarter of the rows
  are done), so the long tail of a group does not drag the finished rows through every step;
- on a GPU (`_StaticStep`) the step keeps every shape fixed for the call -- the whole KV cache up front,
  no compaction, the cache slot as a tensor -- and is captured once as a CUDA graph and replayed: a
  small model's decode step is bound by kernel launches, and one replay replaces ~20 launches per
  layer (6.5 ms vs 66.6 ms per step for `generate` on a Qwen3-0.6B shape with 64 rows, H100,
  bench/RESULTS-gpu.md). `S2D_CUDA_GRAPHS=0` runs the same fixed-shape step eagerly;
- no logits processors: log-probs (raw distribution, float32) and top-K are taken from each step's
  logits directly, and sampling is Gumbel-max (`probs / Exp(1)` argmax, as vLLM samples) on the
  temperature / top-k / top-p filtered distribution, applied in transformers' order; with `row_seeds`
  (a training run's per-completion seeds) each row inverts its CDF at its own counter-based uniform
  (`keyed_uniforms`), so a completion does not depend on its batch-mates, its process or its engine.

A model with peft LoRA adapters (`--lora-rank`, `s2d_cli.lora`) takes the fast step too, on merged weights
W + s B A made once per call (the frozen W untouched): within 7 % of the plain model's step on the bench's CPU
shape, 2.2x faster than the model's own forward adding B A x at every step (bench/bench_lora.py).

Other architectures decode with the model's own forward and a `DynamicCache` (still one prefill per
prompt and compaction). Positions follow training: a left-padded row's first real token is position 0.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..lora import mergeable, merged_linear


@dataclass
class Sampled:
    token_ids: list[int]
    finish_reason: str                                       # "stop" or "length"
    logprobs: list[float] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


# ----------------------------------------------------------------------------------------------
# sampling from one step's logits

def filter_logits(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' warpers in transformers' order: temperature, then top-k, then top-p (nucleus; the
    most likely token always survives). Removed entries become -inf. float32 in, float32 out."""
    if temperature != 1.0:
        logits_BV = logits_BV / temperature
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = (cum_BV - sorted_BV.softmax(-1)) >= top_p    # the tokens before it already hold p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV


_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)          # SplitMix64's constants as signed int64
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it would copy the sign bit in)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def keyed_uniforms(seeds_B: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] float64 uniforms in [0, 1): row b's t-th draw of SplitMix64 seeded with seeds_B[b].

    A pure function of (seed, t): a row's draws do not depend on which rows share its batch, in what
    order, or on which process -- what makes a completion's tokens a function of its own seed. int64
    arithmetic wraps modulo 2^64 as SplitMix64's does (checked against the Python reference in the
    tests)."""
    t_T = torch.arange(1, steps + 1, dtype=torch.long, device=seeds_B.device)
    z = seeds_B[:, None] + t_T[None, :] * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * 2.0 ** -53


def draw_keyed(logits_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits) by inverting its CDF at the row's own uniform u_B (float64
    cumulative sums; a filtered-out token has zero mass and is never picked)."""
    cdf_BV = logits_BV.softmax(-1).double().cumsum(-1)
    target_B1 = (u_B * cdf_BV[:, -1])[:, None]
    return torch.searchsorted(cdf_BV, target_B1, right=True)[:, 0].clamp_max_(cdf_BV.shape[-1] - 1)


def draw(logits_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(logits): argmax of probs / E with E = -log U ~ Exp(1) (Gumbel-max;
    `-log(rand)` rather than `exponential_`, which is 3-4x slower on a CPU)."""
    probs_BV = logits_BV.softmax(-1)
    noise_BV = torch.rand(probs_BV.shape, generator=generator, device=probs_BV.device).log_().neg_()
    return probs_BV.div_(noise_BV).argmax(-1)


# ----------------------------------------------------------------------------------------------
# the straight-line decode step for Llama-family decoders

FAST_TYPES = ("llama", "qwen2", "qwen3", "mistral")
CACHE_HEADROOM = 256      # new-token slots the KV cache starts with; it doubles when they run out
CUDA_GRAPHS = os.environ.get("S2D_CUDA_GRAPHS", "1") != "0"   # S2D_CUDA_GRAPHS=0: the static step runs eagerly


def fast_decode_ok(model) -> bool:
    """Llama-family decoder whose every layer is the standard pre-norm attention + SwiGLU block, with
    its weights whole on this process (not sharded)."""
    cfg = model.config
    if cfg.model_type not in FAST_TYPES or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return False
    # sharded weights (FSDP1 wrappers, FSDP2 DTensors) are only whole inside the modules' own forward hooks
    if any("FSDP" in type(m).__name__ or "FullySharded" in type(m).__name__ for m in model.modules()):
        return False
    if any(type(p.data).__name__ == "DTensor" or p.numel() == 0 for p in model.parameters()):
        return False
    trunk = getattr(model, "model", None)
    if trunk is None or not all(hasattr(trunk, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    for layer in trunk.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "head_dim", "scaling")):
            return False
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return False
        # plain float weights: another wrapper, a quantised (packed integer) or offloaded (meta) weight
        # computes something other than F.linear of `.weight`. A peft LoRA layer over a plain linear one
        # is sampled through its merged weight, W + s B A (`lora.merged_linear`, made once per call)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if hasattr(proj, "lora_A"):
                if not mergeable(proj):
                    return False
                proj = proj.get_base_layer()
            if type(proj) is not torch.nn.Linear or not proj.weight.is_floating_point() or proj.weight.is_meta:
                return False
    return model.get_output_embeddings() is not None


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float | torch.Tensor,
         size: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen3RMSNorm: float32 statistics, the weight applied in the input
    dtype; the same kernels in the same order (bit-identical), five of them. (`F.rms_norm` is no single
    kernel on a CPU: a composite of ten small ones, twice the time at decode sizes.)

    `eps` and `size` (x's last dimension) as 0-d float32 tensors made once (`_norm`): the mean is then
    written as what `mean` runs on a CPU, a sum divided by the size, and neither number becomes a fresh
    0-d tensor (a kernel and a copy each) on every call: a quarter less time per norm at decode sizes,
    the same bits."""
    x32 = x.float()                                            # no copy for float32
    ms = x32.pow(2).mean(-1, keepdim=True) if size is None else x32.pow(2).sum(-1, keepdim=True).div_(size)
    y = (x32 * ms.add_(eps).rsqrt_()).to(x.dtype)
    return y if weight is None else weight * y


def _norm(weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A norm's arguments for `_rms`: its weight, eps and size as 0-d float32 tensors on its device. The
    size only on a CPU, where `mean` is a sum divided by the size; CUDA's mean kernel multiplies by 1 / size
    instead, so there `_rms` keeps `mean` (the same bits as the model's own norm)."""
    def scalar(v):
        return torch.tensor(float(v), dtype=torch.float32, device=weight.device)
    return weight, scalar(eps), scalar(weight.shape[-1]) if weight.device.type == "cpu" else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) written as
    roll(x, half) times a sin whose first half is negated (bit-identical: (-a) * s == a * (-s))."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _signed(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class _Layer:
    """One decoder layer's weights as plain tensors, read once per call (a module attribute lookup per
    weight per step costs a small model more than some of its kernels). With `fuse` q/k/v are one
    matrix and gate/up another: one GEMM instead of three and two, the same dot products (bit-identical
    on the CPUs measured, equal to float rounding in the tests). See `_fuse_ok` for when."""

    def __init__(self, layer):
        a, m = layer.self_attn, layer.mlp
        self.head_dim, self.scaling = a.head_dim, a.scaling
        self.qkv = [merged_linear(p) for p in (a.q_proj, a.k_proj, a.v_proj)]   # (weight, bias); LoRA: merged
        self.gate_up = [merged_linear(p) for p in (m.gate_proj, m.up_proj)]
        self.o, self.down = merged_linear(a.o_proj), merged_linear(m.down_proj)
        self.q_heads = self.qkv[0][0].shape[0] // a.head_dim
        self.kv_heads = self.qkv[1][0].shape[0] // a.head_dim
        self.ln1 = _norm(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.ln2 = _norm(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.inter = self.gate_up[0][0].shape[0]
        # Qwen3's per-head q / k norms as one norm over the q and k heads together, with each head's weight
        self.qk_norm = None
        if hasattr(a, "q_norm"):
            self.qk_norm = _norm(torch.cat((a.q_norm.weight.expand(self.q_heads, -1),
                                            a.k_norm.weight.expand(self.kv_heads, -1))), a.q_norm.variance_epsilon)

    def fuse(self) -> None:
        self.qkv, self.gate_up = [_cat(self.qkv)], [_cat(self.gate_up)]


FUSE_MAX_BYTES = 64 << 20   # fused q/k/v and gate/up copies up to this size in all (small models)


def _fuse_ok(layers: list[_Layer]) -> bool:
    """Fuse the projections of a small model on a CPU: there a decode step's GEMMs are a few microseconds
    of arithmetic each and their fixed cost matters; on a GPU a CUDA graph already removed the launches,
    and for a large model the copies would cost memory for nothing."""
    weights = [w for ly in layers for w, _ in ly.qkv + ly.gate_up]
    return weights[0].device.type == "cpu" and sum(w.numel() * w.element_size() for w in weights) <= FUSE_MAX_BYTES


def _cat(pairs):
    weights, biases = zip(*pairs)
    return torch.cat(weights), (None if biases[0] is None else torch.cat(biases))


class _FastDecoder:
    """A preallocated KV cache [B, kv_heads, capacity, head_dim] per layer (grown by doubling) and the
    one-token step."""

    def __init__(self, model, dyn_cache, rows: int, repeat: int, capacity: int, positions: int):
        self.model, self.trunk = model, model.model
        self.layers = [_Layer(layer) for layer in self.trunk.layers]
        if _fuse_ok(self.layers):
            for ly in self.layers:
                ly.fuse()
        self.final_norm = _norm(self.trunk.norm.weight, self.trunk.norm.variance_epsilon)
        head = model.get_output_embeddings()
        self.head = (head.weight, getattr(head, "bias", None))
        self.k, self.v = [], []
        # zeros, not empty: the static step attends over every slot with the unwritten ones masked, and
        # a masked slot still multiplies its value by a zero weight (0 x a NaN bit pattern = NaN)
        for layer in dyn_cache.layers:                         # prompt KV from the HF prefill, repeated
            keys, values = layer.keys, layer.values            # [P, kv, L, hd]
            k = keys.new_zeros((rows, keys.shape[1], capacity, keys.shape[3]))
            v = values.new_zeros((rows, values.shape[1], capacity, values.shape[3]))
            k[:, :, :keys.shape[2]] = keys.repeat_interleave(repeat, dim=0)
            v[:, :, :values.shape[2]] = values.repeat_interleave(repeat, dim=0)
            self.k.append(k)
            self.v.append(v)

        # cos/sin of every position this call can reach, once (per step: one gather instead of the
        # rotary module); rope types whose frequencies follow the sequence length so far ("dynamic",
        # "longrope": short factors until the original context length) stay per step
        self.rope_table = None
        rope_type = str(getattr(self.trunk.rotary_emb, "rope_type", "default"))
        if "dynamic" not in rope_type and "longrope" not in rope_type:
            w = self.trunk.embed_tokens.weight
            pos = torch.arange(positions, device=w.device)[None]
            cos, sin = self.trunk.rotary_emb(w.new_zeros((1, 1, 1)), pos)
            self.rope_table = (cos[0], _signed(sin[0]))                          # [positions, hd]

    def ensure(self, slot: int, limit: int) -> None:
        """Room for cache slot `slot`: the buffers double (up to `limit`) when it is reached, so a call
        whose completions stop early never holds a max_new_tokens-long cache."""
        capacity = self.k[0].shape[2]
        if slot < capacity:
            return
        grown = min(max(2 * capacity, slot + 1), limit)
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = old.new_empty((*old.shape[:2], grown, old.shape[3]))
                new[:, :, :capacity] = old
                buffers[i] = new

    def select(self, idx: torch.Tensor) -> None:
        self.k = [k.index_select(0, idx) for k in self.k]
        self.v = [v.index_select(0, idx) for v in self.v]

    def step(self, tokens_B: torch.Tensor, pos_B: torch.Tensor, slot: int | torch.Tensor,
             mask_B11S: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] of the token after `tokens_B`, written to cache slot `slot` at positions `pos_B`.

        `slot` an int: attention reads the cache up to that slot (`mask_B11S` cut to slot + 1 columns).
        `slot` a one-element tensor (the static step of `_StaticStep`): every shape is fixed, attention
        reads the whole cache and `mask_B11S` must also hide the slots after `slot`."""
        B = tokens_B.shape[0]
        static = isinstance(slot, torch.Tensor)
        x = self.trunk.embed_tokens(tokens_B[:, None])                               # [B, 1, H]
        if self.rope_table is not None:
            cos_B1D, sin_B1D = self.rope_table[0][pos_B][:, None], self.rope_table[1][pos_B][:, None]
        else:
            cos, sin = self.trunk.rotary_emb(x, pos_B[:, None])                      # [B, 1, hd]
            cos_B1D, sin_B1D = cos, _signed(sin)
        for i, ly in enumerate(self.layers):
            hd, nq, nkv = ly.head_dim, ly.q_heads, ly.kv_heads
            h = _rms(x, *ly.ln1)
            if len(ly.qkv) == 1:                                                     # [B, nq + 2 nkv, hd]
                qk, v = F.linear(h, *ly.qkv[0]).view(B, -1, hd).split((nq + nkv, nkv), dim=1)
            else:
                q, k, v = (F.linear(h, w, b).view(B, -1, hd) for w, b in ly.qkv)
                qk = torch.cat((q, k), dim=1)
            if ly.qk_norm is not None:
                qk = _rms(qk, *ly.qk_norm)
            q, k = _rotate(qk, cos_B1D, sin_B1D).split((nq, nkv), dim=1)            # [B, heads, hd]
            if static:
                self.k[i].index_copy_(2, slot, k[:, :, None])
                self.v[i].index_copy_(2, slot, v[:, :, None])
                keys, values = self.k[i], self.v[i]
            else:
                self.k[i][:, :, slot] = k
                self.v[i][:, :, slot] = v
                keys, values = self.k[i][:, :, :slot + 1], self.v[i][:, :, :slot + 1]
            o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask_B11S, scale=ly.scaling,
                                               enable_gqa=True)                      # [B, nq, 1, hd]
            x = x + F.linear(o.transpose(1, 2).reshape(B, 1, -1), *ly.o)
            h = _rms(x, *ly.ln2)
            if len(ly.gate_up) == 1:
                gate, up = F.linear(h, *ly.gate_up[0]).split((ly.inter, ly.inter), dim=-1)
            else:
                gate, up = (F.linear(h, w, b) for w, b in ly.gate_up)
            x = x + F.linear(F.silu(gate) * up, *ly.down)
        return F.linear(_rms(x, *self.final_norm)[:, 0], *self.head)


class _StaticStep:
    """The decode step with every shape fixed for the whole call: the cache holds all L + max_new_tokens
    slots from the start, no row leaves the batch, and the slot is a tensor. On a GPU the step is
    captured once as a CUDA graph and replayed (one launch instead of ~20 per layer: a decode step of a
    small model is bound by kernel launches, not by the GPU); elsewhere it runs eagerly (what the CPU
    tests check against the growing-cache step)."""

    def __init__(self, decoder: _FastDecoder, attend_B11S: torch.Tensor, graph: bool):
        self.decoder, self.graph = decoder, None
        B, S = attend_B11S.shape[0], attend_B11S.shape[-1]
        device = attend_B11S.device
        self.tokens_B = torch.zeros(B, dtype=torch.long, device=device)
        self.pos_B = torch.zeros(B, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.attend_B11S, self.slots_S = attend_B11S, torch.arange(S, device=device)
        self.use_graph = graph

    def _run(self) -> torch.Tensor:
        mask_B11S = self.attend_B11S & (self.slots_S <= self.slot)
        return self.decoder.step(self.tokens_B, self.pos_B, self.slot, mask_B11S).float()

    def __call__(self, tokens_B: torch.Tensor, pos_B: torch.Tensor, slot: int) -> torch.Tensor:
        self.tokens_B.copy_(tokens_B)
        self.pos_B.copy_(pos_B)
        self.slot.fill_(slot)
        if not self.use_graph:
            return self._run()
        if self.graph is None:
            # warm-up on a side stream (lazy library state), then capture (records, runs nothing); the
            # warm-up writes this step's K/V into this step's slot, and the replay below writes the
            # same values again
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.out_BV = self._run()
        self.graph.replay()
        return self.out_BV


# A CPU decode step of at most this many multiply-adds (rows x the weights a token passes through) runs on
# one intra-op thread. Its ops are microseconds each (the bench's 2-layer CPU shape: 16 rows x 0.36M weights,
# 6M a step); with more threads each one that torch or MKL parallelises pays an OpenMP fork / join, and
# afterwards the idle worker spins on a core -- on a loaded machine it takes that core from the thread doing
# the work, and a step can take ten times longer (measured: 2 threads 0.4-3.6 s a `generate` call where one
# thread took 0.06 s; `make bench` rows 1 and 3).
SINGLE_THREAD_STEP_MACS = 1 << 24


def _step_macs(model, rows: int) -> int:
    """Multiply-adds of one decode step, roughly: rows x the parameters a token's forward multiplies (all
    but the input embedding, a lookup; a tied head counts once, as the head)."""
    params = sum(p.numel() for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and (head is None or head.weight is not embed.weight):
        params -= embed.weight.numel()
    return rows * params


@contextlib.contextmanager
def cpu_threads(model, rows: int, device: torch.device):
    """One intra-op thread for a small CPU decode (`SINGLE_THREAD_STEP_MACS`); the caller's setting
    afterwards. Elsewhere (a GPU, a large step, already one thread) nothing changes."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or _step_macs(model, rows) > SINGLE_THREAD_STEP_MACS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def static_cache_fits(model, rows: int, slots: int, device: torch.device) -> bool:
    """A CUDA device with room for the whole-call KV cache in a quarter of its free memory."""
    if device.type != "cuda":
        return False
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    size = next(model.parameters()).element_size()
    need = 2 * cfg.num_hidden_layers * rows * kv_heads * slots * head_dim * size
    return need <= torch.cuda.mem_get_info(device)[0] // 4


# ----------------------------------------------------------------------------------------------
# the loop

@torch.inference_mode()
def sample(model, prompts: list[list[int]], *, n: int, max_new_tokens: int, stop_ids: list[int], pad_id: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, logprobs: bool = False, topk: int = 0,
           generator: torch.Generator | None = None, row_seeds: list[int] | None = None,
           fast: bool | None = None, static: bool | None = None, lockstep: bool = False) -> list[Sampled]:
    """n completions of each prompt, rows in prompt-major order (see the module docstring).

    fast: None picks the straight-line step when `fast_decode_ok(model)`; False always uses the model's
    forward. static (fast steps only): the fixed-shape step of `_StaticStep`, a CUDA graph on a GPU;
    None picks it on a GPU with room for the whole-call KV cache (`static_cache_fits`). The model must
    be in eval mode. A small decode on a CPU runs on one intra-op thread (`cpu_threads`).
    row_seeds (one per row, prompt-major; replaces `generator`): row b's tokens are drawn with
    `keyed_uniforms` of its own seed, so they do not depend on the other rows of the call.
    lockstep: every call runs all max_new_tokens steps, finished rows included (cut at their stop
    afterwards): with FSDP-sharded weights each forward is a collective, and every process must make
    the same number of them whatever its rows sample."""
    device = next(model.parameters()).device
    with cpu_threads(model, len(prompts) * n, device):
        return _sample(model, prompts, n=n, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                       temperature=temperature, top_p=top_p, top_k=top_k, logprobs=logprobs, topk=topk,
                       generator=generator, row_seeds=row_seeds, fast=fast, static=static, lockstep=lockstep,
                       device=device)


def _sample(model, prompts, *, n, max_new_tokens, stop_ids, pad_id, temperature, top_p, top_k, logprobs, topk,
            generator, row_seeds, fast, static, lockstep, device) -> list[Sampled]:
    from transformers import DynamicCache

    P, L = len(prompts), max(len(p) for p in prompts)
    ids_PL = torch.full((P, L), pad_id, dtype=torch.long)
    mask_PL = torch.zeros((P, L), dtype=torch.long)
    for i, p in enumerate(prompts):                          # left padding
        ids_PL[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask_PL[i, L - len(p):] = 1
    ids_PL, mask_PL = ids_PL.to(device), mask_PL.to(device)
    pos_PL = (mask_PL.cumsum(-1) - 1).clamp_min(0)
    padded = bool((mask_PL == 0).any())

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids_PL, attention_mask=mask_PL if padded else None, position_ids=pos_PL,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits_BV = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    del out
    B = P * n
    if row_seeds is not None and len(row_seeds) != B:
        raise ValueError(f"sample: {len(row_seeds)} row seeds for {B} rows")
    # every row's uniforms for the whole call at once: a step then picks its active rows' column t
    uniforms_BT = (keyed_uniforms(torch.tensor(row_seeds, dtype=torch.long, device=device), max_new_tokens)
                   if row_seeds is not None and temperature > 0 else None)
    fast = fast_decode_ok(model) if fast is None else fast
    limit = L + max_new_tokens
    static = fast and (static_cache_fits(model, B, limit, device) if static is None else static)
    if fast:
        decoder = _FastDecoder(model, cache, B, n, capacity=limit if static else min(limit, L + CACHE_HEADROOM),
                               positions=limit)
        del cache
        # [B, 1, 1, L + max_new_tokens] boolean "may attend"; None when no row has padding (plain causal attention)
        attend_B11S = mask_PL.bool().repeat_interleave(n, dim=0)[:, None, None, :].expand(B, 1, 1, L)
        attend_B11S = torch.cat([attend_B11S, attend_B11S.new_ones((B, 1, 1, max_new_tokens))], -1) if padded else None
        if static:
            full_B11S = attend_B11S if attend_B11S is not None else torch.ones((B, 1, 1, limit), dtype=torch.bool,
                                                                                device=device)
            # no graph for per-step rope ("dynamic", "longrope"): transformers picks their frequencies by a
            # host-side test on the positions, which a captured graph would freeze at capture time
            stepper = _StaticStep(decoder, full_B11S, graph=device.type == "cuda" and CUDA_GRAPHS
                                  and decoder.rope_table is not None)
        elif attend_B11S is not None:
            # the growing step's mask as sdpa's additive form (0 / -inf in the model's dtype), made once:
            # given a boolean mask, sdpa builds exactly this tensor in every layer of every step
            dtype = model.get_input_embeddings().weight.dtype
            attend_B11S = torch.zeros(attend_B11S.shape, dtype=dtype, device=device).masked_fill_(~attend_B11S,
                                                                                                 float("-inf"))
    else:
        cache.batch_repeat_interleave(n)
        mask_BS = torch.cat([mask_PL.repeat_interleave(n, dim=0),
                             mask_PL.new_ones((B, max_new_tokens))], dim=-1)
    next_pos_B = pos_PL[:, -1].repeat_interleave(n) + 1

    row_of = torch.arange(B, device=device)                   # batch slot -> row index
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    tokens_BT, lp_BT, tki_BTK, tkl_BTK = [], [], [], []       # per step, for the rows active at that step
    active_per_step: list[torch.Tensor] = []
    alive_B = torch.ones(B, dtype=torch.bool, device=device)     # per batch slot: no stop token yet
    for t in range(max_new_tokens):
        if logprobs or topk > 0:
            logp_BV = logits_BV.log_softmax(-1)
        if uniforms_BT is not None:
            tok_B = draw_keyed(filter_logits(logits_BV, temperature, top_k, top_p), uniforms_BT[row_of, t])
        elif temperature > 0:
            tok_B = draw(filter_logits(logits_BV, temperature, top_k, top_p), generator)
        else:
            tok_B = logits_BV.argmax(-1)
        tokens_BT.append(tok_B)
        active_per_step.append(row_of)
        if logprobs:
            lp_BT.append(logp_BV.gather(-1, tok_B[:, None])[:, 0])
        if topk > 0:
            values, ids = logp_BV.topk(topk, dim=-1)
            tki_BTK.append(ids)
            tkl_BTK.append(values)
        if t == max_new_tokens - 1:
            break
        alive_B &= ~torch.isin(tok_B, stops)
        slot = L + t
        if static:
            # fixed shapes: no compaction (finished rows run on; `_collect` cuts them at their stop),
            # and the host looks at the stop flags only every 8 steps, so it queues steps ahead of the GPU
            if t % 8 == 7 and not lockstep and not bool(alive_B.any()):
                break
            logits_BV = stepper(tok_B, next_pos_B, slot)
            next_pos_B = next_pos_B + 1
            continue
        n_alive = alive_B.shape[0] if lockstep else int(alive_B.sum())   # the one host sync per step
        if n_alive == 0:
            break
        if n_alive * 4 <= alive_B.shape[0] * 3:     # a quarter of the slots are done: compact
            keep = alive_B.nonzero()[:, 0]
            row_of, tok_B, next_pos_B, alive_B = row_of[keep], tok_B[keep], next_pos_B[keep], alive_B[keep]
            if fast:
                decoder.select(keep)
                attend_B11S = attend_B11S[keep] if attend_B11S is not None else None
            else:
                cache.batch_select_indices(keep)
                mask_BS = mask_BS[keep]
        if fast:
            decoder.ensure(slot, limit)
            logits_BV = decoder.step(tok_B, next_pos_B, slot,
                                     attend_B11S[..., :slot + 1] if attend_B11S is not None else None).float()
        else:
            logits_BV = model(input_ids=tok_B[:, None], attention_mask=mask_BS[:, :slot + 1],
                              position_ids=next_pos_B[:, None], past_key_values=cache,
                              use_cache=True).logits[:, -1].float()
        next_pos_B = next_pos_B + 1
    return _collect(B, tokens_BT, active_per_step, lp_BT, tki_BTK, tkl_BTK, set(stop_ids))


def _by_row(per_step: list[torch.Tensor], active_per_step: list[torch.Tensor], rows: int, fill) -> torch.Tensor:
    """Stack per-step tensors over the then-active rows into [rows, T, ...] on their device (no host
    sync per step), then move the whole thing to the CPU once."""
    first = per_step[0]
    out = first.new_full((rows, len(per_step), *first.shape[1:]), fill)
    for t, (x, idx) in enumerate(zip(per_step, active_per_step)):
        out[idx, t] = x
    return out.cpu()


def _collect(rows: int, tokens_BT, active_per_step, lp_BT, tki_BTK, tkl_BTK, stop_set) -> list[Sampled]:
    """Per-step tensors over the then-active rows -> per-row lists, cut after the first stop token
    (rows dropped from the batch stopped; slots they never reached hold -1)."""
    tok = _by_row(tokens_BT, active_per_step, rows, -1).tolist()
    lp = _by_row(lp_BT, active_per_step, rows, 0.0).float() if lp_BT else None
    tki = _by_row(tki_BTK, active_per_step, rows, 0) if tki_BTK else None
    tkl = _by_row(tkl_BTK, active_per_step, rows, 0.0).float() if tkl_BTK else None
    out = []
    for b, ids in enumerate(tok):
        end = next((i + 1 for i, x in enumerate(ids) if x in stop_set), None)
        reason = "stop" if end is not None else "length"
        if end is None:
            end = next((i for i, x in enumerate(ids) if x < 0), len(ids))
        row = Sampled(token_ids=ids[:end], finish_reason=reason)
        if lp is not None:
            row.logprobs = lp[b, :end].tolist()
        if tki is not None:
            row.topk_ids, row.topk_logprobs = tki[b, :end].tolist(), tkl[b, :end].tolist()
        out.append(row)
    return out
