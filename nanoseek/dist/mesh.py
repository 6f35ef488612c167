"""The parallel layout of a run: how many ways the model is pipelined, replicated, sharded and expert-split.

World = pp x dp_replicate x dp_shard ranks. Expert parallelism borrows its ranks from dp_shard (as
torchtitan's does): the ep ranks of a group hold different routed experts but are data-parallel for
everything else, and the dp_shard / ep ranks left over shard each expert shard further (FSDP). Every rank of
the dp_replicate x dp_shard "batch" group sees different rows of the global batch; the pp ranks of a
pipeline see the same rows.

Meshes (torch DeviceMesh, one call per process group shape):
- `mesh`: ("pp", "dp_replicate", "dp_shard") for FSDP2/HSDP of the dense parameters and the pipeline;
- `expert_mesh`: ("pp", "dp_replicate", "efsdp", "ep") over the same ranks, dp_shard split as efsdp x ep, for
  the routed experts (sharded over "ep", then FSDP over ("dp_replicate", "efsdp")).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ConfigError

PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")
SPLIT_BACKWARD = ("ZBVZeroBubble", "DualPipeV")  # input- and weight-gradient passes apart (zero-bubble style)


def torch_version() -> str:
    import torch
    return torch.__version__.split("+")[0]


@dataclass
class ParallelDims:
    """Degrees of parallelism, validated against the world size; a mistake names the flag.

    Attributes:
        world_size: processes in the run (torchrun's WORLD_SIZE).
        dp_shard: FSDP2 sharding degree (`--dp-shard`); -1: whatever the other degrees leave of the world.
        dp_replicate: replicated data parallelism over FSDP groups (HSDP, `--dp-replicate`).
        ep: expert parallelism (`--ep`), taken from dp_shard: it must divide dp_shard.
        pp: pipeline stages' ranks (`--pp`).
        pp_schedule: one of PP_SCHEDULES (`--pp-schedule`).
    """

    world_size: int
    dp_shard: int = -1
    dp_replicate: int = 1
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"

    def __post_init__(self):
        for flag, value in (("--dp-replicate", self.dp_replicate), ("--ep", self.ep), ("--pp", self.pp)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a positive int, got {value!r}")
        if self.dp_shard == -1:
            if self.world_size % (self.pp * self.dp_replicate):
                raise ConfigError(f"--pp {self.pp} x --dp-replicate {self.dp_replicate} does not divide the world "
                                  f"size {self.world_size}")
            self.dp_shard = self.world_size // (self.pp * self.dp_replicate)
        if not isinstance(self.dp_shard, int) or self.dp_shard < 1:
            raise ConfigError(f"--dp-shard must be a positive int or -1, got {self.dp_shard!r}")
        if self.pp * self.dp_replicate * self.dp_shard != self.world_size:
            raise ConfigError(f"--pp {self.pp} x --dp-replicate {self.dp_replicate} x --dp-shard {self.dp_shard} = "
                              f"{self.pp * self.dp_replicate * self.dp_shard} ranks, but the world has "
                              f"{self.world_size} (torchrun --nproc-per-node x --nnodes)")
        if self.dp_shard % self.ep:
            raise ConfigError(f"--ep {self.ep} must divide --dp-shard {self.dp_shard}: expert parallelism borrows "
                              "its ranks from the FSDP shards")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"--pp-schedule must be one of {PP_SCHEDULES}, got {self.pp_schedule!r}")
        if self.pp > 1 and self.pp_schedule in SPLIT_BACKWARD and self.dp > 1:
            # their weight-gradient pass differentiates the FSDP-sharded parameters, not the gathered ones the
            # forward used, and the gradients come out wrong (checked against a single process, torch 2.13)
            raise ConfigError(f"--pp-schedule {self.pp_schedule} splits the backward into input and weight passes, "
                              f"which torch {torch_version()} does not support with FSDP (--dp-shard/--dp-replicate "
                              f"{self.dp_shard}/{self.dp_replicate}): use it with --pp alone, or pick 1F1B or "
                              "Interleaved1F1B")

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different rows of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """FSDP degree of each expert shard."""
        return self.dp_shard // self.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pp rank holds: two for the V-shaped schedules, one otherwise."""
        return 2 if self.pp_schedule in ("ZBVZeroBubble", "DualPipeV", "Interleaved1F1B") and self.pp > 1 else 1

    def replace(self, **changes) -> "ParallelDims":
        return dataclasses.replace(self, **changes)


def build_meshes(dims: ParallelDims, device_type: str):
    """(mesh, expert_mesh) as described in the module docstring; needs an initialised process group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard),
                            mesh_dim_names=("pp", "dp_replicate", "dp_shard"))
    expert_mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.efsdp, dims.ep),
                                   mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
    return mesh, expert_mesh
