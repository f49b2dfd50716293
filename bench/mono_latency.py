"""Mono-InternVL latency, two comparisons in one run on the same machine, prompt and image.

(a) Time to first token: Mono-InternVL (patch stem + mlp1 + decoder with visual experts) against a modular
    InternVL with the same decoder (shared weights, no experts) and an InternViT in the proportion of
    InternViT-300M to InternLM2-1.8B. Scaled down for a CPU by depth only: both towers keep their real widths
    (ViT 1024 / 16 heads / MLP 4096; LLM 2048 / 16 heads / 8 KV / FFN 8192, vocabulary 92,553) and get the
    same number of layers (24 each in the real pair), so every per-layer cost ratio is the real one.
    TTFT = what the engine's prefill does: vision (chunks of tiles) -> scatter -> decoder prefill into a KV
    cache -> logits of the last token -> argmax. Goal: Mono <= 0.45x the modular model (paper: -67% vs
    InternVL-1.5).
(b) Prefill of the Mono decoder with routed experts (each token through exactly one FFN: gather -> FFN ->
    scatter; ivl) against the dense blend (both FFNs on every token, mixed by the mask; the original
    official code), same inputs. Goal: routed >= 1.6x faster.

Rounds alternate between the two sides so that machine noise hits both alike; medians are reported.

    .venv/bin/python bench/mono_latency.py                        # CPU, bf16, 4+4 layers, 12 tiles + thumbnail
    .venv/bin/python bench/mono_latency.py --layers 2 --max-tiles 6 --rounds 3
    .venv/bin/python bench/mono_latency.py --device cuda --layers 24   # full depth on a GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
import types
from collections.abc import Callable

import torch

from ivl.config import InternVLConfig, MonoConfig, VisionConfig
from ivl.models.cache import KVCache
from ivl.models.decoder import CausalLM, Routing, init_weights
from ivl.models.internvl import InternVL
from ivl.models.mono import MonoInternVL
from ivl.processing.tiling import plan_tiles

IMAGE_TOKEN = 92546


def build_models(
    layers: int, vit_layers: int, device: torch.device, dtype: torch.dtype
) -> tuple[MonoInternVL, InternVL]:
    """Mono-InternVL-2B and InternVL-1.5-2B shapes at reduced depth; the modular model reuses Mono's decoder."""
    torch.manual_seed(0)
    mono_cfg = MonoConfig()
    mono_cfg.text.num_hidden_layers = layers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the benchmark dtype (halves peak memory for bf16)
    try:
        mono = MonoInternVL(mono_cfg).to(device).eval()
        plain_text = dataclasses.replace(mono_cfg.text, visual_experts=False)
        modular_cfg = InternVLConfig(
            vision=VisionConfig(num_hidden_layers=vit_layers),  # InternViT-300M widths
            text=plain_text,
            image_token_id=IMAGE_TOKEN,
            template="internlm2-chat",
        )
        with torch.device("meta"):
            modular = InternVL(modular_cfg)
            plain = CausalLM(plain_text)
        shared = {k: v for k, v in mono.language_model.state_dict().items() if ".mlp_visual." not in k}
        plain.load_state_dict(shared, assign=True)  # the very same decoder tensors, without the experts
        modular.language_model = plain
        for module in (modular.vision_model, modular.mlp1):
            module.to_empty(device=device)
            init_weights(module)
        modular.vision_model.embeddings.reset_parameters()
        for layer in modular.vision_model.encoder.layers:  # layer scale as in a trained InternViT
            for name in ("ls1", "ls2"):
                if hasattr(layer, name):
                    getattr(layer, name).data.fill_(0.1)
    finally:
        torch.set_default_dtype(previous)
    return mono, modular.eval()


def prefill_macs(mono: InternVLConfig, modular: InternVLConfig, tiles: int, tokens: int) -> tuple[float, float]:
    """Multiply-accumulates of a TTFT for each model, from the shapes (the bound a perfect kernel would hit)."""

    def decoder(cfg) -> float:
        t, h, d = cfg.text, cfg.text.hidden_size, cfg.text.resolved_head_dim
        per_token = h * (t.num_attention_heads + 2 * t.num_key_value_heads) * d + h * h + 3 * h * t.intermediate_size
        causal_attention = h * tokens * tokens  # q.k and p.v over the causal half
        return t.num_hidden_layers * (tokens * per_token + causal_attention) + h * t.vocab_size

    def stem_and_mlp1(cfg) -> float:
        c, h, patches = cfg.vision.hidden_size, cfg.text.hidden_size, (448 // 14) ** 2
        return tiles * (patches * 3 * 14 * 14 * c + (patches // 4) * (4 * c * h + h * h))

    vit = modular.vision
    n, c = 1 + (448 // 14) ** 2, vit.hidden_size
    encoder = tiles * vit.num_hidden_layers * n * (4 * c * c + 2 * c * vit.intermediate_size + 2 * n * c)
    return stem_and_mlp1(mono) + decoder(mono), stem_and_mlp1(modular) + encoder + decoder(modular)


def prompt_ids(tiles: int, text_tokens: int, device: torch.device) -> torch.Tensor:
    """``<s>`` + system/question text + ``<img>`` + 256 x tiles ``<IMG_CONTEXT>`` + ``</img>`` + question."""
    gen = torch.Generator().manual_seed(1)
    head = torch.randint(3, 92000, (text_tokens // 2,), generator=gen).tolist()
    tail = torch.randint(3, 92000, (text_tokens - text_tokens // 2,), generator=gen).tolist()
    ids = [1, *head, IMAGE_TOKEN - 2, *[IMAGE_TOKEN] * (256 * tiles), IMAGE_TOKEN - 1, *tail]
    return torch.tensor([ids], device=device)


@torch.inference_mode()
def first_token(model: InternVL, ids: torch.Tensor, pixels: torch.Tensor, chunk: int = 64) -> int:
    """The engine's prefill: vision in chunks, decoder prefill into a fresh cache, argmax of the last logits."""
    features = torch.cat([model.encode_images(c) for c in pixels.split(chunk)])
    cache = KVCache.allocate(model.config.text, 1, ids.shape[1] + 1, dtype=pixels.dtype, device=ids.device)
    logits = model(ids, image_features=features, cache=cache, logits_to_keep=1).logits[:, -1]
    return int(logits.argmax(-1))


def dense_blend(layer: torch.nn.Module) -> Callable:
    """The original official formulation: both FFNs on every token, mixed by the 0/1 visual mask."""

    def feed_forward(self: torch.nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        mask = torch.zeros(x.shape[0] * x.shape[1], 1, dtype=x.dtype, device=x.device)
        if routing.mode == "visual":
            mask.fill_(1)
        elif routing.mode == "mixed":
            mask[routing.visual_index] = 1
        mask = mask.view(x.shape[0], x.shape[1], 1)
        return (1 - mask) * self.mlp(x) + mask * self.mlp_visual(x)

    return types.MethodType(feed_forward, layer)


@torch.inference_mode()
def prefill(model: MonoInternVL, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.language_model(inputs_embeds=embeds, visual_mask=mask, logits_to_keep=1).logits


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(
    a: Callable[[], object], b: Callable[[], object], rounds: int, device: torch.device
) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b`` over ``rounds`` alternating runs (after one warm-up of each)."""
    a(), b()
    times_a, times_b = [], []
    for i in range(rounds):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t1, t2 = timed(first, device), timed(second, device)
        times_a.append(t1 if i % 2 == 0 else t2)
        times_b.append(t2 if i % 2 == 0 else t1)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (24 in Mono-InternVL-2B)")
    parser.add_argument("--vit-layers", type=int, default=None, help="InternViT layers (default: = --layers)")
    parser.add_argument("--image", default="1344x1008", help="image size WxH that picks the tile grid")
    parser.add_argument("--max-tiles", type=int, default=12, help="max dynamic tiles (official inference: 12)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens around the image")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    width, height = (int(v) for v in args.image.lower().split("x"))
    plan = plan_tiles((width, height), max_num=args.max_tiles)
    tiles = plan.num_tiles
    vit_layers = args.vit_layers or args.layers

    mono, modular = build_models(args.layers, vit_layers, device, dtype)
    ids = prompt_ids(tiles, args.text_tokens, device)
    pixels = torch.randn(tiles, 3, 448, 448, device=device, dtype=dtype)
    print(
        f"device {device} ({torch.get_num_threads()} threads), {args.dtype}; image {width}x{height} -> "
        f"{plan.grid[0]}x{plan.grid[1]} tiles + thumbnail = {tiles} tiles, prompt {ids.shape[1]} tokens "
        f"({256 * tiles} visual); decoder 2048 wide x {args.layers} layers, InternViT 1024 wide x {vit_layers} layers"
    )

    # (a) time to first token
    t_mono, t_modular = alternate(
        lambda: first_token(mono, ids, pixels), lambda: first_token(modular, ids, pixels), args.rounds, device
    )
    ratio = t_mono / t_modular
    macs_mono, macs_modular = prefill_macs(mono.config, modular.config, tiles, ids.shape[1])
    full_mono, full_modular = copy.deepcopy(mono.config), copy.deepcopy(modular.config)
    full_mono.text.num_hidden_layers = full_modular.text.num_hidden_layers = full_modular.vision.num_hidden_layers = 24
    full = prefill_macs(full_mono, full_modular, tiles, ids.shape[1])
    print(f"(a) TTFT  mono-internvl {t_mono * 1e3:9.1f} ms   modular internvl {t_modular * 1e3:9.1f} ms")
    print(f"    ratio mono/modular = {ratio:.3f}x  (goal <= 0.45x; {1 - ratio:.0%} lower)")
    print(
        f"    arithmetic: {macs_mono / 1e9:.0f} vs {macs_modular / 1e9:.0f} GMAC -> ratio {macs_mono / macs_modular:.3f}x "
        f"at equal speed per MAC; {full[0] / full[1]:.3f}x for the real 2B pair (24 + 24 layers)"
    )

    # (b) decoder prefill: routed experts vs dense blend, same embeddings and mask
    with torch.inference_mode():
        embeds = mono.embed(ids, pixel_values=pixels)
    mask = ids == IMAGE_TOKEN
    layers = list(mono.language_model.model.layers)

    def routed() -> torch.Tensor:
        return prefill(mono, embeds, mask)

    def dense() -> torch.Tensor:
        for layer in layers:
            layer.feed_forward = dense_blend(layer)  # instance attribute shadows the routed method
        try:
            return prefill(mono, embeds, mask)
        finally:
            for layer in layers:
                del layer.feed_forward

    delta = (routed().float() - dense().float()).abs().max().item()
    t_routed, t_dense = alternate(routed, dense, args.rounds, device)
    speedup = t_dense / t_routed
    print(
        f"(b) prefill  routed {t_routed * 1e3:9.1f} ms   dense blend {t_dense * 1e3:9.1f} ms   max|dlogit| {delta:.2e}"
    )
    print(f"    speed-up routed vs blend = {speedup:.2f}x  (goal >= 1.6x)")


if __name__ == "__main__":
    main()
