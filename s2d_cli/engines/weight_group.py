"""The trainer -> rollout-server weight channel: a two-member torch.distributed group of its own.

    group = WeightGroup.host(("0.0.0.0", port), timeout=600)        # trainer's main process: rank 0
    group = WeightGroup.join(("trainer-host", port), timeout=600)   # the server: rank 1
    group.broadcast(tensor)                                         # rank 0 sends, rank 1 receives in place

The group is a gloo `ProcessGroup` built on its own `TCPStore`, never the default group: the trainer's
`accelerate launch` processes have theirs, the server has none, and neither may be disturbed (vLLM's
`StatelessProcessGroup` exists for the same reason). Tensors travel on the CPU over TCP, one at a time.
"""
from __future__ import annotations

import datetime

import torch


class WeightGroup:
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
