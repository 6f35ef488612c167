"""Training checkpoints: an HF-format model folder (weights + config + tokenizer) plus the trainer state
(optimizer, step, data position, every RNG) in its `trainer_state/` subfolder, written to `step-NNNNNN.tmp`
and renamed to `step-NNNNNN` only when complete, so a killed run always leaves the last complete checkpoint
loadable. No pickle: tensors go to safetensors, everything else to JSON.

The optimizer state is keyed by parameter name, in the layout of torch.distributed.checkpoint's
`get_optimizer_state_dict` ({"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}): a state that
does not depend on parameter order, so a sharded run can reshard it. Only rank 0 writes; the other ranks wait.

Resuming takes the newest checkpoint that can be loaded (`newest_resumable`): a complete folder whose files were
damaged later (a full disk, a copy cut short) is skipped with a warning naming it, and the one before it is used
(transformers' `get_last_checkpoint` hands over the newest unchecked). The check reads the JSON files and the
safetensors headers only; safetensors refuses a file shorter than its header says. Pruning (`keep`) counts only
checkpoints up to the step just written: one of a later step is a skipped one, which the run overwrites when it
gets there, and counting it could delete the good checkpoint the run resumed from. `.tmp` folders of interrupted
saves are removed when a run starts (`remove_stale_tmp`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, check_files, from_pretrained, save_pretrained
from ..config import ConfigError, ModelConfig
from ..files import atomic_write_text, read_json
from ..runtime import barrier, is_main_process

DCP_DIR = "dcp"  # a sharded run's tensors and optimizer state (nanoseek/dist/checkpoint.py)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-\d+\.tmp$")


def _modules(model) -> list:
    return model if isinstance(model, (list, tuple)) else [model]


def _param_ids(model, optimizer) -> dict[str, int]:
    """Parameter name -> the position torch's optimizer.state_dict() gives it (its order over param_groups).
    `model`: a module, or the list of this rank's modules (pipeline stages keep the full model's names)."""
    names = {p: n for module in _modules(model) for n, p in module.named_parameters()}
    return {names[p]: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}


def optimizer_state_by_name(model, optimizer) -> dict:
    """optimizer.state_dict() with parameter names for positions: {"state": {name: {...}}, "param_groups":
    [{..., "params": [names]}]}, the layout of torch.distributed.checkpoint.state_dict.get_optimizer_state_dict
    (whose helpers are not used here: on an optimizer without state they take a zero-gradient step, which would
    give every parameter a step count it never had)."""
    sd = optimizer.state_dict()
    name_of = {i: n for n, i in _param_ids(model, optimizer).items()}
    return {"state": {name_of[i]: state for i, state in sd["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state_by_name(model, optimizer, sd: dict) -> None:
    """The inverse of optimizer_state_by_name. Parameters the checkpoint names but this rank does not hold
    (other pipeline stages) are skipped; full state tensors of a sharded parameter are cut like it."""
    ids = _param_ids(model, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sd = {"state": {n: {k: _like(v, params[ids[n]]) for k, v in s.items()} for n, s in sd["state"].items() if n in ids},
          "param_groups": [{**g, "params": [n for n in g["params"] if n in ids]} for g in sd["param_groups"]]}
    missing = [n for n in ids if not any(n in g["params"] for g in sd["param_groups"])]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state lacks parameters of the model: {missing[:4]}")
    optimizer.load_state_dict({"state": {ids[n]: state for n, state in sd["state"].items()},
                               "param_groups": [{**g, "params": [ids[n] for n in g["params"]]}
                                                for g in sd["param_groups"]]})


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full (unsharded) state tensor placed like `param`: as is, or cut into param's DTensor shards."""
    if not hasattr(param, "device_mesh") or value.dim() == 0:
        return value
    from torch.distributed.tensor import DTensor, Replicate
    full = DTensor.from_local(value.to(param.device), param.device_mesh, [Replicate()] * param.device_mesh.ndim)
    return full.redistribute(param.device_mesh, param.placements)


def _flatten_optimizer(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer_state_by_name(model, optimizer)
    tensors = {f"{name}/{key}": value.detach().cpu().contiguous()
               for name, state in sd["state"].items() for key, value in state.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(model, optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    legacy = bool(meta["param_groups"]) and all(isinstance(i, int) for g in meta["param_groups"] for i in g["params"])
    for flat, value in tensors.items():
        # written before the state was keyed by name: "<position>.<key>", in the optimizer's own order
        name, key = flat.split(".", 1) if legacy else flat.rsplit("/", 1)
        state.setdefault(int(name) if legacy else name, {})[key] = value
    if legacy:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    else:
        load_optimizer_state_by_name(model, optimizer, {"state": state, "param_groups": meta["param_groups"]})


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(root: str, step: int, model, optimizer, trainer_state: dict, tokenizer=None,
                    keep: int = 2, sharded: list | None = None) -> str:
    """Write checkpoint `root/step-{step}` atomically and prune all but the newest `keep`: rank 0 writes it, or,
    with `sharded` (this rank's modules of a sharded run), every rank its shards into its dcp/ folder (a
    collective) and rank 0 the rest (config.json instead of the weights, tokenizer, trainer state)."""
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if sharded is not None:
        from ..dist.checkpoint import save_sharded
        barrier()
        save_sharded(os.path.join(tmp, DCP_DIR), sharded, optimizer)
    if is_main_process():
        if sharded is None:
            save_pretrained(model, tmp)
        else:
            atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(model.cfg.to_hf(), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        state_dir = os.path.join(tmp, "trainer_state")
        os.makedirs(state_dir)
        opt_meta = {}
        if sharded is None:
            opt_tensors, opt_meta = _flatten_optimizer(model, optimizer)
            save_file(opt_tensors, os.path.join(state_dir, "optimizer.safetensors"))
        save_file(_rng_state(next(model.parameters()).device), os.path.join(state_dir, "rng.safetensors"))
        with open(os.path.join(state_dir, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "step": step, "optimizer": opt_meta}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = [c for c in list_checkpoints(root) if _step_of(c) <= step]  # later ones: see the module docstring
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def save_model_dir(model, tokenizer, path: str) -> str:
    """Write an HF-format model folder with its tokenizer to `path` (rank 0; a temp folder renamed over it)."""
    if is_main_process():
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp)
        tokenizer.save(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()
    return path


def _step_of(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints, oldest first (an interrupted `.tmp` folder never counts)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))
             and os.path.isfile(os.path.join(root, d, "trainer_state", "trainer_state.json"))]
    return [os.path.join(root, d) for _, d in sorted(found)]


def checkpoint_problem(path: str) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from (a file missing, unreadable or cut short), or None.

    Reads config.json, the trainer and tokenizer JSON and every safetensors header, not the tensors.
    """
    try:
        state_dir = os.path.join(path, "trainer_state")
        read_trainer_json(path)
        if is_sharded_checkpoint(path):
            read_json(os.path.join(path, "config.json"), error=CheckpointError)
            files = [os.path.join(path, DCP_DIR, f) for f in os.listdir(os.path.join(path, DCP_DIR))
                     if f.endswith(".safetensors")]
            if not files:
                raise CheckpointError(f"{os.path.join(path, DCP_DIR)} holds no safetensors file")
        else:
            check_files(path)
            files = [os.path.join(state_dir, "optimizer.safetensors")]
        for file in files + [os.path.join(state_dir, "rng.safetensors")]:
            try:
                safe_open(file, framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        tokenizer = os.path.join(path, "tokenizer.json")
        if os.path.isfile(tokenizer):
            read_json(tokenizer, error=CheckpointError)
    except (CheckpointError, ConfigError, OSError) as e:
        return str(e)
    return None


def newest_resumable(root: str) -> str | None:
    """The newest complete checkpoint in `root` that can be resumed from; a warning names each newer one skipped
    and why. None when `root` holds no complete checkpoint; ValueError when it holds some but none loads (starting
    afresh there would overwrite their metrics)."""
    found = list_checkpoints(root)
    skipped = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in skipped:
                warnings.warn(f"resume: skipping checkpoint {bad}, it cannot be loaded ({why}); resuming from "
                              f"{path}", stacklevel=3)
            return path
        skipped.append((path, problem))
    if skipped:
        raise ValueError(f"resume: no checkpoint in {root} can be loaded: "
                         + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped))
    return None


def remove_stale_tmp(root: str) -> list[str]:
    """Delete the `step-NNNNNN.tmp` folders interrupted saves left in `root`; returns their paths."""
    stale = [os.path.join(root, d) for d in sorted(os.listdir(root)) if _TMP_DIR.match(d)] \
        if os.path.isdir(root) else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def read_trainer_json(path: str) -> dict:
    """trainer_state/trainer_state.json of checkpoint folder `path` (step, the command's own state, optimizer
    groups), without loading any tensor; CheckpointError naming the file when it is unreadable."""
    return read_json(os.path.join(path, "trainer_state", "trainer_state.json"), error=CheckpointError)


def load_trainer_state(path: str, model, optimizer) -> dict:
    """Restore optimizer and RNG state from checkpoint folder `path` (and, for a sharded checkpoint, the weights
    too: every rank reads its slices); returns the trainer state dict. `model`: a module or this rank's modules."""
    state_dir = os.path.join(path, "trainer_state")
    state = read_trainer_json(path)
    meta = state.pop("optimizer")
    if is_sharded_checkpoint(path):
        from ..dist.checkpoint import load_sharded
        load_sharded(os.path.join(path, DCP_DIR), _modules(model), optimizer,
                     no_dist=not torch.distributed.is_initialized())
    else:
        _load_optimizer(model, optimizer, load_file(os.path.join(state_dir, "optimizer.safetensors")), meta)
    rng = load_file(os.path.join(state_dir, "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    device = next(p for m in _modules(model) for p in m.parameters()).device
    if "torch_cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], device)
    return state


def is_sharded_checkpoint(path: str) -> bool:
    """Whether checkpoint folder `path` was written by a sharded run: its tensors and optimizer state in dcp/ (an
    HF export of the weights may sit beside them)."""
    return os.path.isdir(os.path.join(path, DCP_DIR))


def load_checkpoint_model(path: str, dtype: torch.dtype, device: torch.device):
    """The model of checkpoint folder `path` on `device`: loaded from its HF files, or, for a sharded checkpoint,
    built from its config.json (load_trainer_state then reads the tensors into whatever layout the run has)."""
    if not is_sharded_checkpoint(path):
        return from_pretrained(path, dtype=dtype, device=device)
    from ..model import build_model
    cfg = ModelConfig.from_hf(read_json(os.path.join(path, "config.json"), error=CheckpointError))
    return build_model(cfg, dtype=dtype, device=device)
