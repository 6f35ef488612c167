"""HF-format checkpoints: load and save `config.json` + safetensors (single or sharded with
`model.safetensors.index.json`), including DeepSeek's FP8 checkpoints (docs/design/checkpoints.md, docs/design/mtp.md).

Name mapping between the module tree and the HF layout:
- routed experts are stacked in nanoseek (`mlp.experts.gate_up_proj` (E, 2I, D), `down_proj` (E, D, I))
  and stored per expert in HF (`mlp.experts.{e}.{gate,up,down}_proj.weight`);
- MTP module k is `mtp.{k}.*` here and `model.layers.{L+k}.*` in HF; its `embed_tokens` and
  `shared_head.head` are physical copies of the shared embedding and head, written on save and
  checked-then-dropped on load.
FP8 weights (float8_e4m3fn + fp32 `weight_scale_inv` 128x128 block scales) are dequantized on load.
No pickle: safetensors only. Writes go to a temporary file that is renamed into place.

Loading is lazy and memory-mapped, tensor by tensor: each shard is mapped (not read), each parameter is
allocated once in the target dtype on the target device and filled from a view of the mapping (the dtype
conversion happens in that copy), then the pages it came from are handed back to the kernel
(madvise MADV_DONTNEED). Routed experts are copied straight into their stacked tensor. Peak resident memory is
therefore the model in its target dtype plus about one tensor, not the model plus the files
(benchmarks/bench_load_memory.py measures it). A byte progress bar shows for checkpoints of 1 GiB and more.

A folder that cannot be loaded raises CheckpointError naming the file and, where there is one, the tensor:
unreadable JSON, a config.json that is not an object, an unknown torch_dtype, an index without a weight_map
or with an entry outside the folder (absolute or through ".."; symlinks inside it, as in the HF cache, are
followed), a safetensors file that is empty, cut short or not safetensors (its header does not match its
size). Weights holding NaN or Inf are refused too (`allow_non_finite=True` loads them): transformers and vLLM
load them silently, and such a model generates nothing or garbage with no hint why. The check is one
min/max pass per tensor as it is loaded.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
from collections import defaultdict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import ConfigError, ModelConfig
from .files import atomic, read_json
from .fp8 import block_dequantize, block_quantize
from .fp8.weights import keep_fp8_weights
from .model.transformer import Transformer

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_DTYPES = ("float32", "bfloat16", "float16", "float64")  # what a config's torch_dtype may name
_INDEX_FILE = "model.safetensors.index.json"
_PROGRESS_BYTES = 1 << 30  # checkpoints this big show a progress bar by default
_RELEASE_PAD = 1 << 20  # bytes released around each tensor read (_Shard.release)
# safetensors dtype names (the format's spec) -> torch; others are read through safetensors itself
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the file and, where there is one, the tensor."""


# ---- loading --------------------------------------------------------------------------------------

def _open_safetensors(file: str):
    """A safe_open handle; CheckpointError naming the file when it is missing, empty, cut short or not safetensors
    (safetensors compares the size its header declares with the file's)."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _read_config(path: str) -> tuple[dict, ModelConfig]:
    """config.json of folder `path`: (the HF dict, the ModelConfig); errors name the file."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"no config.json in {path}")
    hf_cfg = read_json(file, error=CheckpointError)
    try:
        return hf_cfg, ModelConfig.from_hf(hf_cfg)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    except (TypeError, AttributeError) as e:  # a field of the wrong JSON type, e.g. rope_scaling as a string
        raise CheckpointError(f"{file}: not a DeepSeek-V2/V3 config ({e})") from None


def _config_dtype(hf_cfg: dict, path: str) -> torch.dtype:
    """The parameter dtype config.json names (torch_dtype, or dtype as newer transformers write), float32 if none."""
    key = "torch_dtype" if hf_cfg.get("torch_dtype") else "dtype"
    name = hf_cfg.get(key) or "float32"
    if name not in _DTYPES:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {key} {name!r} is not one of {_DTYPES}")
    return getattr(torch, name)


def _weight_files(path: str) -> dict[str, str]:
    """tensor name -> file, from the index or from the safetensors files in the folder."""
    index = os.path.join(path, _INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_json(index, error=CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: needs a \"weight_map\" object of tensor name -> file name")
        for name, file in weight_map.items():
            norm = os.path.normpath(file)
            if os.path.isabs(file) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
                raise CheckpointError(f"{index}: tensor {name} points to {file!r}, outside the folder "
                                      "(entries must be file names relative to it)")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = (["model.safetensors"] if os.path.isfile(os.path.join(path, "model.safetensors")) else
             sorted(f for f in os.listdir(path) if f.endswith(".safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    names = {}
    for file in files:
        with _open_safetensors(os.path.join(path, file)) as f:
            names.update({k: os.path.join(path, file) for k in f.keys()})
    return names


def check_files(path: str | os.PathLike) -> None:
    """Raise CheckpointError when folder `path` cannot be loaded for a reason its files show without reading
    the tensors: config.json, the index and every safetensors header (a truncated file fails here)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder")
    hf_cfg, _ = _read_config(path)
    _config_dtype(hf_cfg, path)
    _Reader(_weight_files(path)).open_all()


class _Shard:
    """One safetensors file, memory-mapped: a tensor is a view of the mapping until it is copied out, after which
    `release` hands its pages back to the kernel (they stay in the page cache, out of this process's memory)."""

    def __init__(self, file: str):
        self.file = file
        self.handle = _open_safetensors(file)  # checks the header against the file's size; errors name the file
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(size))
            self.data_start = 8 + size
            # copy-on-write private mapping: writable for torch.frombuffer, never written back
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def nbytes(self, name: str) -> int:
        begin, end = self.header[name]["data_offsets"]
        return end - begin

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a view of the mapping (no copy; valid until released)."""
        entry = self.header[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            return self.handle.get_tensor(name)
        begin, end = entry["data_offsets"]
        offset, shape = self.data_start + begin, entry["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if offset % dtype.itemsize:  # torch needs element-aligned data: copy this (rare) tensor's bytes
            return torch.frombuffer(bytearray(self.map[offset:self.data_start + end]), dtype=dtype).reshape(shape)
        return torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=offset).reshape(shape)

    def release(self, name: str) -> None:
        """Drop tensor `name`'s pages, and _RELEASE_PAD bytes on each side, from this process's memory.

        The pad is there because a page fault maps the cached pages around the faulting one too (Linux's
        fault-around, 64 KiB by default): without it those neighbours stayed resident until the file was closed,
        which put the peak at 1.29x the model instead of 1.0x (benchmarks/bench_load_memory.py, bf16 -> bf16).
        Dropping pages of a mapping that is never written is always safe: a later read faults them in again."""
        begin, end = self.header[name]["data_offsets"]
        if not hasattr(mmap, "MADV_DONTNEED") or end == begin:
            return
        start = max(0, self.data_start + begin - _RELEASE_PAD) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = min(len(self.map), self.data_start + end + _RELEASE_PAD)
        self.map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes when it does
            pass


class _Reader:
    """Lazy tensor access across shards, with FP8 dequantization; errors name the tensor and its file."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._open: dict[str, _Shard] = {}

    def _shard(self, name: str) -> _Shard:
        file = self.files[name]
        if file not in self._open:
            if not os.path.isfile(file):
                raise CheckpointError(f"tensor {name}: shard {file} is missing")
            self._open[file] = _Shard(file)
        if name not in self._open[file].header:
            raise CheckpointError(f"tensor {name} in {file}: not in the file (its index says it is)")
        return self._open[file]

    def open_all(self) -> None:
        """Open every shard's header now (the first tensor of each file)."""
        first = {file: name for name, file in self.files.items()}
        for name in first.values():
            self._shard(name)

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()

    def nbytes(self, name: str, with_scale: bool = False) -> int:
        """Stored bytes of tensor `name` (with its FP8 scale when asked)."""
        scale = name + "_scale_inv"
        return self._shard(name).nbytes(name) + (self.nbytes(scale) if with_scale and scale in self.files else 0)

    def is_fp8(self, name: str) -> bool:
        """Whether tensor `name` is stored in FP8 (from the header)."""
        return self._shard(name).header[name]["dtype"].startswith("F8_")

    def shape(self, name: str) -> list[int]:
        """The stored shape, without reading the data."""
        return list(self._shard(name).header[name]["shape"])

    def _view(self, name: str) -> torch.Tensor:
        try:
            return self._shard(name).view(name)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"tensor {name} in {self.files[name]}: {e}") from None

    def load_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (its dtype and device chosen by the caller) with tensor `name`, dequantizing FP8 unless `out`
        is FP8 itself; the pages read are released afterwards."""
        t = self._view(name)
        try:
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and out.dtype != t.dtype:
                scale_name = name + "_scale_inv"
                if scale_name not in self.files:
                    raise CheckpointError(f"tensor {name} is FP8 but {scale_name} is missing")
                try:
                    out.copy_(block_dequantize(t, self._view(scale_name), dtype=out.dtype))
                except ValueError as e:
                    raise CheckpointError(f"tensor {name}: {e}") from None
                self._shard(scale_name).release(scale_name)
            else:
                out.copy_(t)
        finally:
            del t
            self._shard(name).release(name)

    def load(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Tensor `name` as a new tensor of `dtype` on `device` (allocated once, filled from the mapping)."""
        out = torch.empty(self.shape(name), dtype=dtype, device=device)
        self.load_into(name, out)
        return out


def _hf_to_internal(name: str, cfg: ModelConfig) -> str:
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return f"mtp.{int(m.group(1)) - cfg.num_hidden_layers}.{m.group(2)}"
    return name


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", load_mtp: bool = True,
                    allow_non_finite: bool = False, progress: bool | None = None,
                    keep_fp8: bool = False) -> Transformer:
    """Load an HF-format DeepSeek-V2/V3 folder into a nanoseek Transformer.

    Args:
        path: folder with config.json and *.safetensors (optionally sharded with an index).
        dtype: parameter dtype; default: the config's torch_dtype, else float32. FP8 weights are
            dequantized to it.
        device: where the parameters live.
        load_mtp: load the MTP modules when the checkpoint has them. A checkpoint whose config declares
            MTP layers but stores none (e.g. one written by transformers) loads without MTP, with a warning.
        allow_non_finite: load tensors holding NaN or Inf (by default CheckpointError names the first one).
        progress: show a progress bar in bytes (default: for checkpoints of 1 GiB and more).
        keep_fp8: keep an FP8 checkpoint's block-scaled weights in FP8 with their scales, dequantized to `dtype`
            layer by layer as the forward reaches them (nanoseek/fp8/weights.py): about half of bf16's memory.

    Raises CheckpointError naming the file (and tensor) of a folder that does not load (module docstring);
    ConfigError for a config.json field that breaks a ModelConfig rule.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder")
    hf_cfg, cfg = _read_config(path)
    config_dtype = _config_dtype(hf_cfg, path)
    if dtype is None:
        dtype = config_dtype
    files = _weight_files(path)
    L, declared_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    if declared_mtp:
        has_mtp = any((m := _LAYER.match(n)) and int(m.group(1)) >= L for n in files)
        if not has_mtp or not load_mtp:
            if not has_mtp:
                warnings.warn(f"{path}: config declares {declared_mtp} MTP layer(s) but the "
                              "checkpoint stores none; loading without MTP", stacklevel=2)
            cfg = cfg.replace(num_nextn_predict_layers=0)

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    reader = _Reader(files)
    try:
        reader.open_all()  # headers only: the sizes for the progress bar, and a broken shard fails before any read
        total = sum(reader.nbytes(n) for n in files)
        show = total >= _PROGRESS_BYTES if progress is None else progress
        with tqdm(total=total, desc=f"loading {os.path.basename(path)}", unit="B", unit_scale=True,
                  unit_divisor=1024, disable=not show) as bar:
            state = _load_state(reader, files, cfg, expected, declared_mtp, dtype, device, allow_non_finite, path, bar,
                                keep_fp8)
            bar.update(total - bar.n)  # the tensors checked but not read (MTP copies, MTP layers not loaded)
    finally:
        reader.close()
    placed = keep_fp8_weights(model, state, dtype) if keep_fp8 else set()
    result = model.load_state_dict({k: v for k, v in state.items() if k not in placed}, assign=True, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != placed:  # _load_state checked names: a bug if hit
        raise CheckpointError(f"{path}: state does not match the model: missing "
                              f"{sorted(set(result.missing_keys) - placed)[:4]}, unexpected {result.unexpected_keys[:4]}")
    model.init_buffers(device)
    return model.eval()


def _load_state(reader: _Reader, files: dict[str, str], cfg: ModelConfig, expected: dict, declared_mtp: int,
                dtype: torch.dtype, device, allow_non_finite: bool, path: str, bar,
                keep_fp8: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict read from `files` (see from_pretrained); every tensor is checked, then read once.
    With keep_fp8 an FP8 tensor stays FP8 and its scale joins the state as `<name>_scale_inv`."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    unexpected = []
    for name in files:
        if name.endswith("_scale_inv"):
            if name[: -len("_scale_inv")] not in files:
                unexpected.append(name)
            continue
        internal = _hf_to_internal(name, cfg)
        if internal.startswith("mtp."):
            k, rest = internal.split(".", 2)[1:]
            if int(k) >= cfg.num_nextn_predict_layers:
                if int(k) < declared_mtp:
                    continue  # declared MTP layers, not requested (load_mtp=False)
                unexpected.append(name)
                continue
            if rest in _MTP_COPIES:  # physical copies of the shared embedding / head: check, then drop
                shared = "model.embed_tokens.weight" if rest == "embed_tokens.weight" else "lm_head.weight"
                _check_shape(name, reader.shape(name), expected[shared].shape)
                continue
        m = _EXPERT.match(internal)
        if m:
            experts[m.group(1)][m.group(3)][int(m.group(2))] = name
        elif internal in expected:
            t_dtype = torch.float32 if internal.endswith("e_score_correction_bias") else dtype
            _check_shape(name, reader.shape(name), expected[internal].shape)
            if keep_fp8 and reader.is_fp8(name):
                t_dtype = torch.float8_e4m3fn
                state[internal + "_scale_inv"] = s = reader.load(name + "_scale_inv", torch.float32, device)
                if not allow_non_finite:
                    _check_finite(name + "_scale_inv", s, files[name + "_scale_inv"])
            t = reader.load(name, t_dtype, device)
            bar.update(reader.nbytes(name, with_scale=True))
            if not allow_non_finite:
                _check_finite(name, t, files[name])
            state[internal] = t
        else:
            unexpected.append(name)
    for prefix, parts in experts.items():
        for part, fused in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            key = f"{prefix}.{part}"
            if key not in expected:
                unexpected.extend(n for p in fused for n in parts[p].values())
                continue
            n_exp, rows, cols = expected[key].shape
            part_rows = rows // len(fused)
            for e in range(n_exp):
                for p in fused:
                    if e not in parts[p]:
                        raise CheckpointError(f"missing tensor {_internal_to_hf(prefix, cfg)}.{e}.{p}.weight")
                    _check_shape(parts[p][e], reader.shape(parts[p][e]), (part_rows, cols))
            extra = set(parts[fused[0]]) - set(range(n_exp))
            if extra:
                unexpected.extend(f"{_internal_to_hf(prefix, cfg)}.{e}.{fused[0]}.weight" for e in sorted(extra))
            # each expert's pieces go straight into the stacked tensor: no per-layer copy on top of it
            fp8 = keep_fp8 and reader.is_fp8(parts[fused[0]][0])
            t = torch.empty((n_exp, rows, cols), dtype=torch.float8_e4m3fn if fp8 else dtype, device=device)
            if fp8:  # the pieces' scale grids one after the other (each piece was quantized on its own)
                grid_rows, grid_cols = -(-part_rows // 128), -(-cols // 128)
                scales = torch.empty((n_exp, len(fused) * grid_rows, grid_cols), device=device)
                state[key + "_scale_inv"] = scales
            for e in range(n_exp):
                for j, p in enumerate(fused):
                    piece = t[e, j * part_rows:(j + 1) * part_rows]
                    if fp8:
                        scale = parts[p][e] + "_scale_inv"
                        if not reader.is_fp8(parts[p][e]) or scale not in files:
                            raise CheckpointError(f"tensor {parts[p][e]}: the other experts are FP8 with a scale, "
                                                  "this one is not")
                        _check_shape(scale, reader.shape(scale), (grid_rows, grid_cols))
                        reader.load_into(scale, scales[e, j * grid_rows:(j + 1) * grid_rows])
                        if not allow_non_finite:
                            _check_finite(scale, scales[e, j * grid_rows:(j + 1) * grid_rows], files[scale])
                    reader.load_into(parts[p][e], piece)
                    bar.update(reader.nbytes(parts[p][e], with_scale=True))
                    if not allow_non_finite:
                        _check_finite(parts[p][e], piece, files[parts[p][e]])
            state[key] = t
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in {path}: {', '.join(sorted(unexpected)[:8])}"
                              + (" ..." if len(unexpected) > 8 else ""))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"missing tensor(s) in {path}: "
                              + ", ".join(_internal_to_hf(k, cfg) for k in missing[:8])
                              + (" ..." if len(missing) > 8 else ""))
    return state


def _check_shape(name: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {name} has shape {tuple(got)}, the config expects {tuple(want)}")


def _check_finite(name: str, t: torch.Tensor, file: str) -> None:
    if t.dtype == torch.float8_e4m3fn:  # no isfinite for FP8; E4M3FN has no Inf and one NaN code, S.1111.111
        # in 4 MiB pieces (a mask as large as the tensor would raise the load's peak memory); count only on failure
        pieces = t.reshape(-1).view(torch.uint8).split(1 << 22)
        if not any(bool(torch.eq(torch.bitwise_and(p, 0x7F), 0x7F).any()) for p in pieces):
            return
        n_nan, n_inf = sum(int(torch.eq(torch.bitwise_and(p, 0x7F), 0x7F).sum()) for p in pieces), 0
    elif t.numel() == 0 or all(torch.isfinite(x) for x in torch.aminmax(t)):
        # aminmax propagates NaN and sees +-Inf in one pass with no temporary; isfinite(t).all() took about 20x
        # longer on the CPU (most of a load's time) and a mask as large as the tensor
        return
    else:
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if n_nan or n_inf:
        dtype = str(t.dtype).removeprefix("torch.")
        raise CheckpointError(f"tensor {name} in {file} holds {n_nan} NaN and {n_inf} Inf value(s) as {dtype}; "
                              "load it anyway with allow_non_finite=True (CLI: --allow-non-finite)")


# ---- saving ---------------------------------------------------------------------------------------

def _internal_to_hf(name: str, cfg: ModelConfig) -> str:
    if name.startswith("mtp."):
        _, k, rest = name.split(".", 2)
        return f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
    return name


_FP8_MODULES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                "up_proj", "down_proj", "wq_b", "wk"}


def _quantizable(hf_name: str) -> bool:
    """Which weights the released checkpoints store in FP8: attention/MLP/expert projections and the DSA indexer's
    wq_b and wk, never norms (k_norm included), embeddings, the head, the router, the indexer's weights_proj or the
    MTP eh_proj (docs/design/checkpoints.md, "Tensor inventory"; docs/design/dsa.md, "Checkpoints")."""
    parts = hf_name.split(".")
    return parts[-1] == "weight" and parts[-2] in _FP8_MODULES


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names (experts split, MTP renamed, MTP copies added)."""
    cfg = model.cfg
    out = {}
    for name, t in model.state_dict().items():
        hf = _internal_to_hf(name, cfg)
        if hf.endswith(".mlp.experts.gate_up_proj"):
            base = hf[: -len("gate_up_proj")]
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"] = gate
                out[f"{base}{e}.up_proj.weight"] = up
        elif hf.endswith(".mlp.experts.down_proj"):
            base = hf[: -len("down_proj")]
            for e, w in enumerate(t):
                out[f"{base}{e}.down_proj.weight"] = w
        else:
            out[hf] = t
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        out[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach()
        out[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach()
    return out


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_bytes: int | None = None,
                    fp8: bool = False, scale_fmt: str | None = None) -> None:
    """Write config.json and safetensors with HF names (sharded above `max_shard_bytes`, default 5 GB).

    `fp8` stores the projection weights as float8_e4m3fn with 128x128 `weight_scale_inv`, like the
    released DeepSeek-V3 checkpoints; `scale_fmt="ue8m0"` rounds those scales up to powers of two, as the
    V3.1/V3.2 checkpoints store them. Every file is written to a temporary name and renamed.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    max_shard_bytes = max_shard_bytes or 5 * 1024 ** 3
    tensors = {}
    for name, t in hf_state_dict(model).items():
        t = t.detach().to("cpu").contiguous()
        if fp8 and _quantizable(name):
            tensors[name], tensors[name + "_scale_inv"] = block_quantize(t, scale_fmt=scale_fmt)
        else:
            tensors[name] = t.clone()  # clone: shared storage (MTP copies, tied weights) is refused
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)

    stale = [f for f in os.listdir(path) if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(names, shards):
        atomic(os.path.join(path, file), lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
    hf_cfg = model.cfg.to_hf()
    hf_cfg["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    if fp8:
        hf_cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128],
                                         **({"scale_fmt": scale_fmt} if scale_fmt else {})}
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for f, s in zip(names, shards) for n in s}}
        atomic(os.path.join(path, "model.safetensors.index.json"), lambda tmp: _write_json(tmp, index))
    atomic(os.path.join(path, "config.json"), lambda tmp: _write_json(tmp, hf_cfg))
    for f in stale:
        if f not in names and not (f == "model.safetensors.index.json" and len(shards) > 1):
            os.remove(os.path.join(path, f))


def _write_json(file: str, obj) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)

