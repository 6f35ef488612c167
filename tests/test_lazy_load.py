"""Lazy, memory-mapped checkpoint loading (nanoseek/checkpoint.py): each tensor is copied once from the
mapping into its own memory in the target dtype, odd layouts the format allows still load, routed experts are
checked one by one, the progress bar, and (slow) the peak resident memory of a load against the model's size."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import nanoseek
from nanoseek import CheckpointError

FILE = "model.safetensors"


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("lazy")
    nanoseek.save_pretrained(tiny_model, path)
    return path


def _same_weights(model, reference, dtype) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k, t in want.items():
        expect = t if k.endswith("e_score_correction_bias") else t.to(dtype)  # the router bias stays fp32
        assert got[k].dtype == expect.dtype and torch.equal(got[k], expect), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_load_converts_into_the_target_dtype(saved, tiny_model, dtype):
    _same_weights(nanoseek.from_pretrained(saved, dtype=dtype), tiny_model, dtype)


def test_the_model_owns_its_memory(saved, tiny_model, copy_dir):
    """Rewriting the file in place after the load changes nothing: no parameter is a view of the mapping."""
    d = copy_dir(saved)
    model = nanoseek.from_pretrained(d)
    path = os.path.join(d, FILE)
    with open(path, "r+b") as f:
        header = 8 + struct.unpack("<Q", f.read(8))[0]
        f.seek(header)
        f.write(bytes(os.path.getsize(path) - header))  # every weight byte zeroed, same inode
    _same_weights(model, tiny_model, torch.float32)


def test_data_that_is_not_element_aligned_loads(saved, tiny_model, copy_dir):
    """The format does not require the header to be padded to 8 bytes; then no tensor is aligned for a view."""
    d = copy_dir(saved)
    path = os.path.join(d, FILE)
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header, data = f.read(size).rstrip(b" "), f.read()
    header += b" " * ((2 - (8 + len(header))) % 4)  # data starts 2 bytes past a 4-byte boundary
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    assert (8 + len(header)) % 4 == 2
    _same_weights(nanoseek.from_pretrained(d), tiny_model, torch.float32)


def test_non_finite_routed_expert_is_named(saved, copy_dir):
    d = copy_dir(saved)
    tensors = load_file(os.path.join(d, FILE))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    tensors[name][2, 5] = float("inf")
    save_file(tensors, os.path.join(d, FILE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} in .*model[.]safetensors holds 0 NaN "
                                              r"and 1 Inf"):
        nanoseek.from_pretrained(d)
    model = nanoseek.from_pretrained(d, allow_non_finite=True)
    assert torch.isinf(model.model.layers[1].mlp.experts.gate_up_proj).sum() == 1


def test_progress_bar_counts_bytes(saved, capsys):
    nanoseek.from_pretrained(saved)  # small: quiet by default
    assert capsys.readouterr().err == ""
    nanoseek.from_pretrained(saved, progress=True)
    err = capsys.readouterr().err
    path = os.path.join(saved, FILE)
    with open(path, "rb") as f:
        data = os.path.getsize(path) - 8 - struct.unpack("<Q", f.read(8))[0]  # the tensors' bytes
    total = tqdm.format_sizeof(data, divisor=1024)
    assert f"loading {os.path.basename(saved)}: 100%" in err and f"{total}/{total}" in err and "B/s" in err, err


_MEASURE = textwrap.dedent("""
    import json, sys, torch, nanoseek
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    nanoseek.from_pretrained(sys.argv[2])  # warm-up: lazy imports and torch's first kernels are not the load's
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    model = nanoseek.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"added": status("VmHWM") - base, "model": size}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_of_a_load_stays_near_the_model_size(saved, tmp_path):
    """A ~100 MB fp32 checkpoint into bf16: the load's peak RSS is about the 50 MB bf16 model, not model + file
    (benchmarks/bench_load_memory.py has the full figures)."""
    cfg = nanoseek.ModelConfig.preset("small", vocab_size=16000, n_routed_experts=32)
    nanoseek.save_pretrained(nanoseek.build_model(cfg, seed=0), tmp_path, max_shard_bytes=30 << 20)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), str(saved)], check=True,
                         capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["model"] > 40 << 20
    assert r["added"] < 1.15 * r["model"], r
