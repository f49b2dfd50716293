"""Generation: our Engine vs transformers' InternVLForConditionalGeneration.generate, same weights, same run.

Usage: .venv/bin/python bench/generate.py [--dtype fp32|bf16] [--new-tokens 32] [--repeats 3] [--server-rounds 2]
       [--no-server]

Builds a random ~121M-parameter InternVL (InternViT 6x512 + Qwen2 10x768, 224 px tiles of 64 tokens, 16k
vocabulary), saves it in the transformers-native layout with our checkpoint writer and loads it with
``InternVLForConditionalGeneration.from_pretrained``, so both sides run the very same weights. One prompt
with an image (4 tiles + thumbnail = 320 image tokens) goes through our Processor; both engines get the same
``input_ids`` and ``pixel_values`` and decode greedily with no stop token.

Measured (best of N repeats; runs of the two engines interleaved so machine load hits both alike), all
from the same timed runs, by timestamping every step (our engine's per-token events, transformers' streamer):
- TTFT: time from the call to the first generated token (vision + prefill + first pick).
- decode tokens/s: ``batch · (N - 1) / (t_last - t_first)`` for batch 1 and 8 (8 different images, same size).
- server: requests/s of 8 concurrent OpenAI clients against our server, with dynamic batching (batch 8)
  and with batching disabled (batch 1), same model and prompts, rounds of the two servers alternating.
Ratios are ours / transformers speed (> 1: we are faster); the greedy tokens are compared as well.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from PIL import Image

from ivl.config import InternVLConfig, TextConfig, VisionConfig
from ivl.inference.engine import Engine, GenerationConfig, GenerationRequest

VOCAB = 16384


def bench_config() -> InternVLConfig:
    vision = VisionConfig(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048, image_size=224
    )
    text = TextConfig(
        flavour="qwen2",
        vocab_size=VOCAB,
        hidden_size=768,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2560,
        rope_theta=1_000_000.0,
        max_position_embeddings=8192,
    )
    return InternVLConfig(
        vision=vision,
        text=text,
        image_token_id=VOCAB - 7,
        force_image_size=224,
        max_dynamic_patch=4,
        name="bench-110m",
    ).validate()


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((336, 448, 3)) * 255).astype("uint8"))


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Timed:
    """Token ids of one run plus when its first and last tokens appeared (seconds from the call)."""

    def __init__(self, tokens: list[list[int]], ttft: float, last: float, steps: int) -> None:
        self.tokens, self.ttft, self.last, self.steps = tokens, ttft, last, steps

    def decode_tps(self, batch: int) -> float:
        """Tokens per second over the decode steps that follow the first token."""
        return batch * (self.steps - 1) / (self.last - self.ttft)


class Clock:
    """Timestamps generation steps: our engine's per-token events, or transformers' streamer ``put`` calls.

    ``now`` is wall time by default; with ``--clock cpu`` (one thread) it is the calling thread's CPU time,
    which on a machine shared with other jobs measures the work done rather than the share of CPU obtained.
    """

    now = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.start = self.now()
        self.stamps: list[float] = []
        self._prompt_seen = False

    def tick(self) -> None:
        self.stamps.append(self.now() - self.start)

    def put(self, value: torch.Tensor) -> None:  # transformers streamer protocol
        if not self._prompt_seen:  # the first put carries the prompt, not a generated token
            self._prompt_seen = True
            return
        self.tick()

    def end(self) -> None:
        pass

    def timed(self, tokens: list[list[int]], events_per_step: int) -> Timed:
        steps = self.stamps[events_per_step - 1 :: events_per_step]  # the last event of each step
        return Timed(tokens, steps[0], steps[-1], len(steps))


def build(dtype: torch.dtype, workdir: str):
    from transformers import InternVLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from ivl.models.internvl import InternVL, count_parameters
    from ivl.processing.processor import Processor
    from ivl.processing.tokenizer import build_tokenizer

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = bench_config()
    ours = InternVL(config).eval()
    with torch.no_grad():  # a wider init than 0.02 so greedy decoding does not collapse onto one token
        gen = torch.Generator().manual_seed(0)
        for name, p in ours.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ours = ours.to(dtype)
    ours.save_pretrained(workdir, layout="hf")
    hf = InternVLForConditionalGeneration.from_pretrained(workdir, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    tokenizer = build_tokenizer(vocab_size=VOCAB)
    processor = Processor.from_config(tokenizer, config, dtype=dtype)
    return ours, hf, processor, count_parameters(ours)["total"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-rounds", type=int, default=2, help="rounds of 8 concurrent requests per server")
    parser.add_argument("--server-tokens", type=int, default=64, help="max_tokens of each server request")
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: thread CPU time, needs --threads 1"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            parser.error("--clock cpu measures the calling thread only: use it with --threads 1")
        Clock.now = staticmethod(time.thread_time)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    workdir = tempfile.mkdtemp(prefix="ivl-bench-gen-")
    ours, hf, processor, params = build(dtype, workdir)
    engines = {
        "ours": Engine(ours, processor, max_batch_size=8),
        # the same engine without reusing the template prefix's KV: prefill computes every prompt token
        "ours (no prefix reuse)": Engine(ours, processor, max_batch_size=8, prefix_cache=False),
    }
    question = "Describe this image in detail, then list three objects you can see."
    print(
        f"model {params / 1e6:.1f}M params, dtype={args.dtype}, threads={torch.get_num_threads()}, clock={args.clock}, "
        f"new tokens={args.new_tokens}, repeats={args.repeats}"
    )

    def inputs(batch: int):
        encoded = [processor(question, images=[_image(seed)]) for seed in range(batch)]
        ids = torch.cat([e["input_ids"] for e in encoded])
        pixels = torch.cat([e["pixel_values"] for e in encoded])
        return encoded, ids, pixels

    for batch in (1, 8):
        encoded, ids, pixels = inputs(batch)
        mask = torch.ones_like(ids)

        def ours_run(n: int, engine: Engine, encoded=encoded, batch=batch) -> Timed:
            gen = GenerationConfig(max_new_tokens=n, stop_token_ids=[])
            reqs = [GenerationRequest.from_inputs(e, gen) for e in encoded]
            clock = Clock()
            out = engine.run(reqs, on_event=lambda ev: clock.tick())
            return clock.timed([r.token_ids for r in out], batch)

        def hf_run(n: int, ids=ids, pixels=pixels, mask=mask) -> Timed:
            clock = Clock()
            with torch.inference_mode():
                out = hf.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    pixel_values=pixels,
                    max_new_tokens=n,
                    do_sample=False,
                    streamer=clock,  # put() is called once with the prompt, then once per step
                )
            return clock.timed(out[:, ids.shape[1] :].tolist(), 1)

        runners = {name: (lambda n, e=e: ours_run(n, e)) for name, e in engines.items()}
        runners["transformers"] = hf_run
        for run in runners.values():  # warm-up (also computes the shared prefix once)
            run(2)
        runs: dict[str, list[Timed]] = {name: [] for name in runners}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for name, run in runners.items():
                runs[name].append(run(args.new_tokens))
        # best of N: load from other processes only ever adds time
        ttft = {name: min(t.ttft for t in r) for name, r in runs.items()}
        tps = {name: max(t.decode_tps(batch) for t in r) for name, r in runs.items()}
        reference = runs["transformers"][0].tokens
        shared = engines["ours"].shared_prefix_length
        print(f"batch {batch}: prompt {ids.shape[1]} tokens, of which {shared} a reusable template prefix", flush=True)
        for name in runners:
            agree = np.mean(
                [np.mean(np.array(x) == np.array(y)) for x, y in zip(runs[name][0].tokens, reference, strict=True)]
            )
            print(
                f"  {name:24s} TTFT {ttft[name] * 1e3:8.1f} ms ({ttft['transformers'] / ttft[name]:.2f}x)   "
                f"decode {tps[name]:7.1f} tok/s ({tps[name] / tps['transformers']:.2f}x)   "
                f"greedy tokens equal to transformers {agree:.0%}",
                flush=True,
            )
    if not args.no_server:
        del hf
        rps = server_throughput(ours, processor, args.server_rounds, args.server_tokens)
        print(
            f"server, 8 concurrent clients, {args.server_rounds} rounds, {args.server_tokens} tokens per answer: "
            f"dynamic batching {rps['batched']:.3f} req/s, one at a time {rps['serial']:.3f} req/s, "
            f"speed-up {rps['batched'] / rps['serial']:.2f}x"
        )


class _Server:
    """Our OpenAI server for ``model`` on an ephemeral port, in a thread."""

    def __init__(self, model, processor, max_batch: int) -> None:
        import openai
        import uvicorn

        from ivl.inference.server import create_app

        app = create_app(Engine(model, processor, max_batch_size=max_batch), model_name="bench", batch_window_s=0.02)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=900)

    def ask(self, url: str, max_tokens: int) -> None:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
        self.client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": content}], max_tokens=max_tokens
        )

    def round(self, urls: list[str], max_tokens: int) -> float:
        """Seconds for len(urls) concurrent clients to get one answer each."""
        start = time.perf_counter()
        with ThreadPoolExecutor(len(urls)) as pool:
            list(pool.map(lambda u: self.ask(u, max_tokens), urls))
        return time.perf_counter() - start

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def server_throughput(model, processor, rounds: int, max_tokens: int) -> dict[str, float]:
    """Requests/s of 8 concurrent OpenAI clients (one image prompt each), dynamic batching vs one at a time.

    Rounds of the two servers alternate, so machine load hits both alike.
    """
    servers = {"batched": _Server(model, processor, 8), "serial": _Server(model, processor, 1)}
    urls = [_png_data_url(_image(100 + i)) for i in range(8)]
    try:
        for server in servers.values():
            server.ask(urls[0], 2)  # warm-up
        seconds = {name: 0.0 for name in servers}
        for _ in range(rounds):
            for name, server in servers.items():
                seconds[name] += server.round(urls, max_tokens)
        return {name: rounds * len(urls) / t for name, t in seconds.items()}
    finally:
        for server in servers.values():
            server.close()


if __name__ == "__main__":
    main()
