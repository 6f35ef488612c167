"""KV-cache bytes per token (bf16): MLA's latent cache vs what an MHA cache of the same model would hold.

For each preset:
  MLA/token   = cfg.kv_cache_bytes_per_token(2) = (kv_lora_rank + qk_rope_head_dim) x layers x 2 bytes
                (the normalized latent c_KV and the shared rotated RoPE key k_pe; main layers only)
  MHA/token   = cfg.mha_cache_bytes_per_token(2) = heads x (qk_head_dim + v_head_dim) x layers x 2 bytes
                (full per-head K and V: a hypothetical MHA model with the same heads)
  measured    = LatentCache(cfg, slots, max_len, bfloat16, with_mtp=False).nbytes / (slots x max_len),
                (every preset by default: 4 slots x 256 tokens is 72 MB for v3-671b)
  HF measured = bytes of HF transformers' DynamicCache after a bf16 prefill, per token (presets in --hf,
                default tiny and small). transformers 5.x also caches the compressed latent (one "head" of
                kv_lora_rank for keys and qk_rope_head_dim for values) and re-expands it with kv_b_proj on
                every decode step, so the cache size matches MLA's; what differs is the decode compute.
DeepSeek-V3's MLA cache is (512 + 64) x 61 x 2 = 70,272 bytes/token (docs/design/mla.md).

    python benchmarks/kv_cache.py
    python benchmarks/kv_cache.py --measure tiny small v2-lite --slots 2 --max-len 1024
"""

from __future__ import annotations

import argparse
import sys

import torch

import nanoseek

PRESETS = ("tiny", "small", "v2-lite", "v3-671b")
V3_MLA_BYTES = 70_272


def measured_bytes_per_token(cfg: nanoseek.ModelConfig, slots: int, max_len: int) -> float:
    max_len = min(max_len, cfg.max_position_embeddings)
    cache = nanoseek.LatentCache(cfg, slots, max_len, dtype=torch.bfloat16, with_mtp=False)
    return cache.nbytes / (slots * max_len)


def hf_bytes_per_token(name: str, tokens: int = 40, batch: int = 2) -> float:
    """Measured bytes/token of HF's DynamicCache (bf16) after a prefill of batch x tokens."""
    from common import build_pair
    pair = build_pair(name, dtype=torch.bfloat16)
    ids = torch.randint(0, pair.cfg.vocab_size, (batch, tokens))
    with torch.no_grad():
        cache = pair.hf(input_ids=ids, use_cache=True).past_key_values
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return total / (batch * tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--measure", nargs="*", default=list(PRESETS),
                    help="presets whose LatentCache is actually allocated and measured")
    ap.add_argument("--hf", nargs="*", default=["tiny", "small"],
                    help="presets whose HF DynamicCache is measured after a bf16 prefill (needs transformers)")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    args = ap.parse_args()

    print(f"KV cache bytes per token, bf16 (2 bytes/element); measured = LatentCache(slots={args.slots}, "
          f"max_len={args.max_len}, with_mtp=False).nbytes / (slots*max_len)")
    hdr = (f"{'preset':9s} {'layers':>6s} {'heads':>5s} {'c_KV+k_pe':>9s} {'MLA B/tok':>10s} {'measured':>9s} "
           f"{'HF measured':>11s} {'MHA B/tok':>11s} {'MHA/MLA':>8s} {'MLA per 128K seq':>17s} "
           f"{'MHA per 128K seq':>17s}")
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for name in args.presets:
        cfg = nanoseek.ModelConfig.preset(name)
        mla, mha = cfg.kv_cache_bytes_per_token(2), cfg.mha_cache_bytes_per_token(2)
        # independent recomputation of both formulas
        assert mla == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
        assert mha == cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * 2
        measured = ""
        if name in (args.measure or []):
            m = measured_bytes_per_token(cfg, args.slots, args.max_len)
            measured = f"{m:,.0f}"
            if m != mla:
                ok = False
                measured += " (!)"
        hf = ""
        if name in (args.hf or []):
            hf = f"{hf_bytes_per_token(name):,.0f}"
        ctx = 128 * 1024
        print(f"{name:9s} {cfg.num_hidden_layers:6d} {cfg.num_attention_heads:5d} "
              f"{cfg.kv_lora_rank + cfg.qk_rope_head_dim:9d} {mla:10,d} {measured:>9s} {hf:>11s} {mha:11,d} "
              f"{mha / mla:7.1f}x {mla * ctx / 2**30:13.2f} GiB {mha * ctx / 2**30:13.2f} GiB")
    if "v3-671b" in args.presets:
        v3 = nanoseek.ModelConfig.preset("v3-671b").kv_cache_bytes_per_token(2)
        status = "matches" if v3 == V3_MLA_BYTES else "DOES NOT MATCH"
        ok &= v3 == V3_MLA_BYTES
        print(f"\nv3-671b MLA: {v3:,d} bytes/token; expected: {V3_MLA_BYTES:,d} -> {status}")
    if not ok:
        sys.exit("kv_cache: a measured or computed value disagrees with the formula or the V3 figure (marked above)")


if __name__ == "__main__":
    main()
