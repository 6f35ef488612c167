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

A folder that cannot be loaded raises CheckpointError naming the file and, where there is one, the tensor:
unreadable JSON, a config.json that is not an object, an unknown torch_dtype, an index without a weight_map
or with an entry outside the folder (absolute or through ".."; symlinks inside it, as in the HF cache, are
followed), a safetensors file that is empty, cut short or not safetensors (its header does not match its
size). Weights holding NaN or Inf are refused too (`allow_non_finite=True` loads them): transformers and vLLM
load them silently, and such a model generates nothing or garbage with no hint why. The check is one
`isfinite` pass per tensor as it is loaded.
"""

from __future__ import annotations

import json
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
from .model.transformer import Transformer

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_DTYPES = ("float32", "bfloat16", "float16", "float64")  # what a config's torch_dtype may name
_INDEX_FILE = "model.safetensors.index.json"


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


class _Reader:
    """Lazy tensor access across shards, with FP8 dequantization; errors name the tensor and its file."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._open = {}

    def _shard(self, name: str):
        file = self.files[name]
        if file not in self._open:
            if not os.path.isfile(file):
                raise CheckpointError(f"tensor {name}: shard {file} is missing")
            self._open[file] = _open_safetensors(file)
        return self._open[file]

    def open_all(self) -> None:
        """Open every shard's header now (the first tensor of each file)."""
        first = {file: name for name, file in self.files.items()}
        for name in first.values():
            self._shard(name)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._shard(name).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"tensor {name} in {self.files[name]}: {e}") from None

    def shape(self, name: str) -> list[int]:
        """The stored shape, without reading the data."""
        try:
            return self._shard(name).get_slice(name).get_shape()
        except SafetensorError as e:
            raise CheckpointError(f"tensor {name} in {self.files[name]}: {e}") from None

    def get_dequantized(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.get(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + "_scale_inv"
            if scale_name not in self.files:
                raise CheckpointError(f"tensor {name} is FP8 but {scale_name} is missing")
            try:
                return block_dequantize(t, self.get(scale_name), dtype=dtype)
            except ValueError as e:
                raise CheckpointError(f"tensor {name}: {e}") from None
        return t.to(dtype)


def _hf_to_internal(name: str, cfg: ModelConfig) -> str:
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return f"mtp.{int(m.group(1)) - cfg.num_hidden_layers}.{m.group(2)}"
    return name


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", load_mtp: bool = True,
                    allow_non_finite: bool = False) -> Transformer:
    """Load an HF-format DeepSeek-V2/V3 folder into a nanoseek Transformer.

    Args:
        path: folder with config.json and *.safetensors (optionally sharded with an index).
        dtype: parameter dtype; default: the config's torch_dtype, else float32. FP8 weights are
            dequantized to it.
        device: where the parameters live.
        load_mtp: load the MTP modules when the checkpoint has them. A checkpoint whose config declares
            MTP layers but stores none (e.g. one written by transformers) loads without MTP, with a warning.
        allow_non_finite: load tensors holding NaN or Inf (by default CheckpointError names the first one).

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
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    unexpected = []
    # Real DeepSeek checkpoints hold ~92k tensors in 163 shards: show progress there, stay quiet for small ones.
    for name in tqdm(files, desc=f"loading {os.path.basename(path)}", unit="tensor", disable=len(files) < 5000):
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
            want = expected[internal]
            t_dtype = torch.float32 if internal.endswith("e_score_correction_bias") else dtype
            t = reader.get_dequantized(name, t_dtype)
            _check_shape(name, t.shape, want.shape)
            if not allow_non_finite:
                _check_finite(name, t, files[name])
            state[internal] = t.to(device)
        else:
            unexpected.append(name)
    for prefix, parts in experts.items():
        for part, fused in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            key = f"{prefix}.{part}"
            if key not in expected:
                unexpected.extend(n for p in fused for n in parts[p].values())
                continue
            n_exp, rows, cols = expected[key].shape
            per_expert = []
            for e in range(n_exp):
                pieces = []
                for p in fused:
                    if e not in parts[p]:
                        raise CheckpointError(f"missing tensor {_internal_to_hf(prefix, cfg)}.{e}.{p}.weight")
                    piece = reader.get_dequantized(parts[p][e], dtype)
                    _check_shape(parts[p][e], piece.shape, (rows // len(fused), cols))
                    if not allow_non_finite:
                        _check_finite(parts[p][e], piece, files[parts[p][e]])
                    pieces.append(piece)
                per_expert.append(torch.cat(pieces, 0))
            extra = set(parts[fused[0]]) - set(range(n_exp))
            if extra:
                unexpected.extend(f"{_internal_to_hf(prefix, cfg)}.{e}.{fused[0]}.weight" for e in sorted(extra))
            t = torch.stack(per_expert)
            _check_shape(f"{_internal_to_hf(prefix, cfg)}.*.{'/'.join(fused)}", t.shape, expected[key].shape)
            state[key] = t.to(device)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in {path}: {', '.join(sorted(unexpected)[:8])}"
                              + (" ..." if len(unexpected) > 8 else ""))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"missing tensor(s) in {path}: "
                              + ", ".join(_internal_to_hf(k, cfg) for k in missing[:8])
                              + (" ..." if len(missing) > 8 else ""))
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers(device)
    return model.eval()


def _check_shape(name: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {name} has shape {tuple(got)}, the config expects {tuple(want)}")


def _check_finite(name: str, t: torch.Tensor, file: str) -> None:
    if not torch.isfinite(t).all():
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
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
                    fp8: bool = False) -> None:
    """Write config.json and safetensors with HF names (sharded above `max_shard_bytes`, default 5 GB).

    `fp8` stores the projection weights as float8_e4m3fn with 128x128 `weight_scale_inv`, like the
    released DeepSeek-V3 checkpoints. Every file is written to a temporary name and renamed.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    max_shard_bytes = max_shard_bytes or 5 * 1024 ** 3
    tensors = {}
    for name, t in hf_state_dict(model).items():
        t = t.detach().to("cpu").contiguous()
        if fp8 and _quantizable(name):
            tensors[name], tensors[name + "_scale_inv"] = block_quantize(t)
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
                                         "weight_block_size": [128, 128]}
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

