"""The DeepSeek-V3 decoder: pre-norm MLA + (dense | MoE) blocks, final norm, untied head, and D
Multi-Token Prediction modules (V3 report §2.2; docs/design/mtp.md).

Module names mirror the HF checkpoint (`model.layers.3.self_attn.kv_b_proj`), so checkpoint I/O is a
rename of the MTP layers and a split of the stacked experts only (nanoseek/checkpoint.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import ModelConfig
from .cache import LatentCache
from .indexer import IndexerRecorder
from .mla import MLA, attention_bias
from .moe import MLP, MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, positions, cache=None, slots=None, absorb=False, bias=None, recorder=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, slots, absorb, bias, recorder)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_with_prefix(self, x_p, rope_p, x_c, rope_c, group, mask):
        """Prefixes and continuations (MLA.forward_with_prefix); the FFN runs once over both token sets."""
        a_p, a_c = self.self_attn.forward_with_prefix(self.input_layernorm(x_p), rope_p, self.input_layernorm(x_c),
                                                      rope_c, group, mask)
        x_p, x_c = x_p + a_p, x_c + a_c
        x_ND = torch.cat([x_p.flatten(0, 1), x_c.flatten(0, 1)])
        y_ND = self.mlp(self.post_attention_layernorm(x_ND)[None])[0]
        n = x_p.shape[0] * x_p.shape[1]
        return x_p + y_ND[:n].view_as(x_p), x_c + y_ND[n:].view_as(x_c)


class SharedHead(nn.Module):
    """The MTP module's final norm; the output projection itself is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTP(Block):
    """MTP module k (V3 report eqs. 21-23): h'_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})], then one block.

    The concatenation is [embedding ; hidden], the order of the released `eh_proj` weights (docs/design/mtp.md).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h, emb, cos, sin, positions, cache=None, slots=None, absorb=False, bias=None, recorder=None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return super().forward(x, cos, sin, positions, cache, slots, absorb, bias, recorder)


class DecoderStack(nn.Module):
    """`model.*` of the HF layout: embedding, main blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTP(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)

    # ---- forward paths --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, slots: torch.Tensor | None = None,
                absorb: bool | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of the main head. See `hidden_states` for the arguments."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache, slots, absorb))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: LatentCache | None = None, slots: torch.Tensor | None = None,
                      absorb: bool | None = None, compiled: bool = False,
                      recorder: IndexerRecorder | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, D).

        Args:
            input_ids: (B, T) token ids.
            positions: (B, T) absolute positions; default 0..T-1 for every row.
            cache: a LatentCache to write this chunk's latents into (and read history from).
            slots: (B,) cache rows of the batch rows; default 0..B-1.
            absorb: attention path. Default: naive when there is no history (training, prefill from
                position 0), absorbed over the cache otherwise (decode, chunked prefill).
            compiled: run the layers through torch.compile (inductor, dynamic shapes) when this is an
                absorbed forward without autograd (decode, speculative verification). The first call
                compiles (seconds to a minute); later ones fuse the step's small ops into a few kernels
                (benchmarks/bench_decode.py). Other forwards ignore it.
            recorder: with DSA (cfg.index_topk), collects each layer's indexer scores and attention target
                for the indexer's KL loss (model/indexer.py); a training forward's argument, naive path only.
        """
        self._check_ids(input_ids)
        positions, slots, absorb, bias = self._prepare(input_ids, positions, cache, slots, absorb)
        if compiled and absorb and not torch.is_grad_enabled():
            for layer in self.model.layers:  # folded weights are refreshed here: the graph only reads them
                if layer.self_attn.fold:
                    layer.self_attn._folded_weights()
            if slots is None and cache is not None:  # one graph for all calls: rows are always indexed
                slots = torch.arange(input_ids.shape[0], device=input_ids.device)
            # without duck sizing, a batch as large as the cache's slot count does not specialize a graph
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return _compiled_layers()(self, input_ids, positions, cache, slots, absorb, bias)
        return self.layers_forward(input_ids, positions, cache, slots, absorb, bias, recorder)

    def layers_forward(self, input_ids, positions, cache, slots, absorb, bias, recorder=None) -> torch.Tensor:
        """Embedding, blocks and final norm on prepared arguments (`_prepare`): no checks, no host syncs,
        so that torch.compile sees the whole forward as one graph."""
        cos, sin = self.rotary(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, cache, slots, absorb, bias, recorder)
        return self.model.norm(x)

    def prefix_shared_hidden_states(self, prefix_ids: torch.Tensor, prefix_lens: torch.Tensor,
                                    input_ids: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden states of rows that continue shared prefixes, each prefix computed once (GRPO's
        G completions of one prompt). Equal to `hidden_states` of the concatenated rows (tests/test_model.py).

        Args:
            prefix_ids: (N, P) right-padded prefixes; prefix_lens: (N,) their lengths.
            input_ids: (B, T) right-padded continuations; group: (B,) the prefix each continues.
        Returns: (N, P, D) for the prefixes and (B, T, D) for the continuations; token t of row b sits at
            position prefix_lens[group[b]] + t.
        """
        self._check_ids(prefix_ids)
        self._check_ids(input_ids)
        P, (B, T) = prefix_ids.shape[1], input_ids.shape
        dev = input_ids.device
        lens_B = prefix_lens.to(dev)[group]
        positions_p = self._prepare(prefix_ids, None, None, None, False)[0]   # range checks of both
        positions_c = self._prepare(input_ids, lens_B[:, None] + torch.arange(T, device=dev), None, None, False)[0]
        # keys [prefix 0..P-1 ; own 0..T-1]: the prefix's real tokens, then causally the row's own tokens
        own_TT = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([(torch.arange(P, device=dev) < lens_B[:, None])[:, None].expand(B, T, P),
                          own_TT.expand(B, T, T)], dim=-1)[:, None]
        x_p, x_c = self.model.embed_tokens(prefix_ids), self.model.embed_tokens(input_ids)
        rope_p, rope_c = self.rotary(positions_p), self.rotary(positions_c)
        for layer in self.model.layers:
            x_p, x_c = layer.forward_with_prefix(x_p, rope_p, x_c, rope_c, group, mask)
        return self.model.norm(x_p), self.model.norm(x_c)

    def mtp_hidden_states(self, h_BTD: torch.Tensor, input_ids: torch.Tensor | None = None,
                          recorder: IndexerRecorder | None = None,
                          emb: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Training-time MTP: for depth k, hidden states at positions 0..T-1-k that predict token i+k+1.

        h_BTD are the main model's final-normed hidden states for `input_ids`; returns one tensor
        (B, T-k, D) per depth, already passed through the module's shared_head norm. `recorder`: as in
        `hidden_states`, for the MTP blocks' indexers. `emb`: the token embeddings instead of `input_ids`
        (a pipeline's last stage, which holds no embedding, receives them).
        """
        B, T = h_BTD.shape[:2]
        positions = torch.arange(T, device=h_BTD.device).expand(B, T)
        cos, sin = self.rotary(positions)
        emb = self.model.embed_tokens(input_ids) if emb is None else emb
        outs, h = [], h_BTD
        for k, module in enumerate(self.mtp, start=1):
            n = T - k
            if n <= 0:
                break
            h = module(h[:, :n], emb[:, k:k + n], cos[:, :n], sin[:, :n], positions[:, :n], recorder=recorder)
            outs.append(module.shared_head.norm(h))
        return outs

    def mtp_step(self, k: int, h_BTD: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                 cache: LatentCache | None = None, slots: torch.Tensor | None = None,
                 absorb: bool | None = None, logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One MTP module (0-based k) for drafting: returns (its hidden state, the logits of token i+k+2).

        `logits=False` skips the vocabulary projection (None instead), e.g. when only filling the cache."""
        module = self.mtp[k]
        positions, slots, absorb, bias = self._prepare(next_ids, positions, cache, slots, absorb)
        cos, sin = self.rotary(positions)
        h = module(h_BTD, self.model.embed_tokens(next_ids), cos, sin, positions, cache, slots, absorb, bias)
        return h, (self.lm_head(module.shared_head.norm(h)) if logits else None)

    def _prepare(self, input_ids, positions, cache, slots, absorb):
        """Defaults, range checks and the absorbed path's attention mask, once per forward for all layers.

        slots stay None for rows 0..B-1, so the cache can hand out views instead of gathered copies."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        first, last = (int(v) for v in positions.aminmax()) if positions.numel() else (0, 0)
        if last >= self.cfg.max_position_embeddings:
            raise ValueError(f"position {last} exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
        if cache is not None:
            cache.check(last)
        history = cache is not None and (first > 0 or bool((positions[:, 0] > 0).any()))
        if absorb is None:
            absorb = history
        elif history and not absorb:
            raise ValueError("the naive MLA path cannot attend to cached history; use absorb=True (or None)")
        bias = None
        if absorb and positions.numel():
            keys = last + 1 if cache is not None else positions
            bias = attention_bias(positions, keys, self.cfg.num_attention_heads, self.lm_head.weight.dtype)
        return positions, slots, absorb, bias

    def _check_ids(self, input_ids):
        if input_ids.numel():
            low, high = (int(v) for v in input_ids.aminmax())
            if low < 0 or high >= self.cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); got [{low}, {high}]")

    # ---- utilities ------------------------------------------------------------------------------
    def invalidate_caches(self) -> None:
        """Forget weight-derived tensors (MLA's folded decode projections) after an in-place weight
        update that tensor versions do not show, e.g. a fused AdamW step (see nanoseek/model/mla.py)."""
        for module in self.modules():
            if isinstance(module, MLA):
                module.invalidate_caches()

    def moe_layers(self) -> list[tuple[str, MoE]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MoE)]

    def num_parameters(self, activated: bool = False) -> int:
        """Stored values of the main model (MTP excluded; the routing biases included, as in the V3 report's
        count); `activated`: those a token touches (K of the N routed experts)."""
        total = sum(t.numel() for n, t in self.state_dict().items() if not n.startswith("mtp."))
        if activated:
            cfg = self.cfg
            for name, moe in self.moe_layers():
                if name.startswith("mtp."):
                    continue
                # from the shapes: indexing a sharded (DTensor) weight would gather it
                per_expert = moe.experts.gate_up_proj.shape[1:].numel() + moe.experts.down_proj.shape[1:].numel()
                total -= (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        return total

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights from the global RNG, on whatever device the parameters live (e.g. after `to_empty`).

        First every torch.nn leaf's own `reset_parameters`, in module order: the draws that building it on a
        real device makes, so a model materialised from the meta device equals one built in place and the
        random stream (hence every model nanoseek has built) stays as it was. Then Normal(0,
        initializer_range) for linear, expert and embedding weights, ones for norms, a zero routing bias, and
        the non-parameter state (`init_buffers`).
        """
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.reset_parameters()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.LayerNorm):  # the DSA indexer's key norm: ones and zeros, no draws
                module.reset_parameters()
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, std=std)
                nn.init.normal_(module.experts.gate_up_proj, std=std)
                nn.init.normal_(module.experts.down_proj, std=std)
                if module.gate.e_score_correction_bias is not None:
                    module.gate.e_score_correction_bias.zero_()
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild the state that is neither a parameter nor in a checkpoint: the rotary table and the routing
        counters, on `device` (default: where the embedding lives). Called after materialising a meta-built
        model (`init_weights`) and after loading weights into one (`nanoseek.from_pretrained`)."""
        device = device or self.model.embed_tokens.weight.device
        self.rotary.reset(device)
        for _, moe in self.moe_layers():
            moe.tokens_per_expert = torch.zeros(moe.n_experts, dtype=torch.long, device=device)


@functools.cache
def _compiled_layers():
    """Transformer.layers_forward compiled once per process, on first use (importing torch._dynamo costs
    seconds). Dynamic shapes: batch, step width and cache length vary from call to call. cpp_wrapper: the
    graph's ~100 kernel calls are made from C++ rather than Python, which matters most at batch 1
    (benchmarks/README.md, greedy decoding)."""
    return torch.compile(Transformer.layers_forward, dynamic=True, options={"cpp_wrapper": True})


def build_model(cfg: ModelConfig, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                seed: int | None = None) -> Transformer:
    """A randomly initialized model (seeded if `seed` is given): built on the meta device, then materialised on
    `device` (default cpu) by `init_weights`. `device="meta"` returns it unmaterialised, for transforms that
    shard it first (materialise with `model.to_empty(device=...)` and `model.init_weights()`)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if str(device) != "meta":
        if seed is not None:
            torch.manual_seed(seed)
        model.to_empty(device=device or "cpu")
        if cfg.tie_word_embeddings:  # to_empty gives every module its own new parameter
            model.lm_head.weight = model.model.embed_tokens.weight
        model.init_weights()
    return model.to(dtype=dtype) if dtype is not None else model
