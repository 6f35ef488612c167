"""The process a run computes in: its device, its rank, its random generators and CPU threads.

Under torchrun (LOCAL_RANK, RANK and WORLD_SIZE set) every process takes the accelerator of its local rank and
only rank 0 writes files; a single process is rank 0 of a world of one. torch.distributed is consulted only
when a process group has been initialised, so nothing here needs one.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def local_device(device: torch.device | str | None = None) -> torch.device:
    """The device this process computes on. None: the local rank's GPU when one is visible, else the CPU.
    "cuda" without an index also means the local rank's GPU (LOCAL_RANK, 0 outside torchrun)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but torch sees no CUDA GPU")
        torch.cuda.set_device(device)
    return device


def rank() -> int:
    """This process's global rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0: the process that writes checkpoints, metrics and progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every accelerator), numpy's and Python's global generators. nanoseek's own
    randomness uses generators of its own; this covers user code (reward functions, data hooks) too."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def set_threads(threads: int) -> None:
    """torch's CPU threads (0 keeps torch's default, one per core)."""
    if threads:
        torch.set_num_threads(threads)
