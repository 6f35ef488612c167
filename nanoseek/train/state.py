"""Training checkpoints: an HF-format model folder (weights + config + tokenizer) plus the trainer state
(optimizer, step, data position, every RNG) in its `trainer_state/` subfolder, written to `step-NNNNNN.tmp`
and renamed to `step-NNNNNN` only when complete, so a killed run always leaves the last complete checkpoint
loadable. No pickle: tensors go to safetensors, everything else to JSON.

The optimizer state is keyed by parameter name, in the layout of torch.distributed.checkpoint's
`get_optimizer_state_dict` ({"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}): a state that
does not depend on parameter order, so a sharded run can reshard it. Only rank 0 writes; the other ranks wait.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save_pretrained
from ..runtime import barrier, is_main_process

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _param_ids(model, optimizer) -> dict[str, int]:
    """Parameter name -> the position torch's optimizer.state_dict() gives it (its order over param_groups)."""
    names = {p: n for n, p in model.named_parameters()}
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
    ids = _param_ids(model, optimizer)
    missing = [n for g in sd["param_groups"] for n in g["params"] if n not in ids]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state names parameters the model lacks: {missing[:4]}")
    optimizer.load_state_dict({"state": {ids[n]: state for n, state in sd["state"].items()},
                               "param_groups": [{**g, "params": [ids[n] for n in g["params"]]}
                                                for g in sd["param_groups"]]})


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
                    keep: int = 2) -> str:
    """Write checkpoint `root/step-{step}` atomically (rank 0) and prune all but the newest `keep`."""
    final = os.path.join(root, f"step-{step:06d}")
    if is_main_process():
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        state_dir = os.path.join(tmp, "trainer_state")
        os.makedirs(state_dir)
        opt_tensors, opt_meta = _flatten_optimizer(model, optimizer)
        save_file(opt_tensors, os.path.join(state_dir, "optimizer.safetensors"))
        save_file(_rng_state(next(model.parameters()).device), os.path.join(state_dir, "rng.safetensors"))
        with open(os.path.join(state_dir, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "step": step, "optimizer": opt_meta}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
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


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints, oldest first (an interrupted `.tmp` folder never counts)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))
             and os.path.isfile(os.path.join(root, d, "trainer_state", "trainer_state.json"))]
    return [os.path.join(root, d) for _, d in sorted(found)]


def load_trainer_state(path: str, model, optimizer) -> dict:
    """Restore optimizer and RNG state from checkpoint folder `path`; returns the trainer state dict."""
    state_dir = os.path.join(path, "trainer_state")
    with open(os.path.join(state_dir, "trainer_state.json")) as f:
        state = json.load(f)
    _load_optimizer(model, optimizer, load_file(os.path.join(state_dir, "optimizer.safetensors")),
                    state.pop("optimizer"))
    rng = load_file(os.path.join(state_dir, "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    device = next(model.parameters()).device
    if "torch_cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], device)
    return state
