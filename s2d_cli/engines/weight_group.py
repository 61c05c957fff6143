"""The trainer -> rollout-server weight channel: a torch.distributed group of its own, gloo or NCCL.

    backend = choose_backend("auto", trainer_device="cuda", server_device="cuda")     # -> "nccl"
    group = WeightGroup.host(("10.0.0.5", port), timeout=600)        # gloo: the trainer's main process, rank 0
    group = WeightGroup.join(("10.0.0.5", port), timeout=600)        # gloo: the server's main process, rank 1
    group = NcclWeightGroup(("10.0.0.5", port), rank=0, world_size=3, device="cuda:0", timeout=600)  # trainer
    group = NcclWeightGroup(("10.0.0.5", port), rank=1 + worker, world_size=3, device=worker_device, ...)
    group.broadcast(tensor)                           # rank 0 sends, every other rank receives in place
    for name, tensor in receive(group, specs): ...    # a receiver: the tensors, one at a time, in order

Neither is the default group: the trainer's `accelerate launch` processes have theirs, the server has vLLM's,
and neither may be disturbed. The trainer (rank 0) hosts the rendezvous store on a free port in both.
- gloo (`WeightGroup`): two members, the trainer's main process and the server's; tensors travel through
  host memory over TCP, and the server pushes them into its engine (`VLLMEngine.update_weights`, which
  sends every tensor-parallel worker the whole tensor to take its shard from).
- NCCL (`NcclWeightGroup`): vLLM's `StatelessProcessGroup` (a TCPStore rendezvous outside
  torch.distributed's global state) and `PyNcclCommunicator`, as TRL's vLLM server mode builds it: the
  trainer plus every worker of the server's engine (world size = workers + 1, so a tensor-parallel server
  takes part whole), GPU to GPU. Each worker receives the whole tensor and its model's weight loaders keep
  the worker's shard (`_vllm_worker.WeightSyncExtension.s2d_receive_weights`). Needs vLLM on both sides.

`choose_backend`'s "auto": NCCL when the trainer's tensors and the server's engine are both on CUDA, gloo
otherwise (CPU trainers and servers, the CPU tests).
"""
from __future__ import annotations

import datetime
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "gloo", "nccl")
DTYPES = ("float32", "bfloat16", "float16")     # what may be sent, by torch's name without "torch."


def choose_backend(requested: str, *, trainer_device: str, server_device: str) -> str:
    """"gloo" or "nccl" for a push from tensors on `trainer_device` ("cuda", "cpu") to an engine on
    `server_device`. "auto": NCCL only when both are CUDA; an explicit choice is kept (NCCL without a GPU
    or without vLLM fails when the group is built, in one line)."""
    if requested not in BACKENDS:
        raise ValueError(f"weight_backend: expected one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "nccl" if trainer_device == "cuda" and server_device == "cuda" else "gloo"


def group_size(backend: str, server_workers: int) -> int:
    """Members of the group: the trainer's main process and, for gloo, the server's main process (which
    hands the tensors to its workers), for NCCL every worker of the server's engine."""
    return server_workers + 1 if backend == "nccl" else 2


def receive(group, specs: list[tuple[str, str, list[int]]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each (name, dtype, shape) of `specs`, received from rank 0 in that order into a
    fresh tensor on the group's device; nothing is held after it is yielded."""
    for name, dtype, shape in specs:
        yield name, group.broadcast(torch.empty(shape, dtype=getattr(torch, dtype), device=group.device))


class WeightGroup:
    """Two members over gloo: tensors on the CPU, one at a time."""
    backend, world_size, device = "gloo", 2, torch.device("cpu")

    def __init__(self, store, rank: int, timeout: float):
        self.rank = rank
        self.store = store      # kept alive: the master's store serves the rendezvous for the group's life
        self.pg = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("s2d-weights", store), rank, 2,
                                                     datetime.timedelta(seconds=timeout))

    @classmethod
    def host(cls, address: tuple[str, int], *, timeout: float) -> WeightGroup:
        store = torch.distributed.TCPStore(address[0], address[1], 2, is_master=True, wait_for_workers=False,
                                           timeout=datetime.timedelta(seconds=timeout))
        return cls(store, 0, timeout)

    @classmethod
    def join(cls, address: tuple[str, int], *, timeout: float) -> WeightGroup:
        store = torch.distributed.TCPStore(address[0], address[1], 2, is_master=False,
                                           timeout=datetime.timedelta(seconds=timeout))
        return cls(store, 1, timeout)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into rank 1's (same shape and dtype, CPU), in place."""
        self.pg.broadcast(tensor, 0).wait()
        return tensor

    def sync(self) -> None:
        """Every broadcast so far has completed (gloo's already have)."""


class NcclWeightGroup:
    """The trainer (rank 0) and the server's engine workers (ranks 1..W) over NCCL, through vLLM's
    `StatelessProcessGroup` + `PyNcclCommunicator`; tensors stay on the GPUs."""
    backend = "nccl"

    def __init__(self, address: tuple[str, int], *, rank: int, world_size: int, device, timeout: float):
        try:
            from vllm.distributed.device_communicators import pynccl
            from vllm.distributed.utils import StatelessProcessGroup
        except ImportError:
            raise RuntimeError("weight_backend nccl needs vLLM installed (its PyNcclCommunicator carries the "
                               "tensors); use weight_backend=gloo") from None
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.pg = StatelessProcessGroup.create(host=address[0], port=address[1], rank=rank, world_size=world_size,
                                               store_timeout=int(timeout))
        self.comm = pynccl.PyNcclCommunicator(self.pg, device=self.device)
        if getattr(self.comm, "disabled", True):   # vLLM disables it quietly where libnccl does not load
            raise RuntimeError(f"NCCL is unavailable on {self.device} (no CUDA or no libnccl); use weight_backend=gloo")

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every other rank's (same shape and dtype, on each one's device), in place;
        queued on the current stream (what reads it next on that stream sees it)."""
        self.comm.broadcast(tensor, src=0)
        return tensor

    def sync(self) -> None:
        """Wait for the queued broadcasts: the sender's tensors may be freed or changed afterwards."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
