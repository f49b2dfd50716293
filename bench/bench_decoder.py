"""Decoder speed vs transformers' Qwen2ForCausalLM (same random weights, same run): prefill and cached decode.

Usage: .venv/bin/python bench/bench_decoder.py [--dtype bf16|fp32] [--prompt 512] [--steps 32]
Prints ms per call for both and the ratio ours / transformers (< 1 means we are faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from ivl.config import TextConfig
from ivl.models.cache import KVCache
from ivl.models.decoder import CausalLM


def _timed_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median ms of a and b, calls interleaved so that load from other processes hits both alike."""
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a) * 1e3, statistics.median(times_b) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    config = TextConfig(
        flavour="qwen2",
        vocab_size=16384,
        hidden_size=896,
        num_hidden_layers=4,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        rope_theta=1_000_000.0,
        attention_bias=True,
    )
    ours = CausalLM(config).to(dtype).eval()
    hf = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            tie_word_embeddings=False,
        )
    )
    hf.config._attn_implementation = "sdpa"
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf = hf.to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt))

    def ours_prefill():
        return ours(ids, logits_to_keep=1).logits

    def hf_prefill():
        return hf(ids, logits_to_keep=1, use_cache=False).logits

    def ours_decode():
        cache = KVCache.allocate(config, args.batch, args.prompt + args.steps, dtype=dtype, device="cpu")
        nxt = ours(ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        out = [nxt]
        for _ in range(args.steps - 1):
            nxt = ours(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
        return torch.cat(out, 1)

    def hf_decode():
        cache = DynamicCache(config=hf.config)
        nxt = hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        out = [nxt]
        for _ in range(args.steps - 1):
            nxt = hf(nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
        return torch.cat(out, 1)

    with torch.inference_mode():
        same = torch.equal(ours_decode(), hf_decode())
        print(
            f"dtype={args.dtype} batch={args.batch} prompt={args.prompt} steps={args.steps} threads={torch.get_num_threads()}"
        )
        print(f"greedy tokens identical: {same}")
        for name, a, b in (("prefill", ours_prefill, hf_prefill), ("prefill+decode", ours_decode, hf_decode)):
            t_ours, t_hf = _timed_pair(a, b, args.repeats)
            print(f"{name:15s} ours {t_ours:8.1f} ms   transformers {t_hf:8.1f} ms   ratio {t_ours / t_hf:.2f}")


if __name__ == "__main__":
    main()
