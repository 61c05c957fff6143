"""Opt-in speed switches for training: existing kernels only, each on or off by an environment variable.

    S2D_LIGER=1 s2d grpo ...                   # liger-kernel's fused RoPE, SwiGLU and RMSNorm (CUDA; pip install 's2d[liger]')
    S2D_LIGER=rope,rms_norm s2d grpo ...       # some of them only (names: rope, swiglu, rms_norm)
    S2D_COMPILE=1 s2d grpo ...                 # torch.compile each decoder layer of the trained model
    S2D_COMPILE_CACHE=DIR                      # where compiled kernels are kept (default ~/.cache/s2d/torch-compile)
    S2D_FUSED_ADAMW=0 s2d grpo ...             # foreach AdamW instead of the fused one (default: fused)
    s2d grpo --set grad_checkpointing=true     # activation checkpointing, every decoder layer ...
    S2D_CHECKPOINT_LAYERS=8 s2d grpo --set grad_checkpointing=true    # ... or the first 8 only

Everything is off by default except fused AdamW (which the trainer has always used): a run with none of
these set computes exactly what it did before, on every device. Each switch applies only where it
applies:

- liger (`apply_liger`, called by `models.load_model` for every model it loads, teachers included):
  Triton kernels, so CUDA only; on a CPU the variable is ignored with one line on stderr. It calls
  liger-kernel's own `apply_liger_kernel_to_<model type>` on the instance with its losses off (s2d's
  chunked heads compute log-probs and KLs from the hidden states; liger's fused linear cross-entropy
  would replace the model's forward). Norms and MLPs are patched per instance; liger's RoPE replaces
  the rotary function of the model type's transformers module, so it reaches every model of that type
  in the process. liger's RMSNorm replaces s2d's own fused norm (`models.fuse_rms_norms`) where both apply.
- compile (`compile_layers`): regional compilation, each decoder layer `nn.Module.compile`d; the layers
  share one class and (with transformers' cache off, as in training) one set of guards, so the layer is
  compiled once, not once per layer. Compilation is lazy (the first forward and backward); each finished
  compilation prints its seconds on stderr. `S2D_COMPILE=1` means inductor; any other value names a
  torch.compile backend (`aot_eager` traces the same forward and backward graphs without generating code:
  the tests use it, inductor's CPU code generation takes minutes on two cores). Inductor keeps its
  generated kernels in S2D_COMPILE_CACHE (set as TORCHINDUCTOR_CACHE_DIR; if neither is set,
  ~/.cache/s2d/torch-compile), so a second run of the same shapes skips code generation.
- activation checkpointing (`checkpoint_layers`): the `grad_checkpointing` key, as before; with
  S2D_CHECKPOINT_LAYERS=N only the first N decoder layers recompute their activations in backward, so a
  run that needs a little memory pays for a little recomputation, not for all of it.
- fused AdamW (`fused_adamw`): one kernel for the whole parameter list (CUDA and CPU builds of torch >= 2.4).

Deliberately left out: kernels of our own, and liger's fused losses (see above).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from .errors import UsageError

LIGER_OPS = ("rope", "swiglu", "rms_norm")


def _note(text: str) -> None:
    print(f"[s2d] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# liger-kernel

def liger_ops() -> tuple[str, ...]:
    """The liger kernels S2D_LIGER asks for: unset or "0": none; "1" / "all": all of LIGER_OPS; else a
    comma-separated subset of LIGER_OPS."""
    value = os.environ.get("S2D_LIGER", "").strip().lower()
    if value in ("", "0", "none", "false"):
        return ()
    if value in ("1", "all", "true"):
        return LIGER_OPS
    ops = tuple(x.strip() for x in value.split(",") if x.strip())
    bad = [x for x in ops if x not in LIGER_OPS]
    if bad:
        raise UsageError(f"S2D_LIGER={value}: unknown kernel {bad[0]!r}; expected 1, 0 or a comma-separated "
                         f"subset of {', '.join(LIGER_OPS)}")
    return ops


def liger_apply_fns() -> dict:
    """liger-kernel's table model type -> apply_liger_kernel_to_<type> (the one transformers' Trainer uses)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise UsageError("S2D_LIGER: needs liger-kernel (pip install 's2d[liger]')") from None
    return MODEL_TYPE_TO_APPLY_LIGER_FN


_NOTED: set[str] = set()


def apply_liger(model: torch.nn.Module, device: torch.device | str) -> tuple[str, ...]:
    """Apply the S2D_LIGER kernels to `model` on a CUDA device; returns the kernels applied (none: ())."""
    import inspect

    ops = liger_ops()
    if not ops:
        return ()
    if torch.device(device).type != "cuda":
        if "cpu" not in _NOTED:
            _NOTED.add("cpu")
            _note(f"S2D_LIGER={os.environ['S2D_LIGER']}: liger-kernel is Triton, CUDA only; not applied on "
                  f"{torch.device(device).type}")
        return ()
    model_type = getattr(model.config, "model_type", None)
    fn = liger_apply_fns().get(model_type)
    if fn is None:
        if model_type not in _NOTED:
            _NOTED.add(model_type)
            _note(f"S2D_LIGER: liger-kernel has no kernels for model type {model_type}; not applied")
        return ()
    # the switches by name; its losses off (s2d's heads compute them); gemma-style gated MLPs are geglu
    wanted = {"rope": "rope" in ops, "rms_norm": "rms_norm" in ops, "swiglu": "swiglu" in ops,
              "geglu": "swiglu" in ops, "cross_entropy": False, "fused_linear_cross_entropy": False}
    params = inspect.signature(fn).parameters
    fn(model=model, **{k: v for k, v in wanted.items() if k in params})
    applied = tuple(op for op in ops if op in params or (op == "swiglu" and "geglu" in params))
    if model_type not in _NOTED:
        _NOTED.add(model_type)
        _note(f"liger-kernel on {model_type}: {', '.join(applied) or 'nothing it offers'}")
    return applied


# ----------------------------------------------------------------------------------------------
# regional torch.compile

def compile_backend() -> str | None:
    """The torch.compile backend S2D_COMPILE asks for: None (off), "inductor" for "1", else the name given."""
    value = os.environ.get("S2D_COMPILE", "").strip()
    if value.lower() in ("", "0", "false", "none"):
        return None
    return "inductor" if value.lower() in ("1", "true") else value


def compile_cache_dir() -> Path:
    return Path(os.environ.get("S2D_COMPILE_CACHE") or Path.home() / ".cache" / "s2d" / "torch-compile").expanduser()


class CompileClock:
    """Seconds spent in torch.compile (dynamo's start / end callbacks), printed as each compilation ends."""

    def __init__(self):
        self.seconds, self.count, self._start = 0.0, 0, None

    def start(self, args=None) -> None:
        self._start = time.perf_counter()

    def end(self, args=None) -> None:
        if self._start is None:
            return
        dt, self._start = time.perf_counter() - self._start, None
        self.seconds += dt
        self.count += 1
        _note(f"torch.compile: compilation {self.count} took {dt:.1f} s ({self.seconds:.1f} s in all; "
              f"cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', '-')})")


COMPILE_CLOCK = CompileClock()
_CLOCK_ON = False


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM (`model.layers` of the transformers models s2d trains)."""
    trunk = getattr(lm, getattr(lm, "base_model_prefix", "model"), lm)
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UsageError(f"S2D_COMPILE / S2D_CHECKPOINT_LAYERS: {type(lm).__name__} has no decoder layers "
                         "at .model.layers")
    return list(layers)


def compile_layers(lm: torch.nn.Module, backend: str | None = None) -> int:
    """`nn.Module.compile` every decoder layer of `lm` with `backend` (default: S2D_COMPILE's); returns how
    many (0: off). Compilation itself happens at the first forward / backward."""
    global _CLOCK_ON
    backend = backend or compile_backend()
    if backend is None:
        return 0
    if os.environ.get("S2D_COMPILE_CACHE") or not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())    # inductor reads it at each use
    if not _CLOCK_ON:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(COMPILE_CLOCK.start)
        callback_handler.register_end_callback(COMPILE_CLOCK.end)
        _CLOCK_ON = True
    layers = decoder_layers(lm)
    # packed rows change length every micro-batch: after the second length dynamo marks it dynamic; a
    # recompile per layer would be a bug (guards on a layer index), but must not silently fall back
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(layers))
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


# ----------------------------------------------------------------------------------------------
# activation checkpointing, fused AdamW

def checkpoint_layers(lm: torch.nn.Module, enabled: bool) -> int:
    """Activation checkpointing (non-reentrant) of the first S2D_CHECKPOINT_LAYERS decoder layers (all if
    unset) when `enabled`; returns how many layers recompute in backward."""
    if not enabled:
        return 0
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(lm)
    value = os.environ.get("S2D_CHECKPOINT_LAYERS", "").strip()
    if not value:
        return len(layers)
    if not value.isdigit():
        raise UsageError(f"S2D_CHECKPOINT_LAYERS={value}: expected a number of layers (0..{len(layers)})")
    n = min(int(value), len(layers))
    for layer in layers[n:]:
        layer.gradient_checkpointing = False      # transformers' GradientCheckpointingLayer reads this per call
    return n


def fused_adamw() -> bool:
    return os.environ.get("S2D_FUSED_ADAMW", "1") != "0"


def apply_training_switches(lm: torch.nn.Module, device: torch.device, *, grad_checkpointing: bool) -> dict:
    """The trainer's hook for the model it trains: checkpointing, then compilation. Returns what is on;
    one line on stderr when anything beyond the defaults is."""
    on = {"checkpointed_layers": checkpoint_layers(lm, grad_checkpointing),
          "compiled_layers": compile_layers(lm), "compile_backend": compile_backend(),
          "fused_adamw": fused_adamw()}
    if on["compiled_layers"] or os.environ.get("S2D_CHECKPOINT_LAYERS") or not on["fused_adamw"]:
        _note(f"training switches on {torch.device(device).type}: {on['checkpointed_layers']} layers checkpointed, "
              f"{on['compiled_layers']} compiled ({on['compile_backend'] or 'off'}), fused AdamW {on['fused_adamw']}")
    return on
