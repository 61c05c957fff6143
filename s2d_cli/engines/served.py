"""Rollouts from an `s2d rollout-server` (a vLLM engine on other GPUs or another node): the client side.

    engine = ServedEngine("http://rollouts:8100", timeout=600, retries=3, weight_backend="auto")
    groups = engine.generate(prompt_ids, SamplingConfig(n=8, prompt_seeds=seeds, logprobs=True))
    engine.update_weights(full_tensors(lm))      # every process calls it; the main process sends

Every process of a run sends its own share of prompts (with their per-prompt seeds, so the completions
are the colocated engine's). Weights go only from the main process (rank 0), which hosts a weight group
of its own (`weight_group`) that the server joins on the first push: gloo through host memory (two
members, the server's main process hands the tensors to its engine), or NCCL GPU to GPU (the server's
engine workers join it themselves), NCCL by default when the trainer's tensors and the server's engine
are both on CUDA. A push tells the server every tensor's name, dtype and shape first (`full_tensors`
knows them from the state dict's metadata, nothing gathered), then gathers and sends one tensor at a time:
no process ever stages the model, on a GPU or in host memory; the peak is one tensor. The other processes
iterate the same tensors (under FSDP gathering each is a collective) and wait at a barrier, so no process
asks for rollouts before the server has the new weights queued.

The server is an untrusted peer: HTTP errors, timeouts and refused connections are retried with backoff
`retries` times, then one `UsageError` naming the URL (exit 2; rerunning the command resumes the run from
its last checkpoint). Its answers are checked for shape (one group of n per prompt, integer ids within the
vocabulary, one finite log-prob <= 0 per token).
"""
from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict

import torch

from ..errors import UsageError
from ..served_teacher import ServedTeacher, ServerError
from . import Completion, SamplingConfig, vllm_available
from .weight_group import BACKENDS, DTYPES
from .weight_sync import with_specs


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ServedEngine:
    name = "vllm"      # sampled by vLLM: the trainer treats it as it treats a colocated engine

    def __init__(self, url: str, *, tokenizer=None, vocab: int | None = None, timeout: float = 600.0,
                 retries: int = 3, weight_timeout: float = 600.0, weight_backend: str = "auto"):
        if not str(url).startswith(("http://", "https://")):
            raise UsageError(f"rollout_server: expected http://host:port, got {url!r}")
        self.url = str(url).rstrip("/")
        self.tokenizer, self.vocab, self.weight_timeout = tokenizer, vocab, weight_timeout
        # the served teacher's HTTP exchange (JSON, bounded time, one-line errors); our own retry loop
        self._http = ServedTeacher.__new__(ServedTeacher)
        self._http.root, self._http.url, self._http.timeout = self.url, self.url, timeout
        self._http._headers = {"Content-Type": "application/json"}
        self.retries = retries
        self.group = None
        self.rank = torch.distributed.get_rank() if _distributed() else 0
        if weight_backend not in BACKENDS:
            raise UsageError(f"weight_backend: expected one of {', '.join(BACKENDS)}, got {weight_backend!r}")
        self.weight_backend = weight_backend
        health = self._call("/health", None)
        self.tied_embeddings = bool(health.get("tied_embeddings"))
        # where the server's engine runs and how many workers it has (a server of an older s2d says neither)
        self.server_device = str(health.get("device", "cpu"))
        workers = health.get("workers", 1)
        self.server_workers = workers if type(workers) is int and 1 <= workers <= 4096 else 1

    def _call(self, path: str, body: dict | None, check=lambda answer: answer):
        for attempt in range(self.retries + 1):
            try:
                answer = self._http._exchange(path, body)
                if not isinstance(answer, dict):
                    raise ServerError(f"{path}: expected a JSON object")
                return check(answer)
            except ServerError as e:
                if not e.retry or attempt == self.retries:
                    tries = f" (after {attempt + 1} tries)" if attempt else ""
                    raise UsageError(f"rollout server {self.url}: {e}{tries}") from None
                time.sleep(min(2.0 ** attempt, 30.0))

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        def check(answer):
            groups = answer.get("groups")
            if not isinstance(groups, list) or len(groups) != len(prompts):
                raise ServerError(f"/generate: expected {len(prompts)} groups")
            return [[self._completion(c, sampling) for c in self._group(g, sampling.n)] for g in groups]

        return self._call("/generate", {"prompts": prompts, "sampling": asdict(sampling)}, check)

    @staticmethod
    def _group(group, n: int) -> list:
        if not isinstance(group, list) or len(group) != n:
            raise ServerError(f"/generate: expected {n} completions per prompt")
        return group

    def _completion(self, c, sampling: SamplingConfig) -> Completion:
        ids = c.get("token_ids") if isinstance(c, dict) else None
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < (self.vocab or 1 << 62) for t in ids) \
                or len(ids) > sampling.max_new_tokens or c.get("finish_reason") not in ("stop", "length"):
            raise ServerError("/generate: a completion without valid token ids and finish reason")
        lps = c.get("logprobs")
        if sampling.logprobs and (not isinstance(lps, list) or len(lps) != len(ids) or not all(
                isinstance(x, (int, float)) and math.isfinite(x) and x <= 1e-6 for x in lps)):
            raise ServerError("/generate: a completion whose log-probs are not one finite number <= 0 per token")
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else str(c.get("text", ""))
        return Completion(text=text, token_ids=ids, finish_reason=c["finish_reason"],
                          logprobs=[float(x) for x in lps] if sampling.logprobs else None,
                          topk_ids=c.get("topk_ids") if sampling.topk else None,
                          topk_logprobs=c.get("topk_logprobs") if sampling.topk else None)

    def sleep(self) -> None:
        """The server's GPUs are its own: nothing to free."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.rank != 0:
            for _ in named_tensors:      # the gathers are collectives: keep in step with the main process
                pass
            torch.distributed.barrier()
            return
        specs, device, named_tensors = with_specs(named_tensors)
        for spec in specs:
            if str(spec.dtype).removeprefix("torch.") not in DTYPES:
                raise UsageError(f"rollout server {self.url}: cannot send {spec.name} as {spec.dtype} "
                                 f"(expected one of {', '.join(DTYPES)})")
        self._connect(device)
        self._call("/weights", {"tensors": [[s.name, str(s.dtype).removeprefix("torch."), list(s.shape)] for s in specs]})
        sent = 0
        try:
            # a plain loop, and `del`: the tensor just sent is unreferenced before the next one is gathered
            # (zip/enumerate would keep the last pair alive through the next gather)
            for name, tensor in named_tensors:
                spec = specs[sent] if sent < len(specs) else None
                if spec is None or (name, tensor.dtype, tuple(tensor.shape)) != tuple(spec):
                    raise UsageError(f"rollout server {self.url}: tensor {sent} ({name}) is not the one announced "
                                     f"({spec.name if spec else 'none'})")
                self.group.broadcast(tensor.detach().to(self.group.device).contiguous())
                del tensor
                sent += 1
            self.group.sync()
        except RuntimeError as e:
            raise UsageError(f"rollout server {self.url}: the weight push broke off ({str(e).splitlines()[0][:160]})") from None
        if sent != len(specs):
            raise UsageError(f"rollout server {self.url}: announced {len(specs)} tensors, sent {sent}")
        if _distributed():
            torch.distributed.barrier()

    def _connect(self, device: torch.device) -> None:
        """Host the weight group on a free port of the address the server reaches us by, and have the server
        (gloo: its main process; NCCL: each of its engine workers) join it."""
        if self.group is not None:
            return
        import threading
        from urllib.parse import urlsplit

        from .weight_group import NcclWeightGroup, WeightGroup, choose_backend, group_size

        backend = choose_backend(self.weight_backend, trainer_device=device.type, server_device=self.server_device)
        if backend == "nccl" and self.weight_backend == "auto" and not vllm_available():
            backend = "gloo"            # vLLM's communicator is not installed here: auto settles for gloo
        if backend == "nccl" and device.type != "cuda" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        world = group_size(backend, self.server_workers)
        parts = urlsplit(self.url)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:   # our address on the route to the server
            probe.connect((parts.hostname, parts.port or 80))
            host = probe.getsockname()[0]
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        joined: dict = {}

        def join():
            try:
                joined["group"] = WeightGroup.host((host, port), timeout=self.weight_timeout) if backend == "gloo" else \
                    NcclWeightGroup((host, port), rank=0, world_size=world, device=device, timeout=self.weight_timeout)
            except Exception as e:      # reported below, in one line
                joined["error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__

        t = threading.Thread(target=join, daemon=True)
        t.start()                       # the store listens before the server is told to connect
        self._call("/weights/group", {"host": host, "port": port, "timeout": self.weight_timeout,
                                      "backend": backend, "world_size": world})
        t.join(self.weight_timeout)
        if "group" not in joined:
            why = joined.get("error") or f"did not join within {self.weight_timeout:g} s"
            raise UsageError(f"rollout server {self.url}: {backend} weight group on {host}:{port} ({world} members): {why}")
        self.group = joined["group"]

    def close(self) -> None:
        self.group = None
