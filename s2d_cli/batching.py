"""Micro-batches: how a step's sequences become the rows that one forward + backward runs.

`pack(sequences, token_budget, layout=...)` cuts a batch of `Sequence`s into `MicroBatch`es of at most
`token_budget` tokens, in one of three layouts (see `s2d_cli.trainer` for when each is chosen):
- packed: one row per micro-batch, position ids restarting per sequence, boundaries for a varlen kernel;
- shared: one row of prompt groups, each prompt once followed by its completions (`s2d_cli.attention`);
- padded: length-sorted right-padded rows, cut where the padding saved outweighs a micro-batch's cost.

A `MicroBatch` carries the loss positions (`pred_pos`, `targets`, `seq_idx`, `tok_idx`) and the
per-sequence / per-token data the loss needs, so a loss never looks at padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Sequence:
    """One training sequence: prompt + completion tokens, with per-sequence and per-token data.

    `scalars` hold per-sequence values (advantage, reward, weight); `token_data` hold tensors whose
    first dimension is the completion length (rollout logprobs, teacher top-K ...)."""
    prompt_ids: list[int]
    completion_ids: list[int]
    scalars: dict[str, float] = field(default_factory=dict)
    token_data: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class Batch:
    sequences: list[Sequence]
    metrics: dict[str, float] = field(default_factory=dict)   # e.g. reward mean, already global
    records: list[dict] = field(default_factory=list)          # rollout records to keep on disk


@dataclass
class MicroBatch:
    """Sequences of one micro-batch: packed into one row [1, L] (flash-attention), or right-padded rows
    [b, W]. M = completion tokens in the micro-batch (the loss positions).

    Right-padded rows need no attention mask and no position ids: under causal attention a real token only
    attends to the tokens before it, all real, and its position is its column. Without a mask, sdpa runs
    its causal kernels (which skip the blocks above the diagonal) instead of a masked one over all of
    [W, W]; the padding's outputs are garbage nobody reads (no loss position is on padding)."""
    input_ids: torch.Tensor        # [1, L] or [b, W]
    position_ids: torch.Tensor | None     # [1, L] (packed: restarts at every sequence) or None (padded: the column)
    pred_pos: torch.Tensor         # [M] positions in the flattened rows whose hidden state predicts a completion token
    targets: torch.Tensor          # [M] the completion tokens
    seq_idx: torch.Tensor          # [M] which sequence (0..b-1)
    tok_idx: torch.Tensor          # [M] index within its completion
    lengths: torch.Tensor          # [b] completion lengths
    scalars: dict[str, torch.Tensor]      # name -> [b]
    token_data: dict[str, torch.Tensor]   # name -> [M, ...]
    sequences: list[Sequence]
    segments: Any = None           # "shared" layout: the row's `attention.Segments` (prompt groups)
    varlen: dict[str, Any] | None = None  # "packed" layout: flash-attention's cu_seq_lens_q/k, max_length_q/k

    @property
    def num_seqs(self) -> int:
        return len(self.sequences)

    @property
    def max_len(self) -> int:
        """The longest completion, from the host-side sequences (reading `lengths` would wait on the GPU)."""
        return max((len(s.completion_ids) for s in self.sequences), default=0)

    def mask_BT(self) -> torch.Tensor:
        return torch.arange(self.max_len, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def to_BT(self, x_M: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Scatter a per-token vector [M, ...] into padded [b, T, ...] (cheap: no vocabulary dim)."""
        t = self.max_len
        out = x_M.new_full((self.num_seqs, t, *x_M.shape[1:]), fill)
        out[self.seq_idx, self.tok_idx] = x_M
        return out


# What one more padded micro-batch costs (its own forward/backward launch, optimizer-free), in padded
# tokens: `pack` splits a length-sorted batch where the padding saved exceeds it. On a CPU (the bench's
# shapes): 512.
MICRO_BATCH_OVERHEAD_TOKENS = 512
# On a GPU a micro-batch's forward + backward is launched from Python, kernel by kernel, whatever its
# size: measured on an H100 with a Qwen3-0.6B shape (bench/RESULTS-gpu.md, GRPO update row), the same
# batch in 3 micro-batches took 0.57 s a step, in 2 0.44 s, while the GPU's kernel time per step was
# TRL's (about 0.36 s; TRL's single micro-batch: 0.38 s a step): one more micro-batch cost ~0.13 s plus
# ~0.03 s of padding saved, about 0.16 s of launching per micro-batch of 28 layers. Meanwhile the
# GPU trains at about 1.8e14 FLOP/s on that shape (TRL's step: 18,240 padded tokens x 6 x 0.6e9 params
# in 0.36 s). Their product, in tokens, is the GPU overhead: ~8,400 tokens for 0.6B, ~800 for Qwen3-8B.
# Measured while every forward still began with a host sync (transformers' packed-sequence probe, which
# `hidden_at` now skips): a GPU run of `bench/gpu_probe.py update` should re-measure it.
GPU_LAUNCH_S_PER_LAYER = 0.006
GPU_TRAIN_FLOP_S = 1.8e14


def micro_batch_overhead_tokens(lm: nn.Module, device: torch.device | None) -> int:
    """The per-micro-batch cost `pack` weighs against padding: a constant on a CPU; on a GPU the
    launch time of one forward + backward (per layer) times the tokens the GPU would train meanwhile."""
    if device is None or torch.device(device).type != "cuda":
        return MICRO_BATCH_OVERHEAD_TOKENS
    params = sum(p.numel() for p in lm.parameters())
    launch_s = GPU_LAUNCH_S_PER_LAYER * lm.config.num_hidden_layers
    return max(MICRO_BATCH_OVERHEAD_TOKENS, int(launch_s * GPU_TRAIN_FLOP_S / (6 * max(params, 1))))


LAYOUTS = ("padded", "packed", "shared")


def pack(sequences: list[Sequence], token_budget: int, *, layout: str = "padded",
         device: torch.device | None = None, overhead_tokens: int | None = None) -> list[MicroBatch]:
    """Micro-batches of at most `token_budget` tokens (a longer sequence gets one of its own).

    "packed" rows (flash-attention): first-fit-decreasing bins of real tokens. "shared" rows (sdpa on a
    CPU, `s2d_cli.attention`): the same bins of whole prompt groups, each prompt once, followed by its
    completions. "padded" rows (other sdpa, eager): sequences sorted by length and cut into runs of
    similar length, choosing the cuts (dynamic programming) that minimise padded tokens +
    `overhead_tokens` per micro-batch: one padded batch of lengths 65..161 costs rows x 161, runs of
    similar length cost little more than their real tokens."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "shared":
        units = _prompt_groups(sequences, token_budget)
        sizes = [len(sequences[u[0]].prompt_ids) + sum(len(sequences[i].completion_ids) for i in u) for u in units]
        order = sorted(range(len(units)), key=lambda k: -sizes[k])
        bins = _first_fit([sizes[k] for k in order], token_budget)
        return [_make_shared([[sequences[i] for i in units[order[k]]] for k in sorted(b, key=lambda k: order[k])],
                             device) for b in bins]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    lengths = [len(sequences[i]) for i in order]
    if layout == "padded":
        overhead = MICRO_BATCH_OVERHEAD_TOKENS if overhead_tokens is None else overhead_tokens
        runs = _padded_runs(lengths, token_budget, overhead)
    else:
        runs = _first_fit(lengths, token_budget)
    return [_make_micro([sequences[order[k]] for k in sorted(run, key=lambda k: order[k])], layout == "padded",
                        device) for run in runs]


def _prompt_groups(sequences: list[Sequence], budget: int) -> list[list[int]]:
    """Indices of `sequences` grouped by identical prompt (first-seen order), a group cut where its
    prompt + completions would exceed `budget` tokens (each part then carries its own prompt copy)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(sequences):
        groups.setdefault(tuple(s.prompt_ids), []).append(i)
    units = []
    for prompt, idx in groups.items():
        unit, size = [], len(prompt)
        for i in idx:
            n = len(sequences[i].completion_ids)
            if unit and size + n > budget:
                units.append(unit)
                unit, size = [], len(prompt)
            unit.append(i)
            size += n
        units.append(unit)
    return units


def _padded_runs(lengths: list[int], budget: int, overhead: int) -> list[list[int]]:
    """Cuts of `lengths` (longest first) into runs minimising sum(rows x longest + overhead), each run
    within `budget` padded tokens unless it is a single sequence. Returns runs of positions."""
    n = len(lengths)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):                 # a run of positions [i, j); its longest is lengths[i]
        for i in range(j - 1, -1, -1):
            cost = (j - i) * lengths[i]
            if cost > budget and j - i > 1:
                break                         # only grows as i moves left
            if best[i] + cost + overhead < best[j]:
                best[j], cut[j] = best[i] + cost + overhead, i
    runs, j = [], n
    while j > 0:
        runs.append(list(range(cut[j], j)))
        j = cut[j]
    return runs[::-1]


def _first_fit(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit bins of positions of `lengths` (longest first) holding at most `budget` real tokens."""
    bins: list[list[int]] = []
    sizes: list[int] = []
    for k, n in enumerate(lengths):
        for b, size in enumerate(sizes):
            if size + n <= budget:
                bins[b].append(k)
                sizes[b] += n
                break
        else:
            bins.append([k])
            sizes.append(n)
    return bins


def _make_micro(seqs: list[Sequence], padded: bool, device) -> MicroBatch:
    rows = len(seqs) if padded else 1
    width = max(len(s) for s in seqs) if padded else sum(len(s) for s in seqs)
    ids_RW = torch.zeros(rows, width, dtype=torch.long)           # padding id 0: after every real token, never a target
    pos_RW = None if padded else torch.zeros(rows, width, dtype=torch.long)
    pred = []
    cu = [0]                                  # packed: where each sequence starts in the row, then the row's end
    for s_i, s in enumerate(seqs):
        offset = cu[-1]
        full = s.prompt_ids + s.completion_ids
        row, start = (s_i, 0) if padded else (0, offset)
        ids_RW[row, start:start + len(full)] = torch.tensor(full, dtype=torch.long)
        if not padded:
            pos_RW[row, start:start + len(full)] = torch.arange(len(full))
        first = row * width + start + len(s.prompt_ids) - 1   # flattened position predicting completion token 0
        pred += range(first, first + len(s.completion_ids))
        cu.append(offset + len(full))
    varlen = None
    if not padded:    # the sequence boundaries, as flash-attention's varlen kernels take them
        cu_t, longest = torch.tensor(cu, dtype=torch.int32), max(len(s) for s in seqs)
        varlen = {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest}
    return _micro(seqs, ids_RW, pos_RW, pred, None, device, varlen)


def _make_shared(groups: list[list[Sequence]], device) -> MicroBatch:
    """One packed row of prompt groups (each a list of sequences with the same prompt): every prompt
    once, then its completions; positions restart per prompt and continue per completion."""
    from .attention import Segments

    ids, pos, pred, layout = [], [], [], []
    for group in groups:
        prompt = group[0].prompt_ids
        p = len(prompt)
        last = len(ids) + p - 1                       # the prompt's last token predicts each completion's first
        ids += prompt
        pos += range(p)
        for s in group:
            n = len(s.completion_ids)
            if n:
                pred += [last, *range(len(ids), len(ids) + n - 1)]
            ids += s.completion_ids
            pos += range(p, p + n)
        layout.append((p, [len(s.completion_ids) for s in group]))
    return _micro([s for group in groups for s in group], torch.tensor([ids], dtype=torch.long),
                  torch.tensor([pos], dtype=torch.long), pred, Segments(layout), device)


def _micro(seqs: list[Sequence], ids, pos, pred: list[int], segments, device, varlen=None) -> MicroBatch:
    """A MicroBatch of `seqs` laid out as `ids` / `pos` (the rows) and `pred` (per completion token, in
    sequence order, the flattened row position that predicts it): the per-token and per-sequence fields."""
    n = [len(s.completion_ids) for s in seqs]
    names = sorted({k for s in seqs for k in s.scalars})
    tnames = sorted({k for s in seqs for k in s.token_data})
    mb = MicroBatch(
        input_ids=ids, position_ids=pos, pred_pos=torch.tensor(pred, dtype=torch.long),
        targets=torch.tensor([t for s in seqs for t in s.completion_ids], dtype=torch.long),
        seq_idx=torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(n, dtype=torch.long)),
        tok_idx=torch.tensor([i for k in n for i in range(k)], dtype=torch.long),
        lengths=torch.tensor(n),
        scalars={k: torch.tensor([float(s.scalars.get(k, 0.0)) for s in seqs]) for k in names},
        token_data={k: torch.cat([s.token_data[k] for s in seqs]) for k in tnames},
        sequences=seqs, segments=segments, varlen=varlen,
    )
    return _to(mb, device) if device is not None else mb


def metric_tokens(mb: MicroBatch) -> float:
    """The tokens a loss's per-token metrics average over: completion tokens times the sequence's
    "weight" (a weight-0 sequence, e.g. a dropped zero-variance group, is outside the loss mask).
    Weighting micro-batch means by it makes the logged mean independent of packing and processes."""
    seqs = mb.sequences                     # host-side: no wait on the GPU
    if not any("weight" in s.scalars for s in seqs):
        return float(sum(len(s.completion_ids) for s in seqs))
    return float(sum(len(s.completion_ids) * float(s.scalars.get("weight", 0.0)) for s in seqs))


def _to(mb: MicroBatch, device) -> MicroBatch:
    for name in ("input_ids", "position_ids", "pred_pos", "targets", "seq_idx", "tok_idx",
                 "lengths"):
        v = getattr(mb, name)
        if v is not None:
            setattr(mb, name, v.to(device))
    mb.scalars = {k: v.to(device) for k, v in mb.scalars.items()}
    mb.token_data = {k: v.to(device) for k, v in mb.token_data.items()}
    if mb.varlen is not None:
        cu = mb.varlen["cu_seq_lens_q"].to(device)
        mb.varlen = {**mb.varlen, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    return mb
