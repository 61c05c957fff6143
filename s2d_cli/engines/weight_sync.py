"""The trainer's weights, whole, one tensor at a time: what a rollout engine is sent after an update.

    engine.update_weights(full_tensors(lm))       # every process of the run calls it, in step

Under DDP every process already holds whole tensors. Under FSDP2 (`torch.distributed.fsdp.fully_shard`)
a parameter is a DTensor holding this rank's shard: `full_tensor()` all-gathers that one tensor (a
collective: every rank iterates the same names in the same order), the engine copies it, and it is
dropped before the next one is gathered, so no process ever holds a second whole model -- the peak is the
largest single tensor (the embedding). The names are the model's own HF names (`fully_shard` keeps them),
tied embeddings included: the engine sends the head itself when the model ties it.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


def full_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for each entry of `module.state_dict()`, gathered one at a time."""
    from torch.distributed.tensor import DTensor

    for name, tensor in module.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()
