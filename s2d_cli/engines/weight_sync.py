"""The trainer's weights, whole, one tensor at a time: what a rollout engine is sent after an update.

    weights = full_tensors(lm)                    # every process of the run calls it, in step
    weights.specs                                 # [TensorSpec(name, dtype, shape)], nothing gathered yet
    engine.update_weights(weights)                # iterating gathers one tensor at a time

Under DDP every process already holds whole tensors. Under FSDP2 (`torch.distributed.fsdp.fully_shard`)
a parameter is a DTensor holding this rank's shard: `full_tensor()` all-gathers that one tensor (a
collective: every rank iterates the same names in the same order), the engine copies it, and it is
dropped before the next one is gathered, so no process ever holds a second whole model -- the peak is the
largest single tensor (the embedding). The names are the model's own HF names (`fully_shard` keeps them),
tied embeddings included: the engine sends the head itself when the model ties it.

The list of names, dtypes and shapes comes from the state dict's metadata (a DTensor's `.shape` and
`.dtype` are the whole tensor's), so a receiver that must be told what is coming before it arrives (a
rollout server, `engines.served`) is told without gathering anything first.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch


class TensorSpec(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class FullTensors:
    """(name, whole tensor) pairs of a state dict, gathered one at a time as they are iterated; `specs`
    and `device` are known before any is. Iterable more than once (each pass gathers again)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state
        self.specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
        # where the gathered tensors will be (a DTensor's device is its shard's): cuda:k on a GPU trainer
        self.device = next(iter(state.values())).device if state else torch.device("cpu")

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.distributed.tensor import DTensor

        for name, tensor in self._state.items():      # rebinding `tensor` drops the last gathered one
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            yield name, tensor.detach()


def full_tensors(module: torch.nn.Module) -> FullTensors:
    """(name, whole tensor) for each entry of `module.state_dict()`, gathered one at a time."""
    return FullTensors(module.state_dict())


def with_specs(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[TensorSpec], torch.device,
                                                                          Iterable[tuple[str, torch.Tensor]]]:
    """(specs, device, the pairs to iterate): a `FullTensors` tells its specs without gathering; any other
    iterable (e.g. LoRA's merged blocks, which `lora.engine_weights` builds whole anyway) is listed first,
    its tensors as they are (no copies)."""
    if isinstance(named_tensors, FullTensors):
        return named_tensors.specs, named_tensors.device, named_tensors
    pairs = list(named_tensors)
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in pairs]
    return specs, pairs[0][1].device if pairs else torch.device("cpu"), pairs
