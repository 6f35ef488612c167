"""ModelConfig: the architecture hyper-parameters of a DeepSeek-V2/V3/V3.2-style model.

Field names follow the HF `config.json` keys (docs/design/checkpoints.md), so `from_hf` and `to_hf`
are mostly renames-free. Every field is validated in `__post_init__`; an invalid value raises
`ConfigError` naming the field and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid config field; the message names the class, the field and the rule."""


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Validator:
    """The checks of a config dataclass's `__post_init__`, shared by the training configs: a failed check raises
    ConfigError "<Class>.<field> <rule> (got <value>)"."""

    def __init__(self, cfg):
        self.cfg, self.cls = cfg, type(cfg).__name__

    def require(self, ok: bool, field: str, rule: str) -> None:
        if not ok:
            got = f" (got {getattr(self.cfg, field)!r})" if hasattr(self.cfg, field) else ""
            raise ConfigError(f"{self.cls}.{field} {rule}{got}")

    def ints(self, *fields: str, minimum: int = 1, optional: bool = False) -> None:
        """Each field an int >= minimum (or None when optional)."""
        rule = "must be a positive int" if minimum == 1 else f"must be an int >= {minimum}"
        for f in fields:
            v = getattr(self.cfg, f)
            self.require((optional and v is None) or (is_int(v) and v >= minimum), f,
                         rule + (" or None" if optional else ""))

    def number(self, field: str, low: float | None = None, high: float | None = None, *,
               open_low: bool = False, open_high: bool = False) -> None:
        """A finite number in the interval given by low/high (None: unbounded on that side)."""
        v = getattr(self.cfg, field)
        ok = is_number(v) and (low is None or (v > low if open_low else v >= low)) and \
            (high is None or (v < high if open_high else v <= high))
        if high is None:
            rule = "must be a finite number" + ("" if low is None else f" {'>' if open_low else '>='} {low}")
        else:
            rule = f"must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        self.require(ok, field, rule)

    def one_of(self, field: str, choices) -> None:
        self.require(getattr(self.cfg, field) in choices, field, f"must be one of {tuple(choices)}")

    def flags(self, *fields: str) -> None:
        for f in fields:
            self.require(isinstance(getattr(self.cfg, f), bool), f, "must be true or false")

    def paths(self, field: str) -> None:
        """A list of file paths; a single path is accepted and wrapped."""
        v = getattr(self.cfg, field)
        if isinstance(v, (str, os.PathLike)):
            setattr(self.cfg, field, [os.fspath(v)])
        v = getattr(self.cfg, field)
        self.require(isinstance(v, list) and all(isinstance(p, str) for p in v), field, "must be a list of file paths")


def read_config_file(cls, path: str | os.PathLike) -> dict:
    """The fields of dataclass `cls` set in a JSON or TOML file; ConfigError for a missing or unparsable
    file and for names that are not fields of `cls`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    toml = path.endswith(".toml")
    try:
        if toml:
            import tomllib
            with open(path, "rb") as f:
                values = tomllib.load(f)
        else:
            with open(path) as f:
                values = json.load(f)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"config file {path} is not valid {'TOML' if toml else 'JSON'}: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold an object of {cls.__name__} fields")
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) in {path}: {sorted(unknown)}")
    return values


def load_config(cls, path: str | os.PathLike | None = None, overrides: dict | None = None,
                defaults: dict | None = None):
    """`cls` built from its defaults <- `defaults` (a command's own, e.g. the CLI's precision "auto") <- a
    JSON/TOML file (read_config_file) <- overrides (None values ignored)."""
    values = dict(defaults or {})
    if path is not None:
        values.update(read_config_file(cls, path))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return cls(**values)


_SCORING = ("sigmoid", "softmax")
_V3_TYPES = ("deepseek_v3", "deepseek_v32")
_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek_v32")
_TOPK = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture (defaults: the `tiny` test model).

    Attributes:
        vocab_size: number of token ids (embedding and head rows).
        hidden_size: model width d.
        intermediate_size: inner width of the dense SwiGLU FFN of the first `first_k_dense_replace` layers.
        moe_intermediate_size: inner width of one (routed or shared) expert.
        num_hidden_layers: main transformer blocks L (the MTP modules come on top of these).
        num_attention_heads: MLA heads n_h.
        q_lora_rank: query latent width d_c'; None (V2-Lite) uses a plain q projection.
        kv_lora_rank: key/value latent width d_c, the cached latent.
        qk_nope_head_dim: per-head query/key width without position encoding.
        qk_rope_head_dim: width of the decoupled RoPE query part and of the shared RoPE key.
        v_head_dim: per-head value width.
        n_routed_experts: routed experts N_r per MoE layer (0 makes every layer dense).
        n_shared_experts: shared experts N_s, fused into one SwiGLU of width N_s * moe_intermediate_size.
        num_experts_per_tok: routed experts K_r chosen per token.
        n_group: expert groups (nodes) for group-limited routing; 1 disables grouping.
        topk_group: groups a token may route to.
        scoring_func: affinity function, "sigmoid" (V3) or "softmax" (V2).
        topk_method: "noaux_tc" (V3: biased selection, group score = sum of top-2),
            "greedy" (plain top-k) or "group_limited_greedy" (V2: group score = max).
        norm_topk_prob: renormalize the chosen affinities to sum to one.
        routed_scaling_factor: multiplier on the routed experts' gating weights.
        first_k_dense_replace: the first k layers use the dense FFN instead of MoE.
        num_nextn_predict_layers: MTP depth D (0 disables MTP).
        rope_theta: RoPE base.
        rope_scaling: None, or a YaRN dict {type/rope_type: "yarn", factor, original_max_position_embeddings,
            beta_fast, beta_slow, mscale, mscale_all_dim}.
        max_position_embeddings: longest supported context.
        rms_norm_eps: RMSNorm epsilon.
        initializer_range: std of the normal init of linear and embedding weights.
        tie_word_embeddings: share the embedding with the output head (False in all DeepSeek models).
        bos_token_id, eos_token_id, pad_token_id: special token ids written to config.json.
        index_n_heads: heads of the DeepSeek Sparse Attention lightning indexer (V3.2: 64; docs/design/dsa.md).
        index_head_dim: width of an indexer query head and of its one shared key per token, RoPE part first
            (V3.2: 128); at least qk_rope_head_dim.
        index_topk: past tokens each query attends to, chosen per query and layer by the indexer (V3.2: 2048).
            None or 0: no indexer, dense attention (V2/V3); then index_n_heads and index_head_dim are unset.
            The indexer reads the query latent, so it needs q_lora_rank.
        model_type: "deepseek_v3", "deepseek_v2" or "deepseek_v32"; decides the HF class on export. It follows the
            indexer: a deepseek_v3 config with index_topk becomes deepseek_v32, a deepseek_v32 one without it
            deepseek_v3.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    q_lora_rank: int | None = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    model_type: str = "deepseek_v3"

    def __post_init__(self):
        if self.q_lora_rank == 0:  # the official ModelArgs spell "no q latent" as 0, HF as null
            self.q_lora_rank = None
        if self.n_routed_experts == 0:  # dense model: which layers are "dense" is moot; keep one spelling
            self.first_k_dense_replace = 0
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if not self.index_topk:  # 0 or None: no indexer, so no indexer shape either
            self.index_topk = self.index_n_heads = self.index_head_dim = None
        if self.model_type in _V3_TYPES:
            self.model_type = "deepseek_v32" if self.index_topk is not None else "deepseek_v3"
        self.validate()

    # ---- derived values -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MTP blocks (layer_idx >= num_hidden_layers) follow the same rule, as in the V3 checkpoint."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (HF semantics; docs/design/mla.md)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    @property
    def has_indexer(self) -> bool:
        """DeepSeek Sparse Attention: a lightning indexer picks index_topk past tokens per query (V3.2)."""
        return self.index_topk is not None

    def index_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """The indexer's cached key per layer (index_head_dim values), next to the MLA latent; 0 without DSA."""
        return (self.index_head_dim or 0) * self.num_hidden_layers * bytes_per_element

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Absorbed-MLA cache: the normalized latent and the rotated RoPE key per layer (V2 report Table 1)."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers * bytes_per_element

    def mha_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """What a plain MHA cache of the same heads would hold: full K (qk_head_dim) and V per head."""
        per_layer = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        return per_layer * self.num_hidden_layers * bytes_per_element

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"]
        for name in positive:
            _require(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be positive or null")
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        _require(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        _require(self.model_type in _MODEL_TYPES, "model_type", f"must be one of {_MODEL_TYPES}")
        if self.has_indexer:
            for name in ("index_topk", "index_n_heads", "index_head_dim"):
                _require(is_int(getattr(self, name)) and getattr(self, name) > 0, name,
                         "must be a positive int when index_topk is set (DSA)")
            _require(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
                     f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): its RoPE part is that wide")
            _require(self.q_lora_rank is not None, "q_lora_rank", "must be set with an indexer (it reads the query latent)")
            _require(self.model_type == "deepseek_v32", "model_type", "must be deepseek_v32 with an indexer (index_topk)")
        _require(0 <= self.first_k_dense_replace, "first_k_dense_replace", "must be >= 0")
        if self.first_k_dense_replace > 0 or self.n_routed_experts == 0:
            _require(self.intermediate_size > 0, "intermediate_size", "must be > 0 when dense layers exist")
        if self.n_routed_experts == 0:
            return
        _require(self.n_routed_experts > 0, "n_routed_experts", "must be >= 0")
        _require(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
        _require(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        _require(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be in 1..n_routed_experts ({self.n_routed_experts})")
        _require(self.scoring_func in _SCORING, "scoring_func", f"must be one of {_SCORING}")
        _require(self.topk_method in _TOPK, "topk_method", f"must be one of {_TOPK}")
        _require(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must be >= 1 and divide n_routed_experts ({self.n_routed_experts})")
        _require(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in 1..n_group ({self.n_group})")
        if self.topk_method == "noaux_tc" and self.n_group > 1:
            _require(self.n_routed_experts // self.n_group >= 2, "n_group",
                     "noaux_tc scores a group by its top-2 experts, so each group needs >= 2 experts")
        if self.topk_method != "greedy":
            per_group = self.n_routed_experts // self.n_group
            _require(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                     "topk_group groups must hold at least num_experts_per_tok experts")
        _require(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")

    # ---- presets and HF mapping -----------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration (see PRESETS); keyword overrides replace single fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike) -> "ModelConfig":
        """Build from an HF config: a dict, a config.json path or a folder holding one."""
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ConfigError(f"no config.json at {path}")
            with open(path) as f:
                source = json.load(f)
        hf = dict(source)
        model_type = hf.get("model_type", "deepseek_v3")
        if model_type not in _MODEL_TYPES:
            raise ConfigError(f"model_type: {model_type!r} is not supported (one of {', '.join(_MODEL_TYPES)})")
        # Keys a config omits take the defaults of the real model of that type, not of the tiny preset.
        base = PRESETS[{"deepseek_v3": "v3-671b", "deepseek_v2": "v2-lite", "deepseek_v32": "v3.2-671b"}[model_type]]
        kwargs: dict[str, Any] = {**base, "model_type": model_type}
        known = {f.name for f in dataclasses.fields(cls)}
        for key in known - {"model_type", "rope_scaling"}:
            if key in hf:
                kwargs[key] = hf[key]
        if model_type == "deepseek_v2":
            kwargs["num_nextn_predict_layers"] = 0  # V2 has no MTP
        for key in ("n_group", "topk_group"):
            if kwargs.get(key) is None:
                kwargs[key] = 1
        if kwargs.get("n_routed_experts") is None:
            kwargs["n_routed_experts"] = 0
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        # Newer transformers write `rope_parameters` (with rope_theta inside); older ones `rope_scaling`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling")
        if rope is not None and "rope_theta" in rope:
            kwargs.setdefault("rope_theta", rope["rope_theta"])
        rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        kwargs["rope_scaling"] = None if rope_type == "default" else rope
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The HF `config.json` dict (loads in transformers with no remote code)."""
        d = dataclasses.asdict(self)
        v3 = self.model_type in _V3_TYPES
        d.update(
            architectures=[{"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                            "deepseek_v32": "DeepseekV32ForCausalLM"}[self.model_type]],
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu", attention_bias=False, attention_dropout=0.0, moe_layer_freq=1,
            rope_interleave=True, torch_dtype="float32", use_cache=True,
        )
        if self.n_routed_experts == 0:  # a dense model: HF builds MoE only from first_k_dense_replace on
            d["first_k_dense_replace"] = self.num_hidden_layers + self.num_nextn_predict_layers
        if not v3:
            d.pop("num_nextn_predict_layers")
        if not self.has_indexer:
            for key in ("index_n_heads", "index_head_dim", "index_topk"):
                d.pop(key)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling, "rope_type": "yarn", "type": "yarn", "rope_theta": self.rope_theta}
        d["rope_scaling"] = rope if self.rope_scaling is not None else None
        d["rope_parameters"] = rope
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN magnitude sqrt(t) = 0.1 * mscale * ln(s) + 1 (V3 report §4.3); 1 when not extending."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _normalize_rope_scaling(rs: dict, max_pos: int) -> dict:
    rs = dict(rs)
    rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "yarn"
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    _require(rope_type == "yarn", "rope_scaling", f"type {rope_type!r} is not supported (only 'yarn' or none)")
    _require("original_max_position_embeddings" in rs, "rope_scaling",
             "YaRN needs original_max_position_embeddings")
    if rs.get("factor") is None:  # HF rule: derive the factor from the context extension
        rs["factor"] = max_pos / rs["original_max_position_embeddings"]
    _require(rs["factor"] >= 1, "rope_scaling", "factor must be >= 1")
    rs.setdefault("beta_fast", 32)
    rs.setdefault("beta_slow", 1)
    rs["type"] = "yarn"
    return rs


def _require(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"ModelConfig.{name} {rule}")


_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    # Unit tests: every feature on (q-lora, YaRN, grouped sigmoid routing, a dense layer, MTP), tiny widths.
    "tiny": {},
    # ~10M parameters: demos, the embedded pipeline and the CPU benchmarks (hidden 256, 4 layers, 16 experts top-4).
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                  n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=4096,
                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                    n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, scoring_func="softmax",
                    topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                    first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=163840,
                    rope_scaling={**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
                    bos_token_id=100000, eos_token_id=100001, model_type="deepseek_v2"),
    "v3-671b": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                    n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, first_k_dense_replace=3, num_nextn_predict_layers=1,
                    max_position_embeddings=163840, rope_scaling=dict(_V3_YARN), initializer_range=0.006),
}
# DeepSeek-V3.2-Exp: V3 plus the DSA lightning indexer (docs/design/dsa.md, "Configuration").
PRESETS["v3.2-671b"] = dict(PRESETS["v3-671b"], index_n_heads=64, index_head_dim=128, index_topk=2048,
                            model_type="deepseek_v32")
