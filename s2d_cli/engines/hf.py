"""transformers backend: batched, left-padded sampling on the model itself; runs wherever torch runs.

    engine = HFEngine("runs/teacher", seed=0)            # loads model + tokenizer from a checkpoint
    engine = HFEngine(policy, tokenizer=tok)             # a trainer's live model: weights are shared
    groups = engine.generate(prompt_ids, SamplingConfig(n=4, max_new_tokens=64, logprobs=True, topk=8))

Sampling runs `s2d_cli.engines.decode.sample` (one prefill per prompt shared by its n samples, a
straight-line decode step for Llama-family models, finished rows dropped from the batch). The
`decoder="generate"` option runs transformers' `model.generate` instead (the reference the tests
compare against); there log-probabilities are taken from the raw logits (before temperature / top-p /
top-k), log_softmax in float32, one decoding step at a time: a logits processor that runs first in
generate's list sees each step's raw logits, keeps that step's top-K, and holds the step's [B, V]
log-probs only until the next step shows which token was drawn. (`output_logits=True` would keep a float32 [B, V] copy of every step,
i.e. the [B, T, V] tensor that a long rollout with a 150k vocabulary cannot afford.)

Completion token ids follow vLLM: they end with the eos / stop token when one was emitted
(finish_reason "stop"), and never contain padding.

Left out on purpose: beam search, stop strings (stop token ids only), speculative decoding.
"""
from __future__ import annotations

import contextlib
import gc
import os
import random
from collections.abc import Iterable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..models import load_model, load_tokenizer
from . import Completion, SamplingConfig


def _eos_ids(tokenizer, model) -> list[int]:
    """The tokenizer's eos plus any the model's generation config declares (Qwen3 lists two)."""
    ids = []
    for value in (tokenizer.eos_token_id if tokenizer is not None else None,
                  model.generation_config.eos_token_id, model.config.eos_token_id):
        for i in ([value] if isinstance(value, int) else (value or [])):
            if i not in ids:
                ids.append(i)
    if not ids:
        raise ValueError("HFEngine: neither the tokenizer nor the model config defines an eos token")
    return ids


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's generator for `device` inside, and give the caller's RNG state back afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class _StepLogprobs(LogitsProcessor):
    """Records, per decoding step, the drawn token's raw logprob and the raw top-K.

    generate calls this once per new token with the ids so far and that step's raw logits; the token
    drawn at step t only shows up as input_ids[:, -1] at step t+1, so its logprob is gathered then
    (and for the last step by `finish`). Returns the scores untouched.
    """

    def __init__(self, topk: int):
        self.topk = topk
        self.sampled_logprobs: list[torch.Tensor] = []      # T x [B]
        self.topk_ids: list[torch.Tensor] = []              # T x [B, K]
        self.topk_logprobs: list[torch.Tensor] = []         # T x [B, K]
        self._pending_BV: torch.Tensor | None = None        # last step's log-probs, token not yet known

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending_BV is not None:
            self.finish(input_ids[:, -1])
        logprobs_BV = torch.log_softmax(scores.float(), dim=-1)
        if self.topk > 0:
            values_BK, ids_BK = logprobs_BV.topk(self.topk, dim=-1)
            self.topk_ids.append(ids_BK)
            self.topk_logprobs.append(values_BK)
        self._pending_BV = logprobs_BV
        return scores

    def finish(self, token_B: torch.Tensor) -> None:
        if self._pending_BV is not None:
            token_B1 = token_B.to(self._pending_BV.device)[:, None]
            self.sampled_logprobs.append(self._pending_BV.gather(-1, token_B1)[:, 0])
            self._pending_BV = None


class HFEngine:
    """`Engine` on transformers. See the module docstring.

    model: a checkpoint path / hub id, or an already loaded `PreTrainedModel`. A loaded model (a
        trainer's live policy) is used as is, on its own device and dtype, and its weights are shared
        with the trainer, so `update_weights` has nothing to do.
    tokenizer: a tokenizer, a path, or None to load it from the model's path.
    seed: seeds calls whose `SamplingConfig.seed` is None (a per-engine stream, different each call).
        `SamplingConfig.prompt_seeds` makes every completion a function of its own seed instead (the
        batch it shares does not matter; the "generate" decoder then runs one row per call).
    batch_size: sequences (prompts x n) decoded together.
    decoder: "auto" (`decode.sample`: the fast step where the architecture allows it, replayed as a
        CUDA graph on a GPU), "static" (the fast step with fixed shapes, also off a GPU: what the CPU
        tests check), "loop" (`decode.sample` on the model's own forward) or "generate" (transformers'
        `model.generate`).
    lockstep: every decode runs its full max_new_tokens steps (`decode.sample`): a model sharded over
        processes (FSDP) joins a collective in every forward, so all processes must make the same number.
    """

    name = "hf"

    def __init__(self, model, *, tokenizer=None, seed: int = 0, dtype="auto", trust_remote_code: bool = False,
                 batch_size: int = 64, device=None, decoder: str = "auto", lockstep: bool = False):
        if decoder not in ("auto", "static", "loop", "generate"):
            raise ValueError(f"HFEngine: decoder must be auto, static, loop or generate, got {decoder!r}")
        self.decoder = decoder
        if isinstance(model, torch.nn.Module):
            self.model = model
            self.shares_weights = True
            self.device = next(model.parameters()).device
            source = getattr(model, "name_or_path", None) or model.config._name_or_path
        else:
            self.model = load_model(str(model), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            self.model.requires_grad_(False)
            self.device = next(self.model.parameters()).device
            self.shares_weights = False
            source = model
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(str(tokenizer or source), trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer
        self.eos_ids = _eos_ids(tokenizer, self.model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.batch_size = batch_size
        self.lockstep = lockstep
        self._seeds = random.Random(seed)

    # -- sampling -------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFEngine.generate: every prompt needs at least one token")
        if sampling.prompt_seeds is not None and len(sampling.prompt_seeds) != len(prompts):
            raise ValueError(f"HFEngine.generate: {len(sampling.prompt_seeds)} prompt seeds for {len(prompts)} prompts")
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        seed = sampling.seed if sampling.seed is not None else self._seeds.getrandbits(63)
        stop_ids = self.eos_ids + [i for i in sampling.stop_token_ids if i not in self.eos_ids]

        was_training = self.model.training
        self.model.eval()
        if self.decoder != "generate":
            try:
                self._sample(prompts, sampling, stop_ids, seed, results)
            finally:
                self.model.train(was_training)
            return results
        # One row per (prompt, sample); rows sorted by prompt length so a batch carries little padding.
        rows = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        rows.sort(key=lambda row: len(prompts[row[0]]))
        # generate() fills every setting we leave unset from model.generation_config (a checkpoint's
        # top_k=20, repetition_penalty, ...); swap in a blank one so only `config` below applies.
        model_generation_config = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        try:
            if sampling.prompt_seeds is not None:
                # generate() draws a batch from one generator: a per-row seed needs a call of its own per row
                with torch.inference_mode():
                    for i, j in rows:
                        with _seeded(sampling.prompt_seeds[i] + j, self.device):
                            results[i][j] = self._generate_batch([prompts[i]], sampling, stop_ids)[0]
                return results
            with torch.inference_mode(), _seeded(seed, self.device):
                for start in range(0, len(rows), self.batch_size):
                    batch = rows[start:start + self.batch_size]
                    completions = self._generate_batch([prompts[i] for i, _ in batch], sampling, stop_ids)
                    for (i, j), completion in zip(batch, completions):
                        results[i][j] = completion
        finally:
            self.model.generation_config = model_generation_config
            self.model.train(was_training)
        return results

    def _sample(self, prompts, sampling: SamplingConfig, stop_ids: list[int], seed: int, results) -> None:
        """`decode.sample` over batches of whole groups (prompts sorted by length, n samples each; a
        group larger than the batch is split into several calls)."""
        from .decode import sample

        generator = torch.Generator(self.device).manual_seed(seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        n = sampling.n
        if n <= self.batch_size:
            per = max(1, self.batch_size // n)
            calls = [(order[k:k + per], n, 0) for k in range(0, len(order), per)]
        else:
            calls = [([i], min(self.batch_size, n - j), j) for i in order for j in range(0, n, self.batch_size)]
        fast = False if self.decoder == "loop" else None
        static = True if self.decoder == "static" else None
        keyed = sampling.prompt_seeds
        for idx, count, first in calls:
            row_seeds = None if keyed is None else [keyed[i] + j for i in idx for j in range(first, first + count)]
            rows = sample(self.model, [prompts[i] for i in idx], n=count, max_new_tokens=sampling.max_new_tokens,
                          stop_ids=stop_ids, pad_id=self.pad_id, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k, logprobs=sampling.logprobs,
                          topk=sampling.topk, generator=generator, row_seeds=row_seeds, fast=fast, static=static,
                          lockstep=self.lockstep)
            for r, row in enumerate(rows):
                completion = Completion(text=self.tokenizer.decode(row.token_ids, skip_special_tokens=True),
                                        token_ids=row.token_ids, finish_reason=row.finish_reason,
                                        logprobs=row.logprobs if sampling.logprobs else None)
                if sampling.topk > 0:
                    completion.topk_ids, completion.topk_logprobs = row.topk_ids, row.topk_logprobs
                results[idx[r // count]][first + r % count] = completion

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig,
                        stop_ids: list[int]) -> list[Completion]:
        batch_size, prompt_len = len(prompts), max(len(p) for p in prompts)
        input_ids_BL = torch.full((batch_size, prompt_len), self.pad_id, dtype=torch.long)
        attention_mask_BL = torch.zeros((batch_size, prompt_len), dtype=torch.long)
        for b, prompt in enumerate(prompts):                    # left padding
            input_ids_BL[b, prompt_len - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask_BL[b, prompt_len - len(prompt):] = 1

        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, num_return_sequences=1,
                                  eos_token_id=stop_ids, pad_token_id=self.pad_id, do_sample=False)
        if sampling.temperature > 0:
            config.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=max(sampling.top_k, 0))          # 0 disables top-k (generate's default is 50)
        want_logprobs = sampling.logprobs or sampling.topk > 0
        recorder = _StepLogprobs(sampling.topk)
        sequences_BS = self.model.generate(
            input_ids=input_ids_BL.to(self.device), attention_mask=attention_mask_BL.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]) if want_logprobs else None,
        )
        new_BT = sequences_BS[:, prompt_len:].cpu()
        if want_logprobs:
            recorder.finish(sequences_BS[:, -1])
            sampled_BT = torch.stack(recorder.sampled_logprobs, dim=1).cpu() if sampling.logprobs else None
            if sampling.topk > 0:
                topk_ids_BTK = torch.stack(recorder.topk_ids, dim=1).cpu()
                topk_logprobs_BTK = torch.stack(recorder.topk_logprobs, dim=1).cpu()

        stop_set = set(stop_ids)
        completions = []
        for b in range(batch_size):
            token_ids = new_BT[b].tolist()
            # Rows that stopped early are padded to the batch's length; cut after the first stop token.
            end = next((t + 1 for t, tok in enumerate(token_ids) if tok in stop_set), None)
            finish_reason = "stop" if end is not None else "length"
            token_ids = token_ids[:end] if end is not None else token_ids
            completion = Completion(
                text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                token_ids=token_ids, finish_reason=finish_reason)
            n = len(token_ids)
            if sampling.logprobs:
                completion.logprobs = sampled_BT[b, :n].tolist()
            if sampling.topk > 0:
                completion.topk_ids = topk_ids_BTK[b, :n].tolist()
                completion.topk_logprobs = topk_logprobs_BTK[b, :n].tolist()
            completions.append(completion)
        return completions

    # -- weights --------------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model. A no-op when the engine wraps a trainer's live model:
        it already samples from the trainer's current weights."""
        if self.shares_weights:
            return
        state = self.model.state_dict()          # views of the parameters; tied names share storage
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise KeyError(f"HFEngine.update_weights: the model has no parameter {name!r}")
                state[name].copy_(tensor)

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
