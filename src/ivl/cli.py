"""The `ivl` command line. Each command imports its heavy modules inside the function, so `ivl --help` is instant.

Helpers adding a command: put the work in a library function and keep the command a thin wrapper here.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
    help="InternVL-2.5 and Mono-InternVL toolkit.",
)


def main() -> None:
    """Entry point: typed ivl errors become one readable line and exit code 2, not a traceback."""
    from ivl.errors import IvlError

    try:
        app()
    except IvlError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


@app.command()
def version() -> None:
    """Print the ivl version."""
    from ivl import __version__

    typer.echo(__version__)


# ---- commands are registered below, one block per command ----


mono_app = typer.Typer(no_args_is_help=True, help="Mono-InternVL (encoder-free) tools.")
app.add_typer(mono_app, name="mono")


@mono_app.command("init")
def mono_init_command(
    llm: str = typer.Option(..., "--llm", help="plain InternLM2 or Qwen2 checkpoint (config.json, weights, tokenizer)"),
    out: str = typer.Option(..., "--out", help="directory for the Mono-InternVL checkpoint (official layout)"),
    vision_width: int = typer.Option(1024, "--vision-width", help="patch-embedding width C (Mono-InternVL-2B: 1024)"),
    seed: int = typer.Option(0, help="seed of the fresh patch embedding and mlp1"),
    dtype: str | None = typer.Option(None, help="float32 or bfloat16 (default: the LLM's dtype)"),
    template: str | None = typer.Option(None, help="chat template (default: internlm2-chat, Qwen2: internvl2_5)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run the LLM's own tokenizer code"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="largest safetensors shard"),
) -> None:
    """Build a Mono-InternVL from a plain LLM: visual experts copied from the text FFN, new patch embedding + mlp1."""
    from ivl.mono_init import init_mono_from_llm

    report = init_mono_from_llm(
        llm, out, vision_width=vision_width, seed=seed, dtype=dtype, template=template,
        trust_remote_code=trust_remote_code, max_shard_size=max_shard_size,
    )  # fmt: skip
    added = ", ".join(report.added_tokens) or "none (already present)"
    typer.echo(f"source {report.source_architecture}; added tokens: {added}; vocabulary {report.vocab_size}")
    typer.echo(
        f"wrote Mono-InternVL to {report.out_dir}: {report.parameters:,} parameters, vision width "
        f"{report.vision_width}, <IMG_CONTEXT> = {report.image_token_id}, {str(report.dtype).removeprefix('torch.')}"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="recipe YAML (see recipes/); then key=value overrides, e.g. optim.lr=1e-5"),
) -> None:
    """Run a training recipe (single process, or under torchrun with FSDP2); resumes from the latest checkpoint."""
    from ivl.training.recipe import load_recipe
    from ivl.training.trainer import train as run_training

    result = run_training(load_recipe(recipe, list(ctx.args)))
    if result.final_dir is not None:
        typer.echo(f"final model: {result.final_dir}")
    if result.adapter_dir is not None:
        typer.echo(f"LoRA adapter: {result.adapter_dir} (merge with `ivl merge-lora`)")
    typer.echo(f"{result.steps} steps ({result.stopped}), {result.seconds:.1f} s; outputs in {result.output_dir}")


@app.command()
def transplant(
    vision_from: str = typer.Option(..., "--vision-from", help="checkpoint whose (Stage-1.5) vision encoder to take"),
    into: str = typer.Option(..., "--into", help="checkpoint that receives it (official layout)"),
    out: str = typer.Option(..., "--out", help="directory to write the combined checkpoint to"),
    with_mlp: bool = typer.Option(False, "--with-mlp", help="also take mlp1 (only if both LLMs have the same width)"),
) -> None:
    """Progressive scaling: move a vision encoder (optionally its mlp1) into another model, checking shapes."""
    from ivl.training.transplant import transplant as run_transplant

    report = run_transplant(vision_from, into, out, with_mlp=with_mlp)
    typer.echo(f"wrote {report.out_dir}: {report.replaced} tensors from {vision_from}, {report.kept} kept from {into}")


@app.command("merge-lora")
def merge_lora_command(
    base: str = typer.Option(..., "--base", help="base checkpoint directory the adapter was trained on"),
    adapter: str = typer.Option(..., "--adapter", help="LoRA adapter directory (adapter_config.json + weights)"),
    out: str = typer.Option(..., "--out", help="directory for the merged checkpoint (official layout)"),
) -> None:
    """Fold a LoRA adapter into its base model and write a plain checkpoint (outputs equal base + adapter)."""
    from ivl.checkpoint.io import load_model, save_model
    from ivl.training.lora import load_adapter, merge_lora

    model = load_model(base)
    dtype = next(model.parameters()).dtype
    model = merge_lora(load_adapter(model.float(), adapter)).to(dtype)
    save_model(model, out, layout="official", copy_files_from=base)
    typer.echo(f"wrote merged checkpoint to {out}")


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="directory for the world, checkpoints and report.json"),
    model: str = typer.Option("internvl", "--model", help="internvl (ViT-MLP-LLM) or mono (encoder-free)"),
    quick: bool = typer.Option(False, "--quick", help="a short run (about two minutes) for smoke tests"),
    seed: int = typer.Option(0, help="seed of the synthetic world and of the training"),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: all cores)"),
    minutes: float | None = typer.Option(
        None, help="finish within this many minutes by shortening Stage 2 to its measured speed (default 15; 0: off)"
    ),
) -> None:
    """The whole pipeline on a tiny model, on CPU: data, tokenizer, LM warm-up, Stage 1/1.5/2, evaluation, chat."""
    import dataclasses

    from ivl.demo import FULL, QUICK, run_demo

    settings = None
    if minutes is not None:
        if minutes < 0:
            raise typer.BadParameter(f"--minutes must be >= 0, got {minutes}")
        settings = dataclasses.replace(QUICK if quick else FULL, minutes=minutes or None)
    run_demo(out, model=model, quick=quick, seed=seed, threads=threads, settings=settings)


@app.command("chat")
def chat_command(
    question: str | None = typer.Argument(None, help="the question; omit it for an interactive session"),
    model: str = typer.Option(..., "--model", help="checkpoint directory (weights, config.json, tokenizer)"),
    image: list[str] = typer.Option([], "--image", help="image file (repeat for several images)"),
    video: str | None = typer.Option(None, "--video", help="video file"),
    max_tiles: int | None = typer.Option(None, "--max-tiles", help="max dynamic tiles per image (default: config)"),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", help="answer length limit in tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy (the official default); > 0 samples"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling threshold"),
    seed: int | None = typer.Option(None, help="seed for sampling"),
    system: str | None = typer.Option(None, "--system", help="system message (default: the template's)"),
    draw_boxes: str | None = typer.Option(None, "--draw-boxes", help="draw grounding boxes of the answer to this PNG"),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 (default: checkpoint dtype)"),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cpu)"),
) -> None:
    """Chat with a model: one question, or an interactive session (/image PATH, /reset, /exit)."""
    from ivl.inference.chat import run_cli_chat
    from ivl.inference.engine import GenerationConfig

    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature, top_p=top_p, seed=seed
    )
    run_cli_chat(
        model,
        question,
        images=image,
        video=video,
        max_tiles=max_tiles,
        generation=generation,
        draw_boxes=draw_boxes,
        dtype=dtype,
        device=device,
        system_message=system,
    )


@app.command("serve")
def serve_command(
    model: str = typer.Option(..., "--model", help="checkpoint directory (weights, config.json, tokenizer)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="IVL_API_KEY", help="require this Bearer key"),
    media_root: str | None = typer.Option(None, "--media-root", help="allow local image paths below this folder"),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="fetch http(s) image URLs (off by default)"),
    model_name: str | None = typer.Option(None, "--model-name", help="name clients use (default: folder name)"),
    max_batch_size: int = typer.Option(16, "--max-batch-size", help="sequences decoded together"),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="largest max_tokens a request may ask for"),
    max_images: int = typer.Option(8, "--max-images", help="images per request"),
    max_tiles: int = typer.Option(48, "--max-tiles", help="tiles per request (all images)"),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="request body limit in MiB"),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 (default: checkpoint dtype)"),
    device: str | None = typer.Option(None, help="cpu, cuda ... (default: cpu)"),
) -> None:
    """Serve a model over the OpenAI chat-completions protocol (POST /v1/chat/completions, GET /v1/models)."""
    from ivl.inference.server import ServerLimits, serve

    limits = ServerLimits(
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_images=max_images,
        max_tiles=max_tiles,
        max_tokens=max_tokens,
        default_max_tokens=min(1024, max_tokens),
    )
    serve(
        model,
        host=host,
        port=port,
        api_key=api_key,
        media_root=media_root,
        allow_remote=allow_remote,
        model_name=model_name,
        dtype=dtype,
        device=device,
        max_batch_size=max_batch_size,
        limits=limits,
    )


@app.command()
def convert(
    src: str = typer.Argument(..., help="checkpoint directory to read (official or transformers layout)"),
    dst: str = typer.Argument(..., help="directory to write (replaced atomically if it is a checkpoint)"),
    layout: str = typer.Option(..., "--layout", help="target layout: official (internvl_chat) or hf (internvl)"),
    dtype: str | None = typer.Option(None, help="cast weights: float32, bfloat16 or float16 (default: keep)"),
    max_shard_size: str | None = typer.Option(None, help="re-shard, e.g. 5GB (default: keep the source shards)"),
) -> None:
    """Convert a checkpoint between the official and the transformers-native layout, shard by shard."""
    from ivl.checkpoint.io import convert_checkpoint

    out = convert_checkpoint(src, dst, layout, dtype=dtype, max_shard_size=max_shard_size)
    typer.echo(f"wrote {layout} checkpoint to {out}")


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", help="checkpoint directory (official or transformers layout)"),
    task: str = typer.Option(..., "--task", help="NAME=FILE, FILE (settings from its name) or a synthetic world"),
    out: str = typer.Option("", "--out", help="output folder (default: eval_out/<model>/<task>[-cot][-voteK])"),
    split: str = typer.Option("test", help="split of a synthetic world"),
    batch_size: int = typer.Option(8, help="items per engine call"),
    cot: bool = typer.Option(False, "--cot", help="chain-of-thought prompt; the final 'Answer: X' line is scored"),
    vote: int = typer.Option(1, help="sample K replies (temperature > 0) and score the majority answer"),
    temperature: float = typer.Option(0.7, help="sampling temperature for --vote"),
    top_p: float = typer.Option(0.95, help="nucleus sampling for --vote"),
    seed: int = typer.Option(0, help="base seed; each item and sample derives its own"),
    max_new_tokens: int | None = typer.Option(None, help="override the task's token budget"),
    max_tiles: int | None = typer.Option(None, help="override the task's tiles per image"),
    limit: int | None = typer.Option(None, help="only the first N items (smoke test)"),
    shard: str = typer.Option("0/1", help="run shard i/n of the items (merge later with --merge n)"),
    procs: int = typer.Option(1, help="run N shard processes (one GPU each when available), then merge"),
    merge: int = typer.Option(0, help="merge the predictions of N finished shards and score them"),
    overwrite: bool = typer.Option(False, help="discard earlier predictions instead of resuming"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Run a model over a benchmark and score it (resumable; shardable over processes/GPUs)."""
    from pathlib import Path

    from rich.console import Console

    from ivl.evaluation import runner

    task_name = Path(task.split("=")[-1].rstrip("/")).stem
    mode = ("-cot" if cot else "") + (f"-vote{vote}" if vote > 1 else "")
    out_dir = out or str(Path("eval_out") / Path(model.rstrip("/")).name / f"{task_name}{mode}")
    count = merge or procs
    options = runner.EvalOptions(
        benchmark=task, out_dir=out_dir, split=split, model=str(Path(model).resolve()), batch_size=batch_size,
        chain_of_thought=cot, vote=vote, temperature=temperature, top_p=top_p, seed=seed,
        max_new_tokens=max_new_tokens, max_tiles=max_tiles, limit=limit,
        shard=(0, count) if count > 1 else runner.parse_shard(shard), overwrite=overwrite, progress=progress,
    ).validate()  # fmt: skip
    console = Console()
    if procs > 1 and not merge:
        args = runner.shard_args(options, model=model, device=device, dtype=dtype)
        gpus = runner.visible_gpu_count() if device in ("auto", "cuda") else 0
        runner.launch_shards(runner.plan_shards(args, procs, gpus), log=console.print)
    if procs > 1 or merge:
        results = runner.merge_shards(options)
    else:
        predictor = runner.load_engine_predictor(
            model, device=device, dtype=dtype, max_batch_size=batch_size * max(1, vote)
        )
        results = runner.evaluate(predictor, options)
        if results is None:
            index, n = options.shard
            console.print(f"shard {index}/{n} done: predictions in {out_dir}; merge with --merge {n}")
            return
    console.print(runner.format_report(results))
    console.print(f"results: {Path(out_dir) / runner.RESULTS}")


@app.command("filter")
def filter_command(
    config: str | None = typer.Argument(None, help="filter config YAML (inputs, rules, scorer; see docs/formats.md)"),
    output: str | None = typer.Option(None, "--output", "-o", help="output folder (overrides output_dir)"),
    workers: int | None = typer.Option(None, help="worker processes for the model-free rules"),
    shard: str | None = typer.Option(None, help="run shard i/n of every input (byte ranges cut at line starts)"),
    restart: bool = typer.Option(False, help="discard a previous run in the output folder instead of resuming"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar with records/s"),
    merge: list[str] | None = typer.Option(None, "--merge", help="shard output folder to merge into --output (repeat)"),
) -> None:
    """Filter official-format JSONL into kept/rejected/review.jsonl with repetition, heuristic and LLM rules."""
    from pathlib import Path

    from ivl.errors import ConfigError
    from ivl.filtering.pipeline import format_summary, merge_outputs, run_filter

    if merge:
        if not output:
            raise ConfigError("--merge needs --output, the folder to write the merged outputs and summary to")
        summary = merge_outputs(merge, output)
        typer.echo(format_summary(summary))
        typer.echo(f"merged {len(merge)} shard folder(s) into {Path(output).resolve()}")
        return
    if not config:
        raise ConfigError("give a filter config YAML, or --merge shard folders with --output")
    from ivl.filtering.config import load_filter_config

    cfg = load_filter_config(config, output_dir=output, workers=workers, shard=shard)
    summary = run_filter(cfg, restart=restart, progress=progress)
    typer.echo(format_summary(summary))
    typer.echo(f"outputs in {cfg.output_dir}: kept.jsonl rejected.jsonl review.jsonl scores.jsonl summary.json")


@app.command()
def synth(
    out: str = typer.Option(..., "--out", help="directory to write the world to"),
    seed: int = typer.Option(0, help="same seed, same bytes"),
    train: int = typer.Option(1000, help="train records per task"),
    val: int = typer.Option(100, help="val records per task"),
    test: int = typer.Option(200, help="test records per task"),
    tasks: str = typer.Option("", help="comma-separated subset of tasks (default: all)"),
    min_size: int = typer.Option(56, help="smallest long side of an image, px"),
    max_size: int = typer.Option(224, help="largest long side of an image, px"),
    follow_ups: int = typer.Option(0, help="up to this many further questions per train record (same media)"),
    absolute_paths: bool = typer.Option(False, help="write absolute root/annotation paths in the meta files"),
    overwrite: bool = typer.Option(False, help="replace an existing synthetic world in --out"),
) -> None:
    """Generate the seeded synthetic visual world (train/val/test) in the official meta + JSONL format."""
    from ivl.data.synthetic import generate_world

    summary = generate_world(
        out,
        seed=seed,
        n_train=train,
        n_val=val,
        n_test=test,
        image_size_range=(min_size, max_size),
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] or None,
        follow_ups=follow_ups,
        absolute_paths=absolute_paths,
        overwrite=overwrite,
    )
    for split, per_task in summary.counts.items():
        if per_task:
            listing = " ".join(f"{t}={n}" for t, n in per_task.items())
            typer.echo(f"{split}: {sum(per_task.values())} records  {listing}")
    typer.echo("chance: " + " ".join(f"{t}={c:.3f}" for t, c in summary.chance.items()))
    typer.echo(f"wrote {summary.n_files} files to {summary.out_dir}")


@app.command()
def info(
    model: str = typer.Argument(..., help="preset name (e.g. internvl2_5-8b, tiny) or checkpoint directory"),
    context: int = typer.Option(8192, help="tokens of KV cache to budget for inference"),
    gpus: int = typer.Option(1, help="ranks that shard training state (FSDP)"),
) -> None:
    """Parameter counts per component and memory for inference and training."""
    from ivl.info import print_info

    print_info(model, context_tokens=context, gpus=gpus)


if __name__ == "__main__":  # pragma: no cover
    main()
