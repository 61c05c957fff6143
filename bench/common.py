"""Helpers the bench scripts share (run from the repo root as `python bench/<script>.py`)."""
from __future__ import annotations

import resource
from pathlib import Path


def peak_bytes(device: str) -> int:
    """This process's peak memory: `torch.cuda.max_memory_allocated` on CUDA, max RSS on a CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name, so a reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def emit(lines: list[str], out: Path | None) -> str:
    """A bench script's markdown table: printed to stdout and, with `out`, written there atomically."""
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        write_atomic(out, table)
    return table
