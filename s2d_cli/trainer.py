"""The training core that grpo, kl-warmup and opd share.

A command contributes two things: `make_batch(step) -> Batch` (sample + score, or read from an
artifact) and `loss_fn(policy, mb, info) -> (loss, metrics)`. Everything else lives here, written out
as one loop in `Trainer.fit`:

    for step in range(start, steps):
        seed(step)                                   # per-step seeding: resume is exact by construction
        batch = make_batch(step)                     # this process's share of the global batch
        micro = pack(batch.sequences, token_budget)  # packed, or length-bucketed padded micro-batches
        for epoch in range(update_epochs):           # PPO mu epochs (1: purely on-policy)
            for mb in micro: backward(loss_fn(policy, mb, info))   # losses use *global* normalisers
            clip grads; optimizer.step()
        scheduler.step(); after_update(step)         # e.g. push weights into a vLLM engine
        log metrics.jsonl; checkpoint every N steps

Losses are normalised by global totals (sequences or tokens across all processes and micro-batches)
and scaled by the world size, so DDP's gradient averaging yields exactly the full-batch gradient: two
processes produce the per-step losses of one process with the same global batch.

Micro-batch layouts (`pack`):
- packed (flash-attention): one row per micro-batch, position ids restarting per sequence, the
  sequences' boundaries handed to the varlen kernel (`MicroBatch.varlen`): no compute spent on padding;
- shared (sdpa on a CPU, `s2d_cli.attention`): one row of prompt groups, each prompt once followed by
  its completions, attention run block by block: no padding, and a GRPO group's prompt is computed once
  instead of G times (the bench's update row: 2,651 tokens a step instead of 3,603 real, 4,152 padded);
- packed on sdpa (a GPU without the flash-attn package, half-precision weights): the same packed rows,
  run by torch's own flash-attention varlen kernel through `s2d_cli.attention` (`varlen_ok`);
- padded (elsewhere: eager, float32 on a GPU, a torch without the varlen kernel): length-sorted
  right-padded rows, cut into micro-batches of similar lengths where that saves more padding than a
  micro-batch costs. A packed row there would need a dense [L, L] block-diagonal mask, attention over
  it costing L^2 = (sum of lengths)^2 instead of sum(length^2); per-block calls as in "shared" would be
  launch-bound on a GPU. Right padding needs no attention mask at all (see MicroBatch), so sdpa runs
  its causal kernels.

Log-probs and KLs come from the final hidden states through chunked lm-head products that recompute
a chunk's logits in backward (`s2d_cli.heads`): no `[tokens, vocab]` float32 tensor is ever
materialised.

FSDP: on GPUs accelerate's FSDP plugin (examples/accelerate/fsdp-8gpu.yaml). accelerate runs FSDP on
GPUs only, so under an FSDP config on a CPU host (ACCELERATE_USE_FSDP, the CPU tests) the trainer shards
with torch's `fully_shard` (FSDP2) itself: each decoder layer one unit, the rest (embeddings, final
norm, head) the root, `Policy`. Sampling with the hf engine calls the model outside `Policy.forward`, so
the root is gathered around `make_batch` (`whole_root`) and every process decodes the same number of
steps (`sharded`: each layer's forward is a collective). Teachers and reference models are sharded the
same way, frozen, with no optimizer state (`adopt`). Checkpoints are gathered one tensor at a time into
a plain HF model.

Run directory:
    out/config.json, out/metrics.jsonl, out/checkpoints/step-000010/ (HF model + optimizer.pt +
    master/master_fp32.safetensors for half-precision weights, in a folder of its own so that vLLM and
    transformers, which load every *.safetensors beside config.json, never read it as weights +
    trainer_state.json, written last, with the sha256 of every other file: checked before a resume),
    out/model/ (final HF checkpoint), out/manifest.json (last),
    out/tb/ (with report_to: tensorboard).
    With --lora-rank R (`s2d_cli.lora`): checkpoints hold the adapter in place of the HF model, out/model/
    is the merged model and out/adapter/ the PEFT adapter.

Deliberately left out: a value model, sequence parallelism, CPU offload.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from . import cliutil as cu
from .artifacts import MANIFEST, _write_atomic, fingerprint, holds, input_entry, read_manifest
from .batching import (  # noqa: F401  (re-exported: the loss functions' and tests' names)
    LAYOUTS,
    Batch,
    MicroBatch,
    Sequence,
    _to,
    metric_tokens,
    micro_batch_overhead_tokens,
    pack,
)
from .errors import UsageError
from .lora import LoraFields


@dataclass
class TrainFields(LoraFields):
    """Options of the training core (every trainer's config inherits them; LoRA's from `lora.LoraFields`)."""
    steps: int = 100                 # optimizer steps
    lr: float = 1e-6                 # peak learning rate (AdamW)
    lr_schedule: str = "constant"    # constant | cosine (linear warmup, cosine decay to min_lr_ratio * lr)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0       # 0 disables clipping
    micro_batch_tokens: int = 8192   # token budget of one packed micro-batch (gradient accumulation)
    grad_checkpointing: bool = False
    chunk_size: int = 1024           # positions per chunk of lm-head / log-prob / KL computation
    save_every: int = 0              # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2        # newest checkpoints kept
    seed: int = 0
    dtype: str = "auto"              # trained weights: fp32 on CPU; bf16 on GPU ("auto")
    # half-precision weights keep an fp32 copy in the optimizer (AdamW steps it; the model gets it rounded
    # back): at lr 1e-6 a step is far below bf16's resolution (~4e-3 relative), so stepping bf16 weights
    # directly drops almost every update. 16 bytes a parameter instead of 8 (18 during the step); false trains them directly
    master_weights: bool = True
    # experiment trackers through accelerate: tensorboard (out/tb), wandb, mlflow, aim, clearml, comet_ml,
    # dvclive, swanlab, trackio; all (every one installed) or none (s2d_cli/trackers.py)
    report_to: list[str] = field(default_factory=list)
    tracker_project: str | None = None  # the trackers' project / experiment name (default: s2d)
    tensorboard: bool = False        # older spelling of report_to: [tensorboard]
    wandb_project: str | None = None # older spelling of report_to: [wandb] with tracker_project: NAME
    # seconds between plain progress lines where stderr is not a terminal (default: $S2D_PROGRESS_EVERY or 30; 0: none)
    progress_every: float | None = None
    resume: bool = False             # continue from the newest checkpoint (also automatic on a rerun)
    force: bool = False              # replace a finished run, or a partial one of another config (a partial
                                     # run of this config resumes; delete it by hand to restart it)
    trust_remote_code: bool = False
    # attention kernels of the trained model and the models scoring its micro-batches: transformers'
    # default (sdpa) unless set; "flash_attention_2" / "flash_attention_3" (a GPU host with flash-attn)
    # trains on packed rows, no padding at all
    attn_implementation: str | None = None

    def check_training(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--steps: expected >= 1, got {self.steps}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UsageError(f"lr_schedule: expected constant or cosine, got {self.lr_schedule!r}")
        if self.micro_batch_tokens < 8:
            raise UsageError(f"micro_batch_tokens: expected >= 8, got {self.micro_batch_tokens}")
        for key, low in (("chunk_size", 1), ("save_every", 0), ("keep_checkpoints", 1), ("warmup_steps", 0)):
            if getattr(self, key) < low:
                raise UsageError(f"{key}: expected >= {low}, got {getattr(self, key)}")
        # float keys (lr, betas, weight decay ...): config.FLOAT_RANGES, checked as the config resolves
        from .models import resolve_dtype
        resolve_dtype(self.dtype, torch.device("cpu"))   # a bad name fails before the run directory is made
        from .models import check_attn_implementation
        check_attn_implementation(self.attn_implementation)
        from .trackers import names_of
        names_of(self)                                   # a tracker that is not installed: before any work
        self.check_lora()



# ----------------------------------------------------------------------------------------------
# one step's bookkeeping

@dataclass
class StepInfo:
    step: int
    epoch: int
    world_size: int
    num_sequences: float     # global (all processes) weighted sequence count
    num_tokens: float        # global weighted completion-token count


MASTER_FILE = "master_fp32.safetensors"   # a checkpoint's fp32 master weights (TrainFields.master_weights)
MASTER_PATH = Path("master") / MASTER_FILE   # inside the checkpoint, out of the model loaders' sight
PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3")   # varlen kernels: boundaries from position ids


# ----------------------------------------------------------------------------------------------
# the policy module: trunk + a chunked head function, inside one forward (so DDP/FSDP see it)

def trunk_of(lm: nn.Module) -> nn.Module:
    return getattr(lm, lm.base_model_prefix)


class Policy(nn.Module):
    """Wraps a causal LM so that the chunked head computation runs inside `forward` (DDP/FSDP hooks
    see every parameter use). `head_fn(hidden_MH, weight_VH)` turns the hidden states at the loss
    positions into whatever the loss needs (token log-probs, KLs ...)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, mb: MicroBatch, head_fn: Callable[[torch.Tensor, torch.Tensor], Any]):
        return head_fn(hidden_at(self.lm, mb), self.lm.get_output_embeddings().weight)


def hidden_at(lm: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Final hidden states [M, H] at the positions that predict completion tokens.

    The forward never waits on the device: the layout is known on the host, so transformers' probe of the
    position ids for packed sequences (a GPU-to-CPU sync per forward) is skipped (`attention.known_layout`),
    and packed rows hand flash-attention their sequence boundaries (`mb.varlen`) instead of letting every
    layer derive them from the position ids (two syncs per layer).

    A model whose logits carry a constant scale (Granite divides them by `logits_scaling`, Cohere
    multiplies them by `logit_scale`) gets it folded in here, `models.head_scale`: every chunked head
    then computes the model's own logits as hidden @ lm_head.weight^T."""
    from .attention import known_layout
    from .models import head_scale

    layout = contextlib.nullcontext()
    if mb.segments is not None:           # "shared" layout: `lm` must be `attention.enable`d
        from .attention import NAME, active

        if lm.config._attn_implementation != NAME:   # sdpa would read the row as separate sequences
            raise RuntimeError("a shared-prompt micro-batch needs a model with attention.enable(model) applied")
        layout = active(mb.segments)
    elif mb.varlen is not None:
        from .attention import NAME

        if lm.config._attn_implementation not in (*PACKED_ATTENTION, NAME):   # sdpa would attend across the row
            raise RuntimeError("a packed micro-batch needs a flash-attention model or attention.enable(model)")
    with layout, known_layout():
        out = trunk_of(lm)(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=None,
                           use_cache=False, **(mb.varlen or {}))
    hidden_MH = out.last_hidden_state.flatten(0, 1)[mb.pred_pos]
    scale = head_scale(lm)
    return hidden_MH if scale == 1.0 else hidden_MH * scale


def shard(root: nn.Module, layers: nn.ModuleList, device: torch.device, whole: nn.Module | None = None) -> None:
    """torch's FSDP2 over all processes: each of `layers` one unit, `root` the rest, from rank 0's weights. The root is
    initialised as the root now, and every unit gathered once outside inference mode, so that sampling
    (whose first forward may enter a layer directly, under torch.inference_mode) finds them set up.
    `whole`: the model `root` belongs to, when parts of it stay outside the shards (a frozen head)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # rank 0's weights everywhere (FSDP's sync_module_states): under an FSDP config with cpu-RAM-efficient
    # loading, transformers loads the checkpoint on local rank 0 only and zeros elsewhere
    with torch.no_grad():
        for tensor in (*(whole or root).parameters(), *(whole or root).buffers()):
            dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    root._get_fsdp_state()._lazy_init()
    for unit in (*layers, root):
        unit.unshard()
        unit.reshard()


# ----------------------------------------------------------------------------------------------
# the trainer

def _host_floats(values: list) -> list[float]:
    """Floats of a mix of Python numbers and 0-d tensors, with one device-to-host copy for the tensors."""
    out = list(values)
    idx = [i for i, v in enumerate(values) if torch.is_tensor(v)]
    if idx:
        dev = values[idx[0]].device
        for i, x in zip(idx, torch.stack([values[i].reshape(()).to(dev, torch.float64) for i in idx]).tolist()):
            out[i] = x
    return [float(v) for v in out]


def _is_run_config(cfg_path: Path) -> bool:
    """Whether `cfg_path` is the config.json an s2d training run writes (kind and fingerprint), not, say,
    a model's."""
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "fingerprint" in cfg and "kind" in cfg and "config" in cfg


def _fingerprint_of(cfg_path: Path) -> str | None:
    """The fingerprint a partial run's config.json records (None: none, or unreadable)."""
    try:
        return json.loads(cfg_path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def remove_leftovers(out: Path) -> None:
    """What a killed run of this run directory left (its lock is held: no live command owns any of it):
    half-written files (`metrics.jsonl.tmp`...), models and checkpoints saved under a temporary name and never renamed
    (`.model.tmp-*`, `checkpoints/..step-N.tmp.tmp-*`, `checkpoints/.step-N.tmp`) and old copies a
    rename moved aside (`.model.old-*`, `checkpoints/.step-N.old-*`)."""
    for pattern in ("config.json.tmp", "metrics.jsonl.tmp", "manifest.json.tmp", ".write-test-*", ".model.tmp-*",
                    ".model.old-*", "checkpoints/.step-*", "checkpoints/..step-*"):
        for p in out.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


STATE_FILE = "trainer_state.json"


def checkpoint_digests(ckpt: Path) -> dict[str, str]:
    """sha256 of every file a checkpoint holds (its trainer_state.json aside), by path inside it: written
    into trainer_state.json when the checkpoint is saved, checked before a run resumes from it."""
    from .artifacts import sha256_file

    return {p.relative_to(ckpt).as_posix(): sha256_file(p)
            for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def check_checkpoint(ckpt: Path) -> None:
    """Refuse, in one line, to resume from a checkpoint whose files are not the ones it was saved with
    (truncated, edited, missing): its weights would be resumed silently wrong or fail mid-load.
    Checkpoints of versions that recorded no digests are loaded as they are."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
        saved = state.get("files") if isinstance(state, dict) else None
    except (OSError, ValueError) as e:
        raise UsageError(_damaged_line(ckpt, f"{STATE_FILE} is unreadable ({e})")) from None
    if saved is None:
        return
    now = checkpoint_digests(ckpt)
    for name, digest in saved.items():
        if name not in now:
            raise UsageError(_damaged_line(ckpt, f"{name} is missing"))
        if now[name] != digest:
            raise UsageError(_damaged_line(ckpt, f"{name} is not the file that was saved (its sha256 differs)"))


def _damaged_line(ckpt: Path, what: str) -> str:
    older = sorted(p.name for p in ckpt.parent.glob("step-*") if p != ckpt and (p / STATE_FILE).is_file())
    way = (f"move it away to resume from {older[-1]}" if older else "move it away to start the run over")
    return f"checkpoint {ckpt}: {what}; {way}, or start a new --out"


@contextlib.contextmanager
def _damaged(ckpt: Path):
    """Loading a checkpoint that fails (a damaged file of a checkpoint with no digests) is one line."""
    import pickle

    from safetensors import SafetensorError

    try:
        yield
    except UsageError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(_damaged_line(ckpt, f"cannot be loaded ({first})")) from None


def _metrics_step(line: str) -> float:
    """The step of one metrics.jsonl line; a blank or torn one (a write cut short) ranks past every step,
    so resuming drops it."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def lr_lambda(cfg: TrainFields) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    s = (seed * 1_000_003 + step * 9_973 + rank * 101) % (2**31)
    random.seed(s)
    torch.manual_seed(s)


# Settings that do not change what a run computes: rerunning with a different value resumes.
VOLATILE = ("out", "force", "resume", "config", "workers", "save_every", "keep_checkpoints", "tensorboard",
            "wandb_project", "attn_implementation", "report_to", "tracker_project", "progress_every")


def run_config_diff(old: dict, new: dict, old_inputs: list[dict] | None, new_inputs: list[dict] | None,
                    volatile: tuple[str, ...] = VOLATILE) -> str:
    """What makes a run directory's recorded config another run, for its refusal message: every key that
    differs (settings in `volatile` never do: `--resume` is no change), `steps` first since more steps is
    the usual one, then inputs whose content changed. E.g. "steps: 2 -> 3, lr: 1e-05 -> 0.0001"."""
    keys = sorted((k for k in set(old) | set(new) if k not in volatile and old.get(k) != new.get(k)),
                  key=lambda k: (k != "steps", k))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]]
    if len(keys) > 4:
        parts.append(f"{len(keys) - 4} more: {', '.join(keys[4:])}")
    parts += [f"input {n.get('path')} changed since" for o, n in zip(old_inputs or [], new_inputs or [])
              if o.get("sha256") != n.get("sha256")][:1]
    return ", ".join(parts) or "a different command"


class Trainer:
    def __init__(self, cfg: TrainFields, *, model: str, out: str, kind: str, config: dict[str, Any],
                 inputs: list[str | None] = (), volatile: tuple[str, ...] = None):
        volatile = VOLATILE if volatile is None else volatile
        from accelerate import Accelerator, DistributedType

        from .models import check_plain_head, load_model, load_tokenizer, resolve_dtype

        self.cfg, self.kind, self.config, self.volatile = cfg, kind, config, volatile
        self.out = Path(out)
        # the model and data it starts from are inputs: a rerun after either changed is not this run
        self.inputs = [input_entry(p) for p in (model, *inputs)]
        # full training (lora_rank 0): the other LoRA keys change nothing, and runs made before they existed resume
        unused = () if config.get("lora_rank") else ("lora_alpha", "lora_dropout", "lora_targets", "lora_rank")
        self.fingerprint = fingerprint({k: v for k, v in config.items() if k not in volatile and k not in unused}
                                       | {"_kind": kind} | {"_inputs": [e.get("sha256") for e in self.inputs]})
        cuda = torch.cuda.is_available()
        from . import trackers
        tracked = trackers.names_of(cfg)
        self.acc = Accelerator(cpu=not cuda, **({"log_with": trackers.log_with(tracked, self.out),
                                                 "project_dir": str(self.out)} if tracked else {}))
        # plain "cpu": under an FSDP config accelerate gives CPU processes "cpu:0", which safetensors and
        # torch.load cannot map checkpoints to
        self.device = torch.device("cpu") if self.acc.device.type == "cpu" else self.acc.device
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        self.complete = self._check_out_dir(model)
        if self.complete:
            if self.rank == 0:
                print(f"{self.out}: a finished {kind} run with this config, nothing to do (--force redoes it)",
                      file=sys.stderr)
            return
        self.tokenizer = load_tokenizer(model, trust_remote_code=cfg.trust_remote_code)
        dtype = resolve_dtype(cfg.dtype, self.device)
        self.frozen_dtype = dtype   # teachers and reference models: not trained, no masters (sharded by `adopt` under FSDP)
        if cfg.dtype == "auto" and self.acc.distributed_type == DistributedType.FSDP:
            dtype = torch.float32      # FSDP keeps the sharded fp32 weights and casts them for compute
        self.lm = load_model(model, dtype=dtype, device=self.device, trust_remote_code=cfg.trust_remote_code,
                             attn_implementation=cfg.attn_implementation)
        check_plain_head(self.lm, model)
        self.peft = None       # lora_rank > 0: the peft.PeftModel around self.lm (adapters injected in place)
        if cfg.lora_rank:
            from .lora import trainable_parameters, wrap
            self.peft = wrap(self.lm, cfg, name=model, seed=cfg.seed)
            if self.acc.is_main_process:
                trained, total = trainable_parameters(self.lm)
                cu.console.print(f"[dim]LoRA rank {cfg.lora_rank}: {trained:,} of {total:,} parameters trained "
                                 f"({100 * trained / total:.2f}%)[/]")
        self.start_step = 0
        ckpt = self._latest_checkpoint()
        if cfg.resume and ckpt is None:
            raise UsageError(f"{self.out}: --resume, but no checkpoint to resume from")
        if ckpt is not None:
            check_checkpoint(ckpt)
            with _damaged(ckpt):
                self._load_weights(ckpt)
        from .kernels import apply_training_switches, fused_adamw  # S2D_COMPILE, S2D_CHECKPOINT_LAYERS, ...
        apply_training_switches(self.lm, self.device, grad_checkpointing=cfg.grad_checkpointing)
        self.lm.config.use_cache = False
        self.attn_impl = getattr(self.lm.config, "_attn_implementation", "sdpa") or "sdpa"
        self.layout = self._pick_layout()
        self.micro_overhead = micro_batch_overhead_tokens(self.lm, self.device)
        # FSDP without accelerate (a CPU host: see the module docstring); `sharded`: any FSDP at all
        self.fsdp_cpu = (self.world > 1 and self.acc.distributed_type == DistributedType.MULTI_CPU
                         and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
        self.sharded = self.fsdp_cpu or self.acc.distributed_type == DistributedType.FSDP
        policy = Policy(self.lm)
        if self.fsdp_cpu:
            shard(policy, trunk_of(self.lm).layers, self.device)
        named = [(n, p) for n, p in self.lm.named_parameters() if p.requires_grad]
        # fp32 master weights for half-precision ones (see TrainFields.master_weights). Not under FSDP,
        # whose prepare() replaces the parameters (there "auto" loads fp32 and FSDP casts for compute).
        self.masters: list[torch.Tensor] | None = None
        if (cfg.master_weights and any(p.dtype in (torch.bfloat16, torch.float16) for _, p in named)
                and self.acc.distributed_type != DistributedType.FSDP):
            self.masters = [p.detach().float().clone().requires_grad_(True) for _, p in named]
            self._trained = [p for _, p in named]
            self._master_names = [n for n, _ in named]
            params = self.masters
        else:
            params = [p for _, p in named]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            fused=fused_adamw() and not self.fsdp_cpu)   # no fused DTensors
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        if self.fsdp_cpu:                         # already sharded: accelerate would wrap it in DDP
            self.policy, self.optimizer = policy, self.acc.prepare(self.optimizer)
        else:
            self.policy, self.optimizer = self.acc.prepare(policy, self.optimizer)
        if ckpt is not None:
            with _damaged(ckpt):
                self._load_state(ckpt)
        elif self.acc.is_main_process and self.metrics_path_exists():
            (self.out / "metrics.jsonl").unlink()  # a run killed before its first checkpoint starts over
        self.metrics_path = self.out / "metrics.jsonl"
        if self.acc.is_main_process:
            trackers.start(self.acc, cfg, out=self.out, config=config)
        self.wall_start = time.time()

    def _pick_layout(self) -> str:
        """Micro-batch layout: packed rows under flash-attention, shared-prompt rows where
        `attention.shared_ok` (sdpa on a CPU), packed rows through torch's varlen kernel where
        `attention.varlen_ok` (sdpa on a GPU), padded rows otherwise."""
        from . import attention

        if self.attn_impl in PACKED_ATTENTION:
            return "packed"
        if attention.shared_ok(self.lm, self.device):
            attention.enable(self.lm)
            return "shared"
        if attention.varlen_ok(self.lm, self.device):
            attention.enable(self.lm)
            return "packed"
        return "padded"

    def adopt(self, other: nn.Module, role: str = "teacher") -> None:
        """Make `other` (a teacher or reference model that scores the same micro-batches) read this
        trainer's layout; a model that cannot takes the whole run back to padded rows."""
        from . import attention

        if self.sharded:
            # like the student, frozen: no gradient, no optimizer state. The trunk is the root unit (the
            # scorers call it directly); the head stays whole, read by the chunked head functions.
            other.requires_grad_(False)
            shard(trunk_of(other), trunk_of(other).layers, self.device, whole=other)
        impl = getattr(other.config, "_attn_implementation", "sdpa") or "sdpa"
        if self.layout == "packed" and self.attn_impl not in PACKED_ATTENTION:   # torch's varlen kernel
            if attention.varlen_ok(other, self.device):
                attention.enable(other)
            else:
                self.layout = "padded"
            return
        if self.layout == "packed" and impl not in PACKED_ATTENTION:
            raise UsageError(f"the student trains on packed rows ({self.attn_impl}) but the {role} loads with {impl}; "
                             "both must use a flash-attention implementation")
        if self.layout == "shared":
            if attention.shared_ok(other, self.device):
                attention.enable(other)
            else:
                self.layout = "padded"
        elif self.layout == "padded" and impl in PACKED_ATTENTION:
            raise UsageError(f"the {role} loads with {impl} but the student with {self.attn_impl}; "
                             "both must use the same kind of attention")

    # -- run directory ------------------------------------------------------------------------
    def _check_out_dir(self, model: str) -> bool:
        out, cfg = self.out, self.cfg
        manifest = out / MANIFEST
        if manifest.is_file():
            old = read_manifest(out)
            if old.get("fingerprint") == self.fingerprint and not cfg.force:
                return True
            if not cfg.force:
                diff = run_config_diff(old.get("config", {}), self.config, old.get("inputs"), self.inputs,
                                       self.volatile)
                flag = "--model" if self.kind == "grpo" else "--student"
                raise UsageError(f"{out}: holds a finished {old.get('kind')} run with a different config "
                                 f"({diff}); to train on from it, start a new --out with {flag} {out}/model "
                                 "(--force replaces the finished run)")
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: exists and is not a directory")
        from .artifacts import lock_output
        from .models import check_model_ref
        check_model_ref(model)  # a mistyped model path fails before the run directory is made
        if Path(model).exists() and holds(out, Path(model)):
            raise UsageError(f"--out {out}: is the model directory {model} (or holds it); choose another --out")
        if self.acc.is_main_process:
            lock_output(out)         # one command at a time writes a run directory
            cfg_path = out / "config.json"
            ours = _is_run_config(cfg_path)     # a model directory's config.json is not a partial run
            if ours:
                remove_leftovers(out)
            if cfg.force and out.exists() and (manifest.is_file() or not ours
                                               or _fingerprint_of(cfg_path) != self.fingerprint):
                shutil.rmtree(out)       # --force keeps only a partial run of this very config: it resumes
                ours = False             # gone: nothing below may look at (or remove) it again
            if ours and _fingerprint_of(cfg_path) != self.fingerprint:
                if self._latest_checkpoint() is not None:
                    old = json.loads(cfg_path.read_text())
                    diff = run_config_diff(old.get("config", {}), self.config, old.get("inputs"), self.inputs,
                                           self.volatile)
                    raise UsageError(f"{out}: a partial run with a different config is there ({diff}); "
                                     "rerun it with its own config to resume it, or use --force (it starts "
                                     "over) or another --out")
                shutil.rmtree(out)       # a partial run with no checkpoint has nothing to lose: it makes way
            if not out.exists():
                cu.on_failure(self._discard_unstarted)
            elif not ours and any(out.iterdir()):
                raise UsageError(f"{out}: exists, is not empty and is not an s2d run; use --force or another --out")
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / f".write-test-{uuid.uuid4().hex[:6]}"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise UsageError(f"{out}: cannot write there ({e.strerror})") from None
            _write_atomic(cfg_path, (json.dumps({"kind": self.kind, "fingerprint": self.fingerprint,
                                                 "s2d_version": __version__, "config": self.config,
                                                 "inputs": self.inputs},
                                                indent=2, default=str) + "\n").encode())
        self.acc.wait_for_everyone()
        return False

    def _discard_unstarted(self) -> None:
        """A run directory this command made goes away again if the command fails before its first step
        (bad input, a model that cannot load): nothing is left behind. Once a step is logged the run
        directory stays, metrics and all."""
        if self._latest_checkpoint() is None and not (self.out / "metrics.jsonl").exists():
            shutil.rmtree(self.out, ignore_errors=True)

    def _latest_checkpoint(self) -> Path | None:
        root = self.out / "checkpoints"
        done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
        return done[-1] if done else None

    def _load_weights(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        if self.peft is not None:             # a LoRA checkpoint holds the adapter only; the base is the model's
            from .lora import load_adapter
            load_adapter(self.peft, ckpt)
            return
        state = {}
        for f in sorted(f for f in ckpt.glob("*.safetensors") if f.name != MASTER_FILE):   # (older checkpoints' place)
            state.update(load_file(f, device=str(self.device)))
        missing, unexpected = self.lm.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and self.lm.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")

    def _load_state(self, ckpt: Path) -> None:
        state = json.loads((ckpt / STATE_FILE).read_text())
        opt = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True)
        if self.masters is not None:
            # checkpoints of earlier versions kept it beside the weights
            path = next((p for p in (ckpt / MASTER_PATH, ckpt / MASTER_FILE) if p.is_file()), None)
            if path is None:
                raise UsageError(f"{ckpt}: no {MASTER_PATH} to resume the fp32 master weights from "
                                 "(made with master_weights=false?)")
            from safetensors.torch import load_file
            saved = load_file(path, device=str(self.device))
            with torch.no_grad():
                for n, m in zip(self._master_names, self.masters):
                    m.copy_(saved[n])
        if self.fsdp_cpu:      # saved whole (`_whole_state`): each rank takes its shards of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(self.policy, self.optimizer.optimizer, opt,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_step = state["step"]
        self.lm.train()
        if self.acc.is_main_process:
            cu.console.print(f"[dim]resuming {self.out} from {ckpt.name} (step {self.start_step})[/]")
            if self.metrics_path_exists():
                lines = [line for line in (self.out / "metrics.jsonl").read_text().splitlines()
                         if _metrics_step(line) <= self.start_step]
                _write_atomic(self.out / "metrics.jsonl", "".join(x + "\n" for x in lines).encode())

    def _whole_state(self, with_optimizer: bool = False) -> tuple[dict | None, dict | None]:
        """Under CPU FSDP: the model's whole tensors (gathered one at a time, kept on the main process's
        CPU) and, with_optimizer, the optimizer's whole state keyed by parameter name. Collectives: every
        process calls it. (None, None) otherwise: the model saves itself."""
        if not self.fsdp_cpu:
            return None, None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from .engines.weight_sync import full_tensors

        main = self.acc.is_main_process
        weights = {}
        for name, tensor in full_tensors(self.lm):
            if main:
                weights[name] = tensor.cpu().clone()
        optimizer = None
        if with_optimizer:
            optimizer = get_optimizer_state_dict(self.policy, self.optimizer.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return (weights, optimizer) if main else (None, None)

    @contextlib.contextmanager
    def whole_root(self):
        """The root unit's parameters (embeddings, final norm, head) gathered while the model is called
        outside `Policy.forward` (sampling); the decoder layers gather themselves in their own forward."""
        if not self.fsdp_cpu:
            yield
            return
        self.policy.unshard()
        try:
            yield
        finally:
            self.policy.reshard()

    def metrics_path_exists(self) -> bool:
        return (self.out / "metrics.jsonl").is_file()

    def save_checkpoint(self, step: int) -> None:
        """HF model + optimizer + scheduler + step, staged and renamed; trainer_state.json marks it whole."""
        from .models import save_checkpoint

        self.acc.wait_for_everyone()
        weights, optimizer = self._whole_state(with_optimizer=True)   # collective: every process
        root = self.out / "checkpoints"
        final = root / f"step-{step:06d}"
        # already there when resumed from this very checkpoint with nothing left to train (killed after
        # it, before the manifest): rewriting it would only open a moment with no checkpoint at all
        if self.acc.is_main_process and not (final / STATE_FILE).is_file():
            tmp = root / f".step-{step:06d}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if self.peft is not None:             # LoRA: the adapter, not the (frozen, merged) weights
                from .lora import save_adapter
                tmp.mkdir(parents=True)
                save_adapter(self.peft, tmp, whole=weights)   # under CPU FSDP: from the gathered tensors
            else:
                save_checkpoint(self.acc.unwrap_model(self.policy).lm, self.tokenizer, tmp, state_dict=weights)
            torch.save(optimizer if optimizer is not None else self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.masters is not None:
                from safetensors.torch import save_file
                (tmp / MASTER_PATH).parent.mkdir()
                save_file({n: m.detach().contiguous() for n, m in zip(self._master_names, self.masters)},
                          str(tmp / MASTER_PATH))
            state = {"step": step, "scheduler": self.scheduler.state_dict(), "fingerprint": self.fingerprint,
                     "files": checkpoint_digests(tmp)}
            _write_atomic(tmp / STATE_FILE, json.dumps(state).encode())
            from .models import replace_dir
            replace_dir(tmp, final)
        if self.acc.is_main_process:   # also after a skipped save: a kill may have cut the last pruning short
            for old in sorted(p for p in root.glob("step-*"))[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    # -- logging ----------------------------------------------------------------------------------
    def log(self, metrics: dict[str, float]) -> None:
        """One step's metrics: a line of metrics.jsonl, and an entry in every tracker (report_to)."""
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.acc.trackers:
            from .trackers import numeric
            self.acc.log(numeric({k: v for k, v in metrics.items() if k != "step"}), step=metrics["step"])

    # -- collectives --------------------------------------------------------------------------------
    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.acc.reduce(t, reduction="sum").tolist()

    def gather_to_main(self, items: list) -> list | None:
        """Every process's `items` concatenated in rank order on the main process (None elsewhere): the
        records of a step whose prompts are split over the ranks in order come back in prompt order."""
        if self.world == 1:
            return items
        import torch.distributed as dist

        parts = [None] * self.world if self.acc.is_main_process else None
        dist.gather_object(items, parts, dst=0)
        return [x for part in parts for x in part] if parts is not None else None

    def all_max(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, make_batch: Callable[[int], Batch], loss_fn: Callable[[nn.Module, MicroBatch, StepInfo], tuple],
            *, update_epochs: int = 1, after_update: Callable[[int], None] | None = None,
            on_batch: Callable[[int, Batch], None] | None = None, display: tuple[str, ...] = ("loss",)) -> None:
        cfg = self.cfg
        progress = cu.progress(cfg.progress_every) if self.acc.is_main_process else contextlib.nullcontext()
        with progress as bar:
            task = bar.add_task(self.kind, total=cfg.steps, completed=self.start_step, unit="step") if bar else None
            for step in range(self.start_step, cfg.steps):
                t0 = time.perf_counter()
                seed_step(cfg.seed, step, self.rank)
                self.lm.eval()
                with self.whole_root():
                    batch = make_batch(step)
                if on_batch is not None:
                    on_batch(step, batch)
                t_batch = time.perf_counter() - t0
                weights = [s.scalars.get("weight", 1.0) for s in batch.sequences]
                n_seq, n_tok, n_all_tok, n_empty = self.all_sum([
                    sum(weights), sum(w * len(s.completion_ids) for w, s in zip(weights, batch.sequences)),
                    sum(len(s) for s in batch.sequences), float(not batch.sequences)])
                if n_empty and self.world > 1:
                    # a process with nothing to train on would skip the backward its peers wait in
                    raise UsageError(f"step {step + 1}: {int(n_empty)} of {self.world} processes got no sequence "
                                     "with a completion token; every process needs one each step")
                micro = pack(batch.sequences, cfg.micro_batch_tokens, layout=self.layout, device=self.device,
                             overhead_tokens=self.micro_overhead)
                real = len(micro)
                if self.sharded:
                    # every forward of a sharded model is a collective: a process with fewer micro-batches
                    # than its peers runs its last one again, with the loss times 0 (no gradient, no metric)
                    most = self.all_max(real)
                    micro = micro + [micro[-1]] * (most - real)
                if update_epochs > 1:
                    self._store_old_logprobs(micro)
                self.lm.train()
                sums: dict[str, float] = {}
                grad_norm = worst_norm = 0.0     # worst: NaN if any epoch's was (torch.maximum keeps NaN)
                for epoch in range(update_epochs):
                    info = StepInfo(step, epoch, self.world, max(n_seq, 1e-8), max(n_tok, 1e-8))
                    for i, mb in enumerate(micro):
                        sync = contextlib.nullcontext() if i == len(micro) - 1 else self.acc.no_sync(self.policy)
                        with sync:
                            with self.acc.autocast():      # mixed precision: the forward only, not backward
                                loss, m = loss_fn(self.policy, mb, info)
                            if i >= real:
                                loss = loss * 0.0
                            self.acc.backward(loss)
                        if epoch == 0 and i < real:              # metrics stay on the device until the step ends
                            w = metric_tokens(mb)
                            sums["loss"] = sums.get("loss", 0.0) + loss.detach().float() / self.world
                            for k, v in m.items():
                                sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v) * w
                    if self.masters is not None:
                        grad_norm = self._master_step()
                    else:
                        if cfg.max_grad_norm > 0:
                            grad_norm = self.acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                        else:
                            grad_norm = torch.nn.utils.get_total_norm(
                                [p.grad for p in self.policy.parameters() if p.grad is not None])
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if hasattr(grad_norm, "full_tensor"):      # FSDP2: a DTensor
                        grad_norm = grad_norm.full_tensor()
                    worst_norm = grad_norm if epoch == 0 else torch.maximum(torch.as_tensor(worst_norm),
                                                                           torch.as_tensor(grad_norm))
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                if after_update is not None:
                    after_update(step)
                keys = sorted(sums)
                local_tok = sum(metric_tokens(mb) for mb in micro[:real])
                computed = sum(mb.input_ids.numel() for mb in micro[:real])      # padding and shared prompts included
                *host, grad_norm, worst_norm = _host_floats([sums[k] for k in keys] + [grad_norm, worst_norm])
                *totals, tok_total, computed = self.all_sum(host + [local_tok, computed])
                self._stop_if_not_finite(step, dict(zip(keys, totals)).get("loss", 0.0), worst_norm)
                tok_total = max(tok_total, 1.0)
                dt = time.perf_counter() - t0
                metrics = {"step": step + 1}
                for k, v in zip(keys, totals):
                    metrics[k] = v if k == "loss" else v / tok_total
                metrics.update(batch.metrics)
                metrics.update({"grad_norm": grad_norm, "lr": lr, "tokens": int(n_all_tok),
                                "tokens_computed": int(computed), "micro_batches": real,
                                "tokens_per_s": n_all_tok / dt, "batch_time_s": t_batch, "step_time_s": dt})
                self.log(metrics)
                if bar:
                    shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in display if k in metrics)
                    bar.update(task, advance=1, description=f"{self.kind} {shown}")
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                    self.save_checkpoint(step + 1)

    def _stop_if_not_finite(self, step: int, loss: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm is NaN or inf has already stepped the weights to garbage:
        stop before that step is logged or saved, so no checkpoint and no model/ ever holds such weights
        and the newest checkpoint (written after a good step) is where a rerun resumes. Every process
        sees the same global numbers, so every process stops."""
        bad = next(((name, v) for name, v in (("loss", loss), ("gradient norm", grad_norm))
                    if not math.isfinite(v)), None)
        if bad is None:
            return
        ckpt = self._latest_checkpoint()
        kept = (f"{self.out} keeps its last good checkpoint {ckpt.name} (rerun to resume from it)" if ckpt
                else "no checkpoint was written yet")
        raise UsageError(f"step {step + 1}: {bad[0]} is {bad[1]}, not finite: training stopped, nothing of this "
                         f"step saved; {kept}. Lower --lr, keep max_grad_norm > 0, or check the data and rewards")

    def _master_step(self) -> torch.Tensor:
        """One optimizer step on the fp32 masters: the model's half-precision gradients (already reduced
        across processes) become the masters' fp32 ones, are clipped, AdamW steps the masters, and the
        model's weights become the masters rounded to their dtype."""
        for p, m in zip(self._trained, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        self.acc.unscale_gradients()           # fp16 loss scaling (accelerate's GradScaler), else nothing
        grads = [m.grad for m in self.masters if m.grad is not None]
        if self.cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(self._trained, self.masters)
        return grad_norm

    @torch.no_grad()
    def _store_old_logprobs(self, micro: list[MicroBatch]) -> None:
        """PPO with several epochs needs the pre-update log-probs; one extra no-grad pass."""

        with self.whole_root():
            self._old_logprobs(micro)

    def _old_logprobs(self, micro: list[MicroBatch]) -> None:
        from .heads import chunked_token_logprobs

        for mb in micro:
            h = hidden_at(self.lm, mb)
            logp, _ = chunked_token_logprobs(h, self.lm.get_output_embeddings().weight, mb.targets,
                                             chunk_size=self.cfg.chunk_size)
            mb.token_data["old_logp"] = logp.detach()

    def token_logprobs(self, policy: nn.Module, mb: MicroBatch, *, with_entropy: bool = False,
                       temperature: float = 1.0):
        from .heads import chunked_token_logprobs

        return policy(mb, lambda h, w: chunked_token_logprobs(h, w, mb.targets, chunk_size=self.cfg.chunk_size,
                                                              temperature=temperature, with_entropy=with_entropy))

    # -- the end ------------------------------------------------------------------------------------
    def finish(self, extra: dict[str, Any] | None = None) -> Path:
        from .models import save_checkpoint

        self.save_checkpoint(self.cfg.steps)
        weights, _ = self._whole_state()          # collective: every process
        if self.acc.is_main_process:
            merged = weights
            # LoRA under CPU FSDP: merged from the gathered tensors (else save_checkpoint merges the model)
            if self.peft is not None and weights is not None:
                from .lora import merged_state_dict
                merged = merged_state_dict(self.lm, weights)
            save_checkpoint(self.acc.unwrap_model(self.policy).lm, self.tokenizer, self.out / "model",
                            state_dict=merged)
            if self.peft is not None:
                from .lora import save_adapter
                from .models import replace_dir
                tmp = self.out / f".adapter.tmp-{uuid.uuid4().hex[:8]}"
                tmp.mkdir()
                save_adapter(self.peft, tmp, whole=weights)
                replace_dir(tmp, self.out / "adapter")
                extra = {"adapter": "adapter", **(extra or {})}
            last = {}
            if (self.out / "metrics.jsonl").is_file():
                lines = (self.out / "metrics.jsonl").read_text().splitlines()
                last = json.loads(lines[-1]) if lines else {}
            manifest = {
                "schema_version": 1, "kind": self.kind, "s2d_version": __version__,
                "command": " ".join(["s2d", *sys.argv[1:]]), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "config": self.config, "fingerprint": self.fingerprint, "inputs": self.inputs,
                "steps": self.cfg.steps, "model": "model", "world_size": self.world, "layout": self.layout,
                "wall_time_s": time.time() - self.wall_start, "final_metrics": last, **(extra or {}),
            }
            _write_atomic(self.out / MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
            if self.acc.trackers:
                from .trackers import finish, numeric
                # held-out evaluations (kl-warmup's --eval-rollouts) reach the trackers too
                held = numeric({k: v for k, v in (extra or {}).items() if k.startswith("heldout_")}, "eval/")
                if held:
                    self.acc.log(held, step=self.cfg.steps)
                finish(self.acc)
        self.acc.wait_for_everyone()
        return self.out


def run_config(cfg) -> dict[str, Any]:
    return asdict(cfg)
