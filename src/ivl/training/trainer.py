"""The staged trainer: one readable loop from recipe to checkpoint (torchtune style).

    setup: process group → model (preset or checkpoint) → LoRA → freeze plan → new-token init → device,
           gradient checkpointing, FSDP2 → AdamW + cosine schedule → packed data streams → resume
    loop:  A micro-batches per rank → exact global loss normalisation → backward → clip → step → log
           → checkpoint (DCP, atomic) and loss curve every ``save_steps``
    end:   final checkpoint, final model in the official layout (+ tokenizer/processor), loss curve

Data: the global batch of a step is W·A packs (W ranks, A micro-batches each). Pack slot k = rank·A + a
reads its own shard ``k`` of ``W·A`` of the mixture, so the global batch does not depend on how it is split
over ranks and accumulation steps: 1 process × 2 micro-batches trains on exactly the batches of 2 ranks × 1.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivl.errors import ConfigError
from ivl.processing.tokenizer import load_tokenizer
from ivl.training import distributed as D
from ivl.training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from ivl.training.loss import IGNORE_INDEX, global_weight_sum, normalised_loss, weighted_cross_entropy
from ivl.training.metrics import LOSS_CURVE, METRICS_FILE, MetricsLog, ProgressBar, Throughput, plot_loss_curve
from ivl.training.optim import build_optimizer, cosine_schedule, resolve_warmup, respan_cosine
from ivl.training.recipe import Recipe, save_recipe
from ivl.training.stages import (
    FreezePlan,
    apply_freeze_plan,
    format_trainable,
    init_new_token_rows,
    plan_for,
    set_train_mode,
    trainable_parameters,
)
from ivl.training.time_budget import TimeBudget

FINAL_DIR = "final"
ADAPTER_DIR = "final_adapter"


@dataclass
class TrainResult:
    """What a run did: the steps it reached, per-step losses (this invocation), where it wrote things."""

    steps: int
    losses: list[float] = field(default_factory=list)
    output_dir: Path = Path(".")
    final_dir: Path | None = None
    adapter_dir: Path | None = None
    stopped: str = "max_steps"  # max_steps | data_exhausted | time_budget (fewer steps than max_steps)
    seconds: float = 0.0
    tokens: int = 0
    resumed_from: Path | None = None
    #: (step, planned total steps) each time a time budget measured the speed
    budget_plans: list[tuple[int, int]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# setup helpers


def build_model(recipe: Recipe) -> tuple[nn.Module, Any]:
    """The model (fp32, CPU) and its processor, from a preset (random init) or a checkpoint directory."""
    from ivl.config import InternVLConfig, get_preset
    from ivl.processing.processor import Processor
    from ivl.training.recipe import deep_merge

    section = recipe.model
    if section.checkpoint:
        from ivl.checkpoint.io import load_model

        if section.config:
            raise ConfigError(
                f"{recipe.source}: model.config overrides apply to presets only; a checkpoint carries its config"
            )
        model = load_model(section.checkpoint, dtype=torch.float32)
        tokenizer_dir = section.tokenizer or section.checkpoint
    else:
        config = get_preset(section.preset or "")
        if section.config:
            config = InternVLConfig.from_dict(deep_merge(config.to_dict(), section.config))
        torch.manual_seed(section.seed)
        from ivl.models.internvl import InternVL

        model = InternVL(config)
        if not section.tokenizer:
            raise ConfigError(f"{recipe.source}: model.tokenizer is required with model.preset (a tokenizer directory)")
        tokenizer_dir = section.tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > model.config.text.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{model.config.text.vocab_size}"
        )
    data = recipe.data
    processor = Processor.from_config(
        tokenizer,
        model.config,
        min_num=data.min_dynamic_patch,
        max_num=data.max_dynamic_patch,
        use_thumbnail=data.use_thumbnail,
    )
    return model.float().train(), processor


def internvl_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the nine InternVL special tokens that exist in ``tokenizer``."""
    from ivl.processing.tokenizer import INTERNVL_TOKENS

    vocab = tokenizer.get_vocab()
    return [int(vocab[t]) for t in INTERNVL_TOKENS if t in vocab]


def build_streams(
    recipe: Recipe, processor: Any, info: D.DistInfo, accum: int, states: list[Any] | None = None
) -> list[Any]:
    """One resumable packed loader per micro-batch slot of this rank (slot = rank·A + a of W·A)."""
    from ivl.data.dataset import DatasetOptions, PackedIterable, PackedLoaderConfig, ResumableLoader, build_datasets
    from ivl.data.packing import PackingConfig

    data = recipe.data
    if not data.meta:
        raise ConfigError(f"{recipe.source}: data.meta (a meta JSON file) is required to train")
    options = DatasetOptions(
        seed=data.seed,
        skip_bad_records=data.skip_bad_records,
        rejects_path=str(Path(recipe.train.output_dir) / "rejects.jsonl") if data.skip_bad_records else None,
        max_length=data.max_length or data.max_packed_tokens,
        overlong=data.overlong,
        min_num_frames=data.min_num_frames,
        max_num_frames=data.max_num_frames,
        default_max_dynamic_patch=data.max_dynamic_patch,
        media_cache_bytes=data.media_cache_mb << 20,
    )
    datasets = build_datasets(data.meta, processor, options)
    if not data.augment:
        for ds in datasets:
            ds.jpeg = None
    slots = info.world_size * accum
    if states is not None and len(states) != accum:
        raise ConfigError(f"checkpoint holds {len(states)} data streams for this rank, the recipe needs {accum}")
    loaders = []
    for a in range(accum):
        config = PackedLoaderConfig(
            packing=PackingConfig(
                max_packed_tokens=data.max_packed_tokens,
                max_packed_tiles=data.max_packed_tiles,
                max_buffer_size=data.max_buffer_size,
                overlong=data.overlong,
            ),
            loss_mode=data.loss_reduction,
            seed=data.seed,
            weighting=data.weighting,
            subsample=data.subsample,
            num_epochs=data.num_epochs,
            rank=info.rank * accum + a,
            world_size=slots,
            dummy_tile_size=processor.image_size,
        )
        iterable = PackedIterable(datasets, config, processor.image_token_id, resume=states[a] if states else None)
        loaders.append(ResumableLoader(iterable, num_workers=data.num_workers))
    return loaders


def precision_of(recipe: Recipe, device: torch.device) -> bool:
    """True for bf16 mixed precision (``auto``: on CUDA only)."""
    mode = recipe.train.precision
    if mode == "auto":
        return device.type == "cuda"
    return mode == "bf16"


def route_dummy_tile(batch: dict[str, Any], image_token_id: int, tokens_per_tile: int) -> dict[str, Any]:
    """Make a text-only pack's dummy tile run through the vision path inside the model's forward.

    The collator adds one zero tile with flag 0 to text-only packs and the model drops flag-0 tiles before
    the ViT. Under FSDP every rank must then issue the same all-gathers in the same order, so the tile is
    flagged 1 and given its own extra segment of image tokens whose targets are ignored: the real tokens'
    logits and loss are unchanged (the segment is isolated by ``cu_seqlens``) and the vision parameters
    receive exact zero gradients, like the official code that always runs the ViT and discards the features.
    """
    pixels, flags = batch.get("pixel_values"), batch.get("image_flags")
    if pixels is None or flags is None or bool(flags.bool().any()):
        return batch
    n = int(pixels.shape[0]) * tokens_per_tile
    out = dict(batch)
    out["image_flags"] = torch.ones_like(flags)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, n), image_token_id, dtype=torch.long)], 1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(n, dtype=torch.long)[None]], 1)
    ignore = torch.full((1, n), -100, dtype=torch.long)
    out["targets"] = torch.cat([batch["targets"], ignore], 1)
    out["labels"] = torch.cat([batch["labels"], ignore], 1)
    out["loss_weights"] = torch.cat([batch["loss_weights"], torch.zeros(1, n, dtype=batch["loss_weights"].dtype)], 1)
    cu = batch["cu_seqlens"]
    out["cu_seqlens"] = torch.cat([cu, (cu[-1] + n).reshape(1).to(cu.dtype)])
    return out


def micro_batch_loss(model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int, int]:
    """``(Σ w·CE, real tokens, real tiles)`` of one packed micro-batch.

    Logits are computed only where a target is supervised (the answers: a small share of a pack's tokens), which
    is the same loss as the full logits at a fraction of the LM head's time and memory."""
    config = model.config
    tiles = int(batch["image_flags"].sum()) if batch.get("pixel_values") is not None else 0
    batch = route_dummy_tile(batch, config.image_token_id, config.num_image_token)
    pixels = batch["pixel_values"]
    targets = batch["targets"].to(device)
    supervised = targets != IGNORE_INDEX
    out = model(
        batch["input_ids"].to(device),
        pixels.to(device) if pixels is not None else None,
        image_flags=batch["image_flags"].to(device) if pixels is not None else None,
        position_ids=batch["position_ids"].to(device),
        cu_seqlens=batch["cu_seqlens"].to(device),
        logits_positions=supervised,
    )
    weights = batch["loss_weights"].to(device)[supervised]
    loss_sum, _ = weighted_cross_entropy(out.logits, targets[supervised], weights)
    return loss_sum, int(batch["num_real_tokens"]), tiles


def _autocast(device: torch.device, bf16: bool, sharded: bool) -> contextlib.AbstractContextManager:
    """Single-process bf16: autocast; FSDP2 casts parameters itself (MixedPrecisionPolicy)."""
    if bf16 and not sharded:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_final_model(model: nn.Module, processor: Any, out_dir: Path, info: D.DistInfo) -> Path | None:
    """The trained model in the official layout with the tokenizer and processor settings (rank 0 writes)."""
    from ivl.checkpoint.io import empty_model, save_model

    state = D.full_state_dict(model)
    if not info.is_main:
        return None
    if D.is_sharded(model):
        plain = empty_model(model.config)
        plain.load_state_dict(state, assign=True)
    else:
        plain = model
    with tempfile.TemporaryDirectory() as aux:
        processor.save_pretrained(aux)
        save_model(plain, out_dir, layout="official", copy_files_from=aux)
    return out_dir


# --------------------------------------------------------------------------------------------------------
# the run


def train(
    recipe: Recipe,
    *,
    model: nn.Module | None = None,
    processor: Any = None,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Run ``recipe``; ``model``/``processor`` may be given instead of ``recipe.model``.

    ``stop_after`` ends this invocation after that many steps without finishing the schedule (tests,
    staged demos); a later call with ``resume`` continues exactly.
    """
    recipe.validate()
    cfg = recipe.train
    info = D.init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "recipe.yaml")
    started = time.perf_counter()

    # ---- model
    if model is None:
        model, processor = build_model(recipe)
    elif processor is None:
        raise ConfigError("train(model=...) also needs processor=")
    model = model.float()
    plan: FreezePlan = plan_for(recipe.stage.name, **recipe.stage.plan_overrides())
    lora_cfg = None
    if recipe.lora.enabled:
        from ivl.training.lora import add_lora, lora_config

        lora_cfg = lora_config(
            recipe.lora.r,
            recipe.lora.alpha,
            recipe.lora.dropout,
            recipe.lora.llm_targets if recipe.lora.llm else (),
            recipe.lora.vision_targets if recipe.lora.vision else (),
        )
        add_lora(model, lora_cfg)
        # the adapted towers' base weights stay frozen: only the adapters (and the plan's other parts) train
        plan.llm = plan.llm and not recipe.lora.llm
        plan.vision = plan.vision and not recipe.lora.vision
    apply_freeze_plan(model, plan, extra_trainable=("lora_",) if lora_cfg is not None else ())
    if recipe.model.visual_experts_from_text:
        model.language_model.init_visual_experts_from_text()
    if recipe.model.init_new_tokens:
        init_new_token_rows(model, internvl_token_ids(processor.tokenizer))
    counts = trainable_parameters(model)
    say = log or (print if info.is_main else (lambda _msg: None))
    if info.is_main:
        say(f"stage {recipe.stage.name}: trainable parameters per component\n{format_trainable(counts)}")
    if not any(c.trainable for c in counts):
        raise ConfigError(f"{recipe.source}: stage {recipe.stage.name!r} leaves no parameter trainable")

    device = info.device
    bf16 = precision_of(recipe, device)
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and info.world_size > 1)
    if use_fsdp:
        if not D.dist.is_initialized():
            raise ConfigError("train.fsdp: on needs a process group (launch with torchrun)")
        D.shard_model(model, bf16=bf16)
    set_train_mode(model, plan)
    torch.manual_seed(cfg.seed + 7919 * info.rank)  # training randomness (drop path) differs per rank

    # ---- optimizer and schedule
    opt = recipe.optim
    optimizer = build_optimizer(model, opt.lr, opt.weight_decay, tuple(opt.betas), opt.eps)

    def warmup_for(total: int) -> int:
        return min(resolve_warmup(total, opt.warmup_steps, opt.warmup_ratio), total)

    scheduler = cosine_schedule(optimizer, cfg.max_steps, warmup_for(cfg.max_steps), opt.min_lr_ratio)
    total_steps = cfg.max_steps  # a time budget may lower it
    accum = recipe.grad_accum(info.world_size)

    # ---- resume
    step, data_states, resumed_from = 0, None, None
    target = None
    if cfg.resume not in (None, "none", "no", "false"):
        target = latest_checkpoint(out) if cfg.resume == "auto" else Path(cfg.resume)
    if target is not None and cfg.time_budget_s is not None:
        raise ConfigError(
            f"{recipe.source}: train.time_budget_s applies to fresh runs; resuming from {target} would continue a "
            "schedule planned for another length (set train.resume: none, or drop the budget)"
        )
    if target is not None:
        resumed = load_checkpoint(target, model, optimizer, scheduler, info)
        step, data_states, resumed_from = resumed.step, resumed.data_state, resumed.path
        say(f"resumed from {resumed.path} at step {step}")
    metrics = MetricsLog(out / METRICS_FILE, enabled=info.is_main)
    if resumed_from is not None:
        metrics.truncate_after(step)
    elif info.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run starts a fresh log

    loaders = build_streams(recipe, processor, info, accum, data_states)
    iterators = [iter(loader) for loader in loaders]
    result = TrainResult(steps=step, output_dir=out, resumed_from=resumed_from)
    if step >= cfg.max_steps:
        say(f"nothing to do: the checkpoint is at step {step} of {cfg.max_steps}")
    bar = ProgressBar(cfg.max_steps, step, enabled=cfg.progress and info.is_main, description=recipe.name)
    budget = None if cfg.time_budget_s is None else TimeBudget(cfg.time_budget_s, cfg.max_steps, started)
    speed = Throughput()
    trainable = [p for p in model.parameters() if p.requires_grad]
    sharded = D.is_sharded(model)
    grad_world = info.world_size if sharded else 1
    last_saved = step if resumed_from is not None else -1
    invocation_steps = 0

    def checkpoint() -> None:
        nonlocal last_saved
        save_checkpoint(
            out,
            step,
            model,
            optimizer,
            scheduler,
            [loader.state_dict() for loader in loaders],
            info,
            extra={"recipe": recipe.name, "stage": recipe.stage.name},
            keep=cfg.save_total_limit,
        )
        last_saved = step
        if info.is_main:
            plot_loss_curve(metrics.path, out / LOSS_CURVE, title=f"{recipe.name}: loss")

    try:
        while step < total_steps and (stop_after is None or invocation_steps < stop_after):
            # ---- fetch this step's micro-batches (stop together if any rank ran out of data)
            micro: list[dict[str, Any]] = []
            for it in iterators:
                batch = next(it, None)
                if batch is None:
                    break
                micro.append(batch)
            if not D.all_true(len(micro) == accum, device):
                result.stopped = "data_exhausted"
                say(f"data exhausted after {step} steps")
                break
            # ---- exact normalisation: Σ w over every micro-batch of every rank, known before the forwards
            denominator = global_weight_sum([b["loss_weights"].sum() for b in micro]).to(device)
            lr = optimizer.param_groups[0]["lr"]
            totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, tiles
            for i, batch in enumerate(micro):
                with D.gradient_sync(model, i == len(micro) - 1), _autocast(device, bf16, sharded):
                    loss_sum, tokens, tiles = micro_batch_loss(model, batch, device)
                normalised_loss(loss_sum, denominator, grad_world).backward()
                totals += torch.tensor([float(loss_sum.detach()), tokens, tiles], dtype=torch.float64, device=device)
            grad_norm = D.clip_grad_norm(trainable, opt.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            invocation_steps += 1

            totals = D.all_reduce_sum(totals)
            loss = float(totals[0]) / max(float(denominator), 1e-30)
            tokens, tiles = int(totals[1]), int(totals[2])
            speed.add(tokens, tiles)
            result.losses.append(loss)
            result.tokens += tokens
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower optim.lr or check the data")
            planned = budget.replan(step) if budget is not None else None
            if planned is not None:  # the same steps on every rank; all ranks follow rank 0's plan
                planned = int(D.broadcast_object(planned))
            if planned is not None and planned != total_steps:
                total_steps = planned
                respan_cosine(scheduler, total_steps, warmup_for(total_steps), opt.min_lr_ratio)
                bar.set_total(total_steps)
                say(f"time budget {cfg.time_budget_s:.0f} s: {total_steps} steps instead of {cfg.max_steps}")
            if step % cfg.log_steps == 0 or step == total_steps:
                tok_s, tile_s = speed.rates()
                record = {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "tiles": tiles,
                    "tokens_per_s": tok_s,
                    "tiles_per_s": tile_s,
                    "elapsed_s": time.perf_counter() - started,
                }
                metrics.write(record)
                bar.update(step, loss, lr, tok_s, tile_s)
            if cfg.save_steps and step % cfg.save_steps == 0:
                checkpoint()
        if last_saved != step and (cfg.save_steps or step >= total_steps) and step > 0:
            checkpoint()
    finally:
        bar.close()

    result.steps = step
    if budget is not None:
        if total_steps < cfg.max_steps and result.stopped == "max_steps":
            result.stopped = "time_budget"
        result.budget_plans = budget.plans
    if step >= total_steps or result.stopped == "data_exhausted":
        if info.is_main and metrics.path.exists():
            plot_loss_curve(metrics.path, out / LOSS_CURVE, title=f"{recipe.name}: loss")
        if lora_cfg is not None:
            if info.is_main:
                from ivl.training.lora import save_adapter

                result.adapter_dir = save_adapter(model, lora_cfg, out / ADAPTER_DIR, base=recipe.model.checkpoint)
        elif cfg.save_final:
            result.final_dir = save_final_model(model, processor, out / FINAL_DIR, info)
            if result.final_dir is not None:
                say(f"final model (official layout) written to {result.final_dir}")
    result.seconds = time.perf_counter() - started
    D.barrier()
    return result
