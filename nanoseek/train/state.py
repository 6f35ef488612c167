"""Trainer checkpoints: an HF-format model folder (weights + config + tokenizer) plus the trainer state
(optimizer, step, data position, RNG) in its `trainer_state/` subfolder, written to `step-NNNNNN.tmp` and renamed to `step-NNNNNN` only
when complete, so a killed run always leaves the last complete checkpoint loadable. No pickle: tensors
go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save_pretrained

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: str, step: int, model, optimizer, trainer_state: dict, tokenizer=None,
                    keep: int = 2) -> str:
    """Write checkpoint `root/step-{step}` atomically and prune all but the newest `keep`."""
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_pretrained(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    state_dir = os.path.join(tmp, "trainer_state")
    os.makedirs(state_dir)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, os.path.join(state_dir, "optimizer.safetensors"))
    save_file({"torch_cpu": torch.get_rng_state()}, os.path.join(state_dir, "rng.safetensors"))
    with open(os.path.join(state_dir, "trainer_state.json"), "w") as f:
        json.dump({**trainer_state, "step": step, "optimizer": opt_meta}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_dir(model, tokenizer, path: str) -> str:
    """Write an HF-format model folder with its tokenizer to `path` (a temp folder renamed over it)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    tokenizer.save(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints, oldest first (an interrupted `.tmp` folder never counts)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))
             and os.path.isfile(os.path.join(root, d, "trainer_state", "trainer_state.json"))]
    return [os.path.join(root, d) for _, d in sorted(found)]


def load_trainer_state(path: str, optimizer) -> dict:
    """Restore optimizer and RNG from checkpoint folder `path`; returns the trainer state dict."""
    state_dir = os.path.join(path, "trainer_state")
    with open(os.path.join(state_dir, "trainer_state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(state_dir, "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer")))
    torch.set_rng_state(load_file(os.path.join(state_dir, "rng.safetensors"))["torch_cpu"])
    return state
