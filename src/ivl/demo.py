"""`ivl demo`: the whole pipeline on a tiny model, on CPU, in one command.

    synthetic world → BPE tokenizer (InternVL special tokens included) → LM warm-up on the world's text
    → ViT pre-training on the world's labelled images → Stage 1 (mlp1) → Stage 1.5 (ViT + mlp1)
    → Stage 2 (everything), packed with square loss weighting
    → held-out evaluation per task, and again with blank images (the blind baseline must stay near chance)
    → a grounding answer drawn on its image, a chat answer through the user-facing ``chat`` API
    → ``report.json`` and the final checkpoint in the official layout.

The LM warm-up and the ViT pre-training stand in for the pre-trained LLM and InternViT that the real recipe
starts from. Every InternVL stage is an ordinary recipe (``recipes/demo/*.yaml``) run by the ordinary trainer,
each starting from the previous stage's official-layout checkpoint; the demo only fills in paths and, for
``--quick``, step counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ivl.data.synthetic_drills import multi_image_drills, object_caption, padded_caption
from ivl.demo_warmup import VALIDATION_DRILL_SEED, warm_up_candidates
from ivl.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "demo"
STAGES = ("lm_warmup", "stage1", "stage1_5", "stage2")
#: The freeze plan each demo stage uses for the encoder-free (Mono-InternVL) variant.
MONO_STAGES = {"lm_warmup": "lm_warmup", "stage1": "mono_s1_1", "stage1_5": "mono_s1_3", "stage2": "mono_sft"}
SYSTEM_MESSAGE = "You are a tiny InternVL."
#: seconds a time-budgeted demo keeps for what follows Stage 2 (evaluation with and without images: 15-21 s)
EVALUATION_RESERVE_S = 40.0


@dataclass
class VisionPretrainSettings:
    """ViT pre-training on the world's labelled images (measured choices: docs/benchmarks.md, "Demo")."""

    steps: int = 2500
    batch_size: int = 32
    lr: float = 2.0e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    #: bins per coordinate of the per-patch object-box labels (0: none). Without them the image tokens say where
    #: an object is inside their own 4 x 4 patch block but not where that block is, which attention (values carry
    #: no position) cannot recover: a probe reads a lone object's box from its token at Acc@IoU>=0.5 0.18 without,
    #: 0.74 with (docs/benchmarks.md, session 13).
    box_bins: int = 20


@dataclass
class DemoSettings:
    """Sizes of one demo run. ``steps`` override the recipes' ``train.max_steps`` when given.

    ``tiles``: tiles per image in training and evaluation (the world's images are at most 112 px, so one 56 px
    tile keeps every image in 4 tokens: the fewer image tokens, the sooner the tiny LLM learns to read them).
    ``mixture``: per stage, a ``repeat_time`` per task (0 leaves the task out). Grounding answers are ~20
    supervised tokens of hard-to-guess coordinates, so under square weighting they would dominate the
    gradient of the alignment stages; they join in Stage 2, three times over: emitting boxes is learnt from many
    of them (grounding alone, 600 vs 2,000 steps: Acc@0.5 0.21 vs 0.42), and video, learnt early, makes room at
    0.5 (a video costs 8 tiles). Colour stays at 1: at 0.5 a Stage 2 of ~1,800 steps let it drift (purple read as
    blue; two paired runs, mean 0.654 / 0.6575 at 0.5 and 0.686 / 0.683 at 1). With a pre-trained ViT every other
    task can be aligned from Stage 1 on. ``mono_mixture``: the encoder-free model's (its patch stem starts
    random, so its Stage 1 keeps to what random features can serve: colour, shape, count).
    """

    n_train: int = 1000
    #: 200 test items per task: with 50 a run's mean was up to 0.03 off its 200-item value (docs/benchmarks.md)
    n_test: int = 200
    image_size_range: tuple[int, int] = (56, 112)
    tasks: tuple[str, ...] | None = None  # None: every task of the synthetic world
    tiles: int = 1
    follow_ups: int = 0  # measured: 2 follow-ups per train image (and 2,000 images) did not help (docs/benchmarks.md)
    #: generated multi-image lookups in the LM warm-up's text (``ivl.data.synthetic_drills``)
    warmup_drills: int = 20_000
    #: LM warm-ups trained side by side from seeds ``seed``, ``seed + 1``, …; the one answering most held-out
    #: drills goes on (``ivl.demo_warmup``). Needs warm-up drills and a thread per candidate, else one runs.
    warmup_candidates: int = 2
    steps: dict[str, int] = field(default_factory=dict)
    mixture: dict[str, dict[str, float]] = field(
        default_factory=lambda: {
            "stage1": {"grounding": 0.0},
            "stage1_5": {"grounding": 0.0},
            "stage2": {"grounding": 3.0, "video": 0.5},
        }
    )
    mono_mixture: dict[str, dict[str, float]] = field(
        default_factory=lambda: {
            "stage1": {task: 0.0 for task in ("grounding", "position", "ocr", "multi_image", "video")},
            "stage1_5": {"grounding": 0.0},
            "stage2": {"grounding": 0.25},
        }
    )
    eval_batch_size: int = 64
    #: end to end within this many minutes: Stage 2 runs at most ``steps["stage2"]``, fewer if its measured speed
    #: says they will not fit what is left (``train.time_budget_s``); None: the fixed step counts. The same steps
    #: took 14.3 min one day and 19 min another on this 2-core machine (docs/benchmarks.md, session 14). Only
    #: Stage 2 gives way: a ViT pre-training cut to fit as well cost shape more than Stage 2 gained.
    minutes: float | None = 15.0
    #: ViT pre-training (``ivl.training.vision_pretrain``) before Stage 1; 0 steps skips it. The encoder-free
    #: Mono-InternVL has no ViT to pre-train: its patch stem learns in the EViP stages.
    vision_pretrain: VisionPretrainSettings = field(default_factory=VisionPretrainSettings)


FULL = DemoSettings()
QUICK = DemoSettings(
    n_train=200,
    n_test=30,
    tasks=("colour", "text"),
    warmup_drills=0,
    warmup_candidates=1,
    minutes=None,
    steps={"lm_warmup": 200, "stage1": 150, "stage1_5": 20, "stage2": 150},
    vision_pretrain=VisionPretrainSettings(steps=60),
)


# --------------------------------------------------------------------------------------------------------
# data


def _strip_media(text: str) -> str:
    """A question without its media: placeholders and the ``Image-k:`` / ``Frame-k:`` labels go."""
    text = re.sub(r"(?m)^(Image|Frame)-\d+: <(image|video)>\n?", "", text)
    return text.replace("<image>\n", "").replace("<video>\n", "").replace("<image>", "").replace("<video>", "").strip()


_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}


def _box(box: Sequence[int]) -> str:
    return "[[" + ", ".join(str(int(v)) for v in box) + "]]"


def describe(record: dict[str, Any]) -> list[str] | None:
    """Text standing in for each image (or the video) of a train record, built from its ground truth.

    The LM warm-up reads these inside ``<img>…</img>`` where the image tokens will later be, so the warmed-up
    LLM already knows how to answer from whatever sits there — the role a pre-trained LLM's knowledge of
    words plays in the real recipe. The vision stages then only have to make image tokens say the same.
    """
    task, objects = record.get("task"), record.get("objects")
    if task in ("colour", "shape"):
        return [object_caption(objects[0]["colour"], objects[0]["shape"])]
    if task == "count":
        first = objects[0]
        noun = _PLURALS[first["shape"]] if len(objects) > 1 else first["shape"]
        return [f"{len(objects)} {first['colour']} {noun}"]
    if task == "position":
        a, b = objects
        relation = {"left": "left of", "right": "right of"}.get(record["answer"], record["answer"])
        return [f"the {a['colour']} {a['shape']} is {relation} the {b['colour']} {b['shape']}"]
    if task == "grounding":
        return ["; ".join(f"the {o['colour']} {o['shape']} {_box(o['box'])}" for o in objects)]
    if task == "ocr":
        return [f"the word {record['answer']}"]
    if task == "multi_image":
        return [object_caption(group[0]["colour"], group[0]["shape"]) for group in objects]
    if task == "video":
        return [f"{object_caption(record['colour'], record['shape'])} moving {record['answer']}"]
    return None


BACKGROUND, TEXT = "background", "text"


PATCH_BOX = ("patch_x1", "patch_y1", "patch_x2", "patch_y2")


def attribute_classes(box_bins: int = 0) -> dict[str, list[str]]:
    """The attributes the ViT pre-training predicts and their classes (``patch_*``: one label per patch);
    ``box_bins`` > 0 adds the covering object's box, one coordinate per attribute, in that many bins."""
    from ivl.data.synthetic_draw import COLOURS, SHAPES, WORDS
    from ivl.data.synthetic_tasks import COUNTS

    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": list(COUNTS),
        "word": list(WORDS),
        "patch_colour": [BACKGROUND, *COLOURS, TEXT],
        "patch_shape": [BACKGROUND, *SHAPES, TEXT],
        **{name: [str(i) for i in range(box_bins)] for name in (PATCH_BOX if box_bins > 0 else ())},
    }


def image_attributes(record: dict[str, Any], grid: int = 8, box_bins: int = 0) -> list[dict[str, Any]]:
    """Ground-truth attributes of each image of a record (the ViT pre-training labels), from its objects.

    ``count`` is the number of objects in the image; ``colour``/``shape`` are given where every object shares
    them. ``patch_colour``/``patch_shape`` label each cell of a ``grid`` × ``grid`` patch grid over the whole
    image with what covers the cell's centre (an object, the rendered word, or background); with ``box_bins``,
    ``patch_x1``…``patch_y2`` give a cell covered by an object that object's 0-1000 box, binned (unlabelled
    elsewhere). Video frames and text records give none (a frame shows what a colour/shape image shows).
    """
    task, objects = record.get("task"), record.get("objects")
    if task == "ocr":
        cells = _cells_inside(record["text_box"], grid)
        return [{"word": record["answer"], **_patch_labels([(cells, TEXT, TEXT, None)], grid, box_bins)}]
    if task == "multi_image":
        return [_object_attributes(group, grid, box_bins) for group in objects]
    if task in ("colour", "shape", "count", "position", "grounding"):
        return [_object_attributes(objects, grid, box_bins)]
    return []


def _cells_inside(box: Sequence[float], grid: int) -> set[int]:
    """Patch cells (row-major) whose centre lies inside a 0-1000 box; for a box smaller than a cell that holds
    no cell centre, the cell under the box's centre (every object is labelled somewhere)."""
    x1, y1, x2, y2 = box
    centre = [(i + 0.5) * 1000 / grid for i in range(grid)]
    cells = {r * grid + c for r, y in enumerate(centre) for c, x in enumerate(centre) if x1 <= x < x2 and y1 <= y < y2}
    if not cells:
        column = min(grid - 1, int((x1 + x2) / 2 * grid / 1000))
        row = min(grid - 1, int((y1 + y2) / 2 * grid / 1000))
        cells = {row * grid + column}
    return cells


def _patch_labels(
    regions: Sequence[tuple[set[int], str, str, Sequence[float] | None]], grid: int, box_bins: int = 0
) -> dict[str, list[str]]:
    colour, shape = [BACKGROUND] * grid * grid, [BACKGROUND] * grid * grid
    boxes: list[list[str] | None] = [None] * grid * grid
    for cells, c, s, box in regions:
        if box is None or box_bins <= 0:
            binned = None
        else:
            binned = [str(min(box_bins - 1, max(0, int(v * box_bins / 1000)))) for v in box]
        for cell in cells:
            colour[cell], shape[cell], boxes[cell] = c, s, binned
    out: dict[str, list] = {"patch_colour": colour, "patch_shape": shape}
    for i, name in enumerate(PATCH_BOX if box_bins > 0 else ()):
        out[name] = [None if b is None else b[i] for b in boxes]
    return out


def _object_attributes(objects: Sequence[dict[str, Any]], grid: int, box_bins: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"count": str(len(objects))}
    for key in ("colour", "shape"):
        values = {o[key] for o in objects}
        if len(values) == 1:
            out[key] = values.pop()
    regions = [(_cells_inside(o["box"], grid), o["colour"], o["shape"], o["box"]) for o in objects]
    out.update(_patch_labels(regions, grid, box_bins))
    return out


def labelled_tiles(world: Path, split: str, image_size: int, patch_size: int, box_bins: int = 0) -> Any:
    """Every image of ``split`` with attributes, as one tile each (the whole image, as the thumbnail is)."""
    from PIL import Image

    from ivl.data.synthetic import read_records
    from ivl.processing.tiling import dynamic_tiles, normalize_tiled
    from ivl.training.vision_pretrain import LabelledTiles

    grid = image_size // patch_size
    tiles, attributes = [], []
    for record in read_records(world, split):
        images = record.get("image")
        names = [images] if isinstance(images, str) else list(images or [])
        labels = image_attributes(record, grid, box_bins)
        if len(labels) != len(names):
            continue  # video and text records: no labelled image
        for name, attrs in zip(names, labels, strict=True):
            path = Path(name) if Path(name).is_absolute() else world / split / record["task"] / name
            with Image.open(path) as image:
                tiles.append(dynamic_tiles(image.convert("RGB"), max_num=1, image_size=image_size))
            attributes.append(attrs)
    classes = attribute_classes(box_bins)
    return LabelledTiles.build(normalize_tiled(tiles), attributes, classes, num_patches=grid * grid)


def pretrain_vit(
    previous: Path, world: Path, out_dir: Path, settings: VisionPretrainSettings, *, seed: int, progress: bool, log: Any
) -> tuple[Path, dict[str, Any]]:
    """ViT pre-training on the world's labelled train images; only the vision tower changes."""
    from ivl.inference.chat import load_for_inference
    from ivl.training.distributed import DistInfo
    from ivl.training.trainer import save_final_model
    from ivl.training.vision_pretrain import pretrain_vision

    model, processor = load_for_inference(previous, dtype=torch.float32)
    vision = model.config.vision
    bins = settings.box_bins
    train_tiles = labelled_tiles(world, "train", vision.image_size, vision.patch_size, bins)
    held_out = labelled_tiles(world, "test", vision.image_size, vision.patch_size, bins)
    result = pretrain_vision(
        model.vision_model, train_tiles, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
        weight_decay=settings.weight_decay, warmup_steps=settings.warmup_steps, seed=seed, held_out=held_out,
        out_dir=out_dir, progress=progress, log=log,
    )  # fmt: skip
    final = save_final_model(model.eval(), processor, out_dir / "final", DistInfo())
    assert final is not None
    k = max(1, len(result.losses) // 10)
    summary = {
        "first": sum(result.losses[:k]) / k,
        "last": sum(result.losses[-k:]) / k,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "tiles": len(train_tiles),
        "held_out_accuracy": result.accuracy,
    }
    return final, summary


def captioned_question(record: dict[str, Any]) -> str:
    """The record's question with each ``<image>``/``<video>`` replaced by ``<img>description</img>``."""
    question = record["conversations"][0]["value"]
    captions = describe(record)
    if captions is None:
        return question
    rng = random.Random(f"caption/{record['id']}")
    for caption in (padded_caption(c, rng) for c in captions):
        placeholder = "<image>" if "<image>" in question else "<video>"
        question = question.replace(placeholder, f"<img>{caption}</img>", 1)
    return question


def write_warmup_data(world: Path, out_dir: Path, drills: int = 0, seed: int = 0) -> Path:
    """Text-only records for the LM warm-up: every train question with its media described in words, plus
    ``drills`` generated multi-image lookups (``ivl.data.synthetic_drills``) as a second dataset."""
    from ivl.data.synthetic import read_records

    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = {"world_text": []}
    for record in read_records(world, "train"):
        turns = [{"from": "human", "value": captioned_question(record)}, *record["conversations"][1:]]
        datasets["world_text"].append({"id": record["id"], "conversations": turns})
    if drills:
        datasets["multi_image_drills"] = multi_image_drills(drills, seed)
    entries = {}
    for name, records in datasets.items():
        annotation = out_dir / f"warmup_{name}.jsonl"
        lines = [json.dumps(record, ensure_ascii=False) for record in records]
        annotation.write_text("\n".join(lines) + "\n", encoding="utf-8")
        entries[name] = {"annotation": str(annotation.resolve()), "length": len(lines)}
    meta = out_dir / "warmup_meta.json"
    meta.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return meta


def tokenizer_corpus(world: Path, n_train_records: int) -> list[str]:
    """The world's train questions and answers (never the test split's), plus the chat frame every sample
    carries (role names and the system message) at the frequency it is trained with. Real vocabularies hold
    ``system``/``user``/``assistant`` as single tokens; without the frame in its corpus a tiny BPE spells it
    out in 43 byte-ish tokens, 60 % of a typical demo sample, and every training step would pay for that."""
    from ivl.data.synthetic import corpus_texts

    frame = [f"system\n{SYSTEM_MESSAGE}", "user\n", "assistant\n"]
    return [*corpus_texts(world, ("train",)), *(frame * n_train_records)]


def write_stage_meta(world: Path, out_dir: Path, stage: str, tiles: int, mixture: dict[str, float]) -> Path:
    """The world's train meta with the demo's tiles per image and this stage's repeat factors."""
    meta = json.loads((world / "train_meta.json").read_text(encoding="utf-8"))
    entries = {}
    for name, entry in meta.items():
        repeat = float(mixture.get(name.removeprefix("synth_"), entry.get("repeat_time", 1)))
        if repeat > 0:
            entries[name] = {**entry, "max_dynamic_patch": tiles, "repeat_time": repeat}
    path = out_dir / f"{stage}_meta.json"
    path.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------
# recipes


def stage_recipe(
    stage: str,
    *,
    out: Path,
    previous: Path | None,
    tokenizer: Path,
    meta: Path,
    mono: bool,
    steps: int | None,
    seed: int,
    threads: int | None,
    progress: bool,
) -> Any:
    """The demo recipe of ``stage`` with this run's paths filled in."""
    from ivl.training.recipe import deep_merge, read_recipe_file, recipe_from_dict

    path = RECIPE_DIR / f"{stage}.yaml"
    if not path.is_file():
        raise ConfigError(f"demo recipe {path} not found (run `ivl demo` from a source checkout of ivl)")
    data = read_recipe_file(path)
    update: dict[str, Any] = {
        "data": {"meta": str(meta), "seed": seed + STAGES.index(stage)},  # each stage sees its own order
        "train": {"output_dir": str(out / stage), "seed": seed, "progress": progress, "resume": None},
    }
    if threads:
        update["train"]["threads"] = threads
    if steps is not None:
        update["train"]["max_steps"] = steps
    if previous is None:
        model = {"tokenizer": str(tokenizer), "seed": seed, "config": {"system_message": SYSTEM_MESSAGE}}
        if mono:
            model["config"].update(
                # the modular ViT's 7 px patches, wider init and 4 x 4 unshuffle (4 tokens per tile): the stem learns
                # shape and count faster than with 14 px patches at 0.02 (docs/benchmarks.md, "Mono-InternVL variant")
                vision={"model_type": "intern_vit_patch", "patch_size": 7, "initializer_range": 0.05},
                downsample_ratio=0.25,
                text={"flavour": "internlm2", "visual_experts": True, "attention_bias": False},
                template="internlm2-chat",
            )
        update["model"] = model
    else:
        update["model"] = {"checkpoint": str(previous)}
    if mono:
        update["stage"] = {"name": MONO_STAGES[stage]}
        if stage == "stage1":
            update["model"]["visual_experts_from_text"] = True
    return recipe_from_dict(deep_merge(data, update), str(path))


def check_frozen_weights(
    before: Path,
    after: Path,
    name: str,
    plan: Any,
    text_ids: Sequence[int],
    console: Any,
    reinitialised: Sequence[int] = (),
) -> dict[str, Any]:
    """Every weight ``plan`` froze is bit-identical after the stage (and, when the whole language path was
    frozen, so are the text-only logits of ``text_ids``): Mono-InternVL's no-forgetting guarantee, on disk."""
    from ivl.training.frozen_check import frozen_weights_report

    report = frozen_weights_report(before, after, plan, reinitialised_output_rows=reinitialised, text_ids=text_ids)
    ok = not report["changed"] and report["text_logits_identical"] is not False
    logits = {None: "", True: "; text-only logits bit-identical", False: "; text-only logits CHANGED"}
    colour = "green" if ok else "red"
    console.print(
        f"[{colour}]{name}: {report['frozen_tensors']} frozen tensors, "
        f"{len(report['changed'])} changed{logits[report['text_logits_identical']]}[/{colour}]"
    )
    return report


def check_recipe_freeze(
    before: Path, after: Path, recipe: Any, tokenizer: Any, text_ids: Sequence[int], console: Any
) -> dict[str, Any]:
    """`check_frozen_weights` for a recipe stage: its freeze plan, and the new-token rows it re-initialised."""
    from ivl.training.stages import plan_for
    from ivl.training.trainer import internvl_token_ids

    reinitialised = internvl_token_ids(tokenizer) if recipe.model.init_new_tokens else []
    plan = plan_for(recipe.stage.name, **recipe.stage.plan_overrides())
    return check_frozen_weights(before, after, recipe.stage.name, plan, text_ids, console, reinitialised)


# --------------------------------------------------------------------------------------------------------
# evaluation


class BlindPredictor:
    """The same questions with every image (and video frame) replaced by a blank grey one of the same size."""

    def __init__(self, inner: Any, num_frames: int) -> None:
        self.inner = inner
        self.num_frames = num_frames

    def __call__(self, queries: Sequence[Any]) -> list[str]:
        from PIL import Image

        from ivl.evaluation.tasks import open_image

        blind = []
        for q in queries:
            sizes = [ref.size if hasattr(ref, "size") else open_image(ref).size for ref in q.images]
            images = [Image.new("RGB", size, (128, 128, 128)) for size in sizes]
            video = None
            if q.video:
                from ivl.processing.video import read_video

                first = read_video(q.video, num_segments=1).frames[0]
                video = [Image.new("RGB", first.size, (128, 128, 128))] * self.num_frames
            blind.append(dataclasses.replace(q, images=images, video=video))
        return self.inner(blind)


def evaluate_world(
    model: Any, processor: Any, world: Path, out_dir: Path, *, blind: bool, batch_size: int, tiles: int | None = None
) -> dict:
    """Per-task accuracy on the world's test split (``blind``: with blank media)."""
    from ivl.evaluation.runner import EnginePredictor, EvalOptions, evaluate
    from ivl.inference.engine import Engine

    predictor: Any = EnginePredictor(Engine(model, processor, max_batch_size=batch_size), processor)
    if blind:
        predictor = BlindPredictor(predictor, processor.num_segments)
    options = EvalOptions(
        benchmark=str(world),
        out_dir=str(out_dir),
        split="test",
        model="demo-blind" if blind else "demo",
        batch_size=batch_size,
        overwrite=True,
        progress=False,
        max_tiles=tiles,
    )
    results = evaluate(predictor, options)
    assert results is not None
    return {task: {"accuracy": float(s["accuracy"]), "n": int(s["n"])} for task, s in results["scores"].items()}


def _first(world: Path, task: str) -> dict | None:
    from ivl.data.synthetic import read_records
    from ivl.errors import DataError

    try:
        records = read_records(world, "test", task)
    except DataError:  # the task is not part of this (quick) world
        return None
    return records[0] if records else None


def grounding_picture(model: Any, processor: Any, world: Path, out_png: Path, tiles: int) -> dict | None:
    """Ask one held-out grounding question through ``chat`` and draw the answer (red) and the truth (green)."""
    from PIL import Image

    from ivl.inference.chat import chat
    from ivl.processing.grounding import Region, draw_grounding, parse_grounding

    record = _first(world, "grounding")
    if record is None:
        return None
    image_path = world / "test" / "grounding" / record["image"]
    image = Image.open(image_path).convert("RGB")
    question = _strip_media(record["conversations"][0]["value"])
    answer = chat(model, processor, question, images=str(image_path), generation={"max_new_tokens": 48}, max_num=tiles)
    scale = max(1, 320 // max(image.size))
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    predicted = [Region(f"model: {r.label or ''}".strip(), r.shapes) for r in parse_grounding(answer, big.size)]
    truth = parse_grounding(record["answer"], big.size)
    truth = [Region("truth", r.shapes) for r in truth]
    draw_grounding(big, [*predicted, *truth], path=out_png)
    return {"question": question, "answer": answer, "truth": record["answer"], "png": str(out_png)}


def chat_example(model: Any, processor: Any, world: Path, tiles: int) -> dict | None:
    """One question about a held-out image, answered through the same ``chat`` API users call."""
    from ivl.inference.chat import chat

    for task in ("colour", "shape", "count", "position"):
        record = _first(world, task)
        if record is not None:
            image = world / "test" / task / record["image"]
            question = _strip_media(record["conversations"][0]["value"])
            answer = chat(
                model, processor, question, images=str(image), generation={"max_new_tokens": 16}, max_num=tiles
            )
            return {
                "task": task,
                "image": str(image),
                "question": question,
                "answer": answer,
                "truth": record["answer"],
            }
    return None


# --------------------------------------------------------------------------------------------------------
# the run


def auto_threads() -> int:
    """All cores, unless other processes already keep them busy: then 1 thread, since OpenMP's barriers stall
    whenever one of its threads is descheduled (measured here: 8x slower steps with 2 threads at load 10)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    # the 1-minute load average lags: right after `pip install` it can read ~1.5 on an idle 2-core machine
    return cores if load < cores else 1


def run_demo(
    out: str | Path = "runs/demo",
    *,
    model: str = "internvl",
    quick: bool = False,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return the report (also written to ``out/report.json``)."""
    from rich.console import Console
    from rich.table import Table

    from ivl.data.synthetic import VISION_TASKS, generate_world, read_records
    from ivl.inference.chat import load_for_inference
    from ivl.processing.tokenizer import build_tokenizer, load_tokenizer
    from ivl.training.recipe import read_recipe_file
    from ivl.training.stages import FreezePlan
    from ivl.training.trainer import train

    if model not in ("internvl", "mono"):
        raise ConfigError(f"--model must be internvl or mono, got {model!r}")
    mono = model == "mono"
    plan = settings or (QUICK if quick else FULL)
    console = Console()
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or auto_threads()
    torch.set_num_threads(threads)
    console.print(f"torch CPU threads: {threads}")
    timings: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    # ---- 1. data and tokenizer
    t = time.perf_counter()
    world = out / "world"
    summary = generate_world(
        world, seed=seed, n_train=plan.n_train, n_val=0, n_test=plan.n_test,
        image_size_range=plan.image_size_range, tasks=plan.tasks, follow_ups=plan.follow_ups,
        absolute_paths=True, overwrite=True,
    )  # fmt: skip
    warmup_meta = write_warmup_data(world, out / "data", drills=plan.warmup_drills, seed=seed)
    vocab = int(read_recipe_file(RECIPE_DIR / "lm_warmup.yaml")["model"]["config"]["text"]["vocab_size"])
    tokenizer_dir = out / "tokenizer"
    build_tokenizer(
        tokenizer_corpus(world, sum(summary.counts["train"].values())),
        vocab_size=vocab,
        flavour="internlm2" if mono else "qwen2",
        save_dir=tokenizer_dir,
    )
    console.print(
        f"[bold]world[/bold] {summary.n_records} records in {world}; tokenizer ({vocab} tokens) in {tokenizer_dir}"
    )
    t = mark("data", t)

    # ---- 2. LM warm-up, Stage 1, Stage 1.5, Stage 2
    meta = {"lm_warmup": warmup_meta}
    for stage in STAGES[1:]:
        mixture = (plan.mono_mixture if mono else plan.mixture).get(stage, {})
        meta[stage] = write_stage_meta(world, out / "data", stage, plan.tiles, mixture)
    losses: dict[str, dict[str, float]] = {}
    frozen: dict[str, dict[str, Any]] = {}
    tokenizer = load_tokenizer(tokenizer_dir)  # a text-only probe for the frozen-weights check
    probe_ids = tokenizer(captioned_question(read_records(world, "train")[0]), add_special_tokens=False)["input_ids"]
    previous: Path | None = None
    candidates: list[dict[str, Any]] = []
    n_candidates = min(plan.warmup_candidates, threads) if plan.warmup_drills > 0 else 1
    for stage in STAGES:
        stage_args = {"previous": previous, "tokenizer": tokenizer_dir, "meta": meta[stage], "mono": mono,
                      "steps": plan.steps.get(stage)}  # fmt: skip
        recipe = stage_recipe(stage, out=out, seed=seed, threads=threads, progress=progress, **stage_args)
        if stage == "lm_warmup" and n_candidates > 1:
            console.rule(f"{stage}: {n_candidates} candidates side by side, {recipe.train.max_steps} steps each")
            best, tried = warm_up_candidates(
                out=out / "lm_warmup_candidates", seeds=[seed + k for k in range(n_candidates)], threads=threads,
                validation=multi_image_drills(200, VALIDATION_DRILL_SEED + seed), steps=recipe.train.max_steps,
                recipe_kwargs=stage_args, progress=progress, log=console.print,
            )  # fmt: skip
            candidates = [{"seed": c.seed, "drill_accuracy": c.drill_accuracy} for c in tried]
            result = best.result
        else:
            if stage == "stage2" and plan.minutes is not None:
                left = plan.minutes * 60 - (time.perf_counter() - started) - EVALUATION_RESERVE_S
                recipe.train.time_budget_s = max(1e-3, left)  # spent already: stop at the first measurement
                console.print(f"time budget: {plan.minutes:g} min in all, {left:.0f} s for {stage}")
            console.rule(f"{stage}: {recipe.stage.name}, {recipe.train.max_steps} steps")
            result = train(recipe, log=console.print)
        if result.final_dir is None:
            raise ConfigError(f"demo stage {stage} wrote no final model")
        k = max(1, len(result.losses) // 10)
        losses[stage] = {
            "first": sum(result.losses[:k]) / k,
            "last": sum(result.losses[-k:]) / k,
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
        }
        if recipe.train.time_budget_s is not None:
            losses[stage].update(
                max_steps=recipe.train.max_steps, time_budget_s=round(recipe.train.time_budget_s, 1),
                budget_plans=[list(pair) for pair in result.budget_plans],
            )  # fmt: skip
        if previous is not None and stage != "stage2":
            frozen[stage] = check_recipe_freeze(previous, result.final_dir, recipe, tokenizer, probe_ids, console)
        previous = result.final_dir
        t = mark(stage, t)
        if stage == "lm_warmup" and not mono and plan.vision_pretrain.steps > 0:
            console.rule(f"vision_pretrain: ViT only, {plan.vision_pretrain.steps} steps")
            pretrained, losses["vision_pretrain"] = pretrain_vit(
                previous, world, out / "vision_pretrain", plan.vision_pretrain,
                seed=seed, progress=progress, log=console.print,
            )  # fmt: skip
            frozen["vision_pretrain"] = check_frozen_weights(
                previous,
                pretrained,
                "vision_pretrain",
                FreezePlan(vision=True, mlp=False, llm=False),
                probe_ids,
                console,
            )
            previous = pretrained
            t = mark("vision_pretrain", t)
    assert previous is not None

    # ---- 3. evaluation (with images and blind), grounding picture, chat
    trained, processor = load_for_inference(previous, dtype=torch.float32)
    evaluation = {"batch_size": plan.eval_batch_size, "tiles": plan.tiles}
    scores = evaluate_world(trained, processor, world, out / "eval", blind=False, **evaluation)
    blind = evaluate_world(trained, processor, world, out / "eval_blind", blind=True, **evaluation)
    t = mark("evaluation", t)
    grounding = grounding_picture(trained, processor, world, out / "grounding.png", plan.tiles)
    example = chat_example(trained, processor, world, plan.tiles)
    mark("chat", t)

    tasks = {}
    for task in [t for t in VISION_TASKS if t in scores]:
        tasks[task] = {
            "accuracy": scores[task]["accuracy"],
            "blind": blind[task]["accuracy"],
            "chance": float(summary.chance.get(task, 0.0)),
            "n": scores[task]["n"],
        }
    minutes = (time.perf_counter() - started) / 60
    report = {
        "tasks": tasks,
        "mean_accuracy": sum(v["accuracy"] for v in tasks.values()) / max(1, len(tasks)),
        "minutes": round(minutes, 2),
        "blind_mean": sum(v["blind"] for v in tasks.values()) / max(1, len(tasks)),
        "chance_mean": sum(v["chance"] for v in tasks.values()) / max(1, len(tasks)),
        "model": model,
        "quick": quick,
        "losses": losses,
        "timings_s": timings,
        "frozen_weights": frozen,
        "warmup_candidates": candidates,
        "final_checkpoint": str(previous),
        "threads": torch.get_num_threads(),
    }
    if grounding:
        report["grounding_example"] = grounding
    if example:
        report["chat_example"] = example
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    table = Table(title=f"held-out accuracy ({model}, {'quick' if quick else 'full'} demo)")
    for col in ("task", "n", "accuracy", "blind", "chance"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for task, row in tasks.items():
        table.add_row(task, str(row["n"]), f"{row['accuracy']:.3f}", f"{row['blind']:.3f}", f"{row['chance']:.3f}")
    table.add_row(
        "mean", "", f"{report['mean_accuracy']:.3f}", f"{report['blind_mean']:.3f}", f"{report['chance_mean']:.3f}"
    )
    console.print(table)
    if example:
        console.print(
            f"[bold]chat[/bold] Q: {example['question']!r}\n     A: {example['answer']!r}   (truth: {example['truth']!r})"
        )
    if grounding:
        console.print(
            f"[bold]grounding[/bold] {grounding['answer']!r} (truth {grounding['truth']!r}) drawn to {grounding['png']}"
        )
    console.print(f"final checkpoint (official layout): {previous}\nreport: {out / 'report.json'}  ({minutes:.1f} min)")
    return report
