"""InternViT (+ unshuffle + mlp1) speed vs transformers' InternVLVisionModel on the same random weights.

Usage: .venv/bin/python bench/bench_vision.py [--dtype bf16|fp32] [--tiles 2] [--layers 4]
Full InternViT-300M width (D=1024, 16 heads, 448 px tiles, 1025 tokens) with fewer layers to keep it short.
Prints ms per call and the ratio ours / transformers (< 1 means we are faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from ivl.config import VisionConfig
from ivl.models.internvit import InternViT


def _to_hf(sd: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        k = key.replace("embeddings.class_embedding", "embeddings.cls_token")
        k = k.replace("embeddings.position_embedding", "embeddings.position_embeddings")
        k = k.replace("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection.")
        k = k.replace("encoder.layers.", "encoder.layer.").replace(".attn.proj.", ".attention.projection_layer.")
        k = k.replace(".norm1.", ".layernorm_before.").replace(".norm2.", ".layernorm_after.")
        k = k.replace(".ls1", ".lambda_1").replace(".ls2", ".lambda_2")
        if ".attn.qkv." in k:
            for name, part in zip(("q", "k", "v"), value.split(dim), strict=True):
                out[k.replace(".attn.qkv.", f".attention.{name}_proj.")] = part
            continue
        out[k] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    config = VisionConfig(num_hidden_layers=args.layers)
    ours = InternViT(config).to(dtype).eval()
    hf = InternVLVisionModel(
        InternVLVisionConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            attention_bias=True,
        )
    )
    hf.config._attn_implementation = "sdpa"
    hf.load_state_dict(_to_hf(ours.state_dict(), config.hidden_size))
    hf = hf.to(dtype).eval()
    pixels = torch.randn(args.tiles, 3, 448, 448, dtype=dtype)

    def run_ours():
        return ours(pixels)

    def run_hf():
        return hf(pixels).last_hidden_state[:, 1:]

    with torch.inference_mode():
        diff = (run_ours().float() - run_hf().float()).abs().max().item()
        run_ours(), run_hf()
        t_ours, t_hf = [], []
        for _ in range(args.repeats):  # interleaved: background load hits both alike
            for fn, times in ((run_ours, t_ours), (run_hf, t_hf)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    a, b = statistics.median(t_ours) * 1e3, statistics.median(t_hf) * 1e3
    print(
        f"dtype={args.dtype} tiles={args.tiles} layers={args.layers} threads={torch.get_num_threads()} max|diff|={diff:.2e}"
    )
    print(f"vision forward  ours {a:8.1f} ms   transformers {b:8.1f} ms   ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
