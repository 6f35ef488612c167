"""Checkpoints of sharded runs (FSDP2, expert or pipeline parallel) with torch.distributed.checkpoint.

Every rank writes its own shards through DCP's HuggingFace storage (safetensors, no pickle), consolidated into
full tensors under the parameters' names (the full model's: pipeline stages keep them); reading goes through
DCP too, which hands each rank the slices its own layout needs. So a checkpoint written on one mesh resumes
on any other, a single process included. Optimizer states travel the same way as `optimizer/<name>/<key>`.

The training run puts these tensors in the `dcp/` folder of a checkpoint, beside config.json, the tokenizer and
`trainer_state/` (nanoseek/train/state.py); `export_hf` turns them into an HF-format model folder.
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from ..runtime import barrier, is_main_process

def model_state(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers of this rank's modules under their full-model names."""
    state = {}
    for module in modules:
        state.update(module.state_dict())
    return state


def _named_parameters(modules: list[nn.Module]) -> dict[str, nn.Parameter]:
    return {name: p for module in modules for name, p in module.named_parameters()}


def save_sharded(target: str, modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Write the model and optimizer state of every rank into folder `target` (a collective: every rank calls it)."""
    state = model_state(modules)
    for name, p in _named_parameters(modules).items():
        for key, value in optimizer.state.get(p, {}).items():
            # 0-dim tensors (Adam's step) as 1-element ones: consolidation writes 0-dim tensors as zeros
            state[f"optimizer/{name}/{key}"] = value.reshape(1) if value.dim() == 0 else value
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(target, save_distributed=True, enable_consolidation=True))
    barrier()
    if is_main_process():
        shutil.rmtree(os.path.join(target, "sharded"), ignore_errors=True)  # consolidated: the shards are copies


def load_sharded(source: str, modules: list[nn.Module], optimizer: torch.optim.Optimizer | None,
                 no_dist: bool = False) -> None:
    """Read folder `source` (save_sharded's) into this rank's modules (and optimizer), whatever layout wrote it. Optimizer state is
    restored exactly for the parameters the checkpoint has it for; the others keep none, as in the run that
    wrote it."""
    reader = HuggingFaceStorageReader(source)
    saved = reader.read_metadata().state_dict_metadata
    state = model_state(modules)
    slots: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    if optimizer is not None:
        for name, p in _named_parameters(modules).items():
            keys = [k for k in saved if k.startswith(f"optimizer/{name}/")]
            for key in keys:
                shape = tuple(saved[key].size)
                like = torch.zeros_like(p) if shape == tuple(p.shape) else torch.zeros(shape, device=_local(p).device)
                slots.setdefault(p, {})[key.rsplit("/", 1)[1]] = like
                state[key] = like
    with warnings.catch_warnings():  # no_dist: DCP says it assumes a single process, which is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=no_dist)
    for p, values in slots.items():
        optimizer.state[p] = {k: v.reshape(()) if k == "step" else v for k, v in values.items()}


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def export_hf(source: str, out: str, model_cfg, tokenizer=None) -> str:
    """Rank 0: the model in `source` (save_sharded's folder) as an HF-format folder `out` (what nanoseek.from_pretrained
    and transformers load), built in one process on the CPU."""
    from ..checkpoint import save_pretrained
    from ..model import build_model

    if is_main_process():
        model = build_model(model_cfg)
        load_sharded(source, [model], None, no_dist=True)
        save_pretrained(model, out)
        if tokenizer is not None:
            tokenizer.save(out)
    barrier()
    return out
