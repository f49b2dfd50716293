"""Processor: prompts, image-token expansion, tile budgets, batching, labels, training records, save/load."""

from __future__ import annotations

import dataclasses
import io
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from ivl.config import DEFAULT_SYSTEM_MESSAGE, InternVLConfig, VisionConfig, get_preset
from ivl.errors import ConfigError, DataError, TemplateError
from ivl.processing.processor import IGNORE_INDEX, Processor
from ivl.processing.template import LEGACY_SYSTEM_MESSAGE
from ivl.processing.tiling import closest_grid, dynamic_tiles
from ivl.processing.tokenizer import build_tokenizer

TINY = 56  # the tiny preset's tile size: (56 / 14)^2 / 4 = 4 tokens per tile


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def lm2_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm2")
    build_tokenizer(flavour="internlm2", save_dir=path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def proc(tok):
    return Processor.from_config(tok, get_preset("tiny"))


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _spans(ids: list[int], proc: Processor) -> list[int]:
    """Number of <IMG_CONTEXT> tokens in each <img>...</img> span, checking the span is well formed."""
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == proc.img_start_id:
            j = ids.index(proc.img_end_id, i)
            inner = ids[i + 1 : j]
            assert set(inner) == {proc.image_token_id}
            spans.append(len(inner))
            i = j
        i += 1
    return spans


def test_settings_come_from_the_config(tok):
    config = get_preset("tiny")
    proc = Processor.from_config(tok, config)
    assert proc.num_image_token == config.num_image_token == 4
    assert proc.image_size == 56 and proc.template.name == "internvl2_5" and proc.max_num == 12
    big = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=448), force_image_size=448)
    assert Processor.from_config(tok, big).num_image_token == 256
    with pytest.raises(ConfigError, match="image_token_id 7"):
        Processor.from_config(tok, dataclasses.replace(config, image_token_id=7))


def test_image_expansion_counts(proc, tok):
    image = _image(300, 100)
    out = proc("Describe.", images=image)
    ids = out.input_ids[0].tolist()
    grid = closest_grid(300, 100, image_size=TINY)
    tiles = grid[0] * grid[1] + 1
    assert out.num_patches_list == [tiles]
    assert _spans(ids, proc) == [4 * tiles]
    assert out.pixel_values.shape == (tiles, 3, TINY, TINY)
    assert out.image_flags.tolist() == [1] * tiles
    assert out.prompts[0].endswith("<|im_start|>user\n<image>\nDescribe.<|im_end|>\n<|im_start|>assistant\n")
    # everything around the image span is the tokenizer's own encoding of the prompt text
    text = out.prompts[0].replace("<image>", proc.expand_image_tokens(tiles))
    assert ids == tok(text).input_ids


def test_text_only_request(proc, tok):
    out = proc("Just text, no images!")
    assert out.pixel_values is None and out.image_flags is None and out.num_patches_list == []
    assert out.input_ids[0].tolist() == tok(out.prompts[0]).input_ids
    assert out.attention_mask.all()
    expected = f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\nJust text, no images!<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompts[0] == expected


def test_multi_image_labels_and_budget(proc):
    images = [_image(640, 480, 1), _image(100, 700, 2)]
    out = proc("Compare them.", images=images)
    assert "Image-1: <image>\nImage-2: <image>\nCompare them." in out.prompts[0]
    # official budget: max(1, 12 // 2) = 6 per image, thumbnail each
    expected = [dynamic_tiles(im, max_num=6, image_size=TINY).num_tiles for im in images]
    assert out.num_patches_list == expected
    assert _spans(out.input_ids[0].tolist(), proc) == [4 * n for n in expected]
    undivided = Processor.from_config(proc.tokenizer, get_preset("tiny"), divide_tile_budget=False)
    assert undivided("x", images=images).num_patches_list == [
        dynamic_tiles(im, max_num=12, image_size=TINY).num_tiles for im in images
    ]


def test_placeholders_are_respected(proc):
    images = [_image(64, 64, 1), _image(200, 60, 2)]
    out = proc("First <image> then <image>.", images=images)
    assert "Image-1" not in out.prompts[0]
    assert out.prompts[0].count("<image>") == 2
    with pytest.raises(TemplateError):
        proc("Only <image> once", images=images)
    with pytest.raises(TemplateError):
        proc("<image> <image> <image>", images=images)


def test_per_request_tile_control(proc):
    image = _image(1000, 400)
    assert proc("x", images=image, max_num=2).num_patches_list == [3]  # (2,1) + thumbnail
    assert proc("x", images=image, max_num=1).num_patches_list == [1]
    assert proc("x", images=image, min_num=6, max_num=6).num_patches_list == [7]
    parts = [
        {"role": "user", "content": [{"type": "image", "image": image, "max_num": 2}, {"type": "text", "text": "x"}]}
    ]
    assert proc(parts).num_patches_list == [3]
    with pytest.raises(ConfigError):
        proc("x", images=image, min_num=3, max_num=2)


def test_openai_messages_with_payloads(proc, tmp_path):
    path = tmp_path / "a.png"
    _image(120, 80, 3).save(path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": "What?"}],
        },
        {"role": "assistant", "content": "Noise."},
        {"role": "user", "content": "And now?"},
    ]
    out = proc(messages)
    assert out.prompts[0] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat?<|im_end|>\n"
        "<|im_start|>assistant\nNoise.<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out.num_patches_list == [dynamic_tiles(Image.open(path), image_size=TINY).num_tiles]


def test_parts_without_payload_take_the_images_argument(proc):
    images = [_image(64, 64, 1), _image(300, 90, 2)]
    parts = [{"type": "image"}, {"type": "text", "text": "A"}, {"type": "image"}, {"type": "text", "text": "B"}]
    out = proc([{"role": "user", "content": parts}], images=images)
    assert "Image-1: <image>\nAImage-2: <image>\nB" in out.prompts[0]
    assert out.num_patches_list == [dynamic_tiles(im, max_num=6, image_size=TINY).num_tiles for im in images]
    with pytest.raises(TemplateError):
        proc([{"role": "user", "content": parts}], images=images[:1])


def test_public_exports():
    import ivl

    assert ivl.Processor is Processor and ivl.dynamic_tiles is dynamic_tiles
    assert ivl.load_image(np.zeros((2, 3, 3), np.uint8)).size == (3, 2)


def test_batch_left_padding_never_masks_real_tokens(tok):
    # Make the pad token a real, frequent token: "!" has id 0, like in the Qwen vocabulary (spec §10.12).
    bang = AutoTokenizer.from_pretrained(tok.name_or_path)
    bang.pad_token = "!"
    assert bang.pad_token_id == 0
    proc = Processor.from_config(bang, get_preset("tiny"))
    out = proc(["Hi!!!", "A much longer question with an image?"], images=[None, _image(90, 60)])
    single = [
        proc("Hi!!!").input_ids[0],
        proc("A much longer question with an image?", images=_image(90, 60)).input_ids[0],
    ]
    lengths = [len(s) for s in single]
    assert out.input_ids.shape == (2, max(lengths))
    assert out.attention_mask.sum(1).tolist() == lengths
    short = out.input_ids[0]
    pad = max(lengths) - lengths[0]
    assert (short[:pad] == 0).all() and (out.attention_mask[0, :pad] == 0).all()  # left padding
    assert torch.equal(short[pad:], single[0])
    assert (short[pad:] == 0).sum() >= 3  # the three "!" are real tokens with id 0 ...
    assert out.attention_mask[0, pad:].all()  # ... and stay attended
    assert out.num_patches_per_sample == [[], [out.num_patches_list[0]]]


def test_labels_cover_only_assistant_content_and_im_end(proc, tok):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": _image(64, 64)}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "Second!"},
    ]
    out = proc(messages, return_labels=True)
    ids, labels = out.input_ids[0], out.labels[0]
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    assert tok.decode(ids[kept]) == "First answer.<|im_end|>Second!<|im_end|>"
    assert not out.prompts[0].endswith("<|im_start|>assistant\n")  # ends with an answer: no generation prompt
    # the newline after each <|im_end|> carries no loss
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for pos in (ids == im_end).nonzero().flatten().tolist():
        if labels[pos] != IGNORE_INDEX:
            assert labels[pos + 1] == IGNORE_INDEX


def _official_labels(tok, turns, system, expanded_images, add_bos):
    """Transcription of the official preprocess_internvl2_5 masking (spec §6.6)."""
    batches, roles = [f"<|im_start|>system\n{system}<|im_end|>\n"], ["system"]
    image_iter = iter(expanded_images)
    for role, text in turns:
        if role == "human":
            while "<image>" in text:
                text = text.replace("<image>", next(image_iter), 1)
            batches.append(f"<|im_start|>user\n{text}<|im_end|>\n")
        else:
            batches.append(f"<|im_start|>assistant\n{text}<|im_end|>\n")
        roles.append(role)
    if add_bos:
        batches[0] = tok.bos_token + batches[0]
    encoded = [tok(b).input_ids for b in batches]
    if add_bos:
        encoded = [e[1:] for e in encoded]
    ignore_len = len(tok("<|im_start|>assistant\n").input_ids) - (1 if add_bos else 0)
    ids, labels = [], []
    for role, e in zip(roles, encoded, strict=True):
        ids += e
        if role in ("system", "human"):
            labels += [IGNORE_INDEX] * len(e)
        else:
            target = list(e)
            target[:ignore_len] = [IGNORE_INDEX] * ignore_len
            target[-1:] = [IGNORE_INDEX]
            labels += target
    return ids, labels


@pytest.mark.parametrize("flavour", ["qwen2", "internlm2"])
def test_encode_conversation_matches_official_masking(tok, lm2_tok, flavour):
    tokenizer = tok if flavour == "qwen2" else lm2_tok
    proc = Processor.from_config(tokenizer, get_preset("tiny"))
    images = [_image(400, 300, 1), _image(50, 300, 2)]
    record = [
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nDescribe both."},
        {"from": "gpt", "value": "Two noisy pictures."},
        {"from": "human", "value": "Which is taller?"},
        {"from": "gpt", "value": "The second one, by far!"},
    ]
    sample = proc.encode_conversation(record, images=images, max_num=12)
    tiles = [dynamic_tiles(im, max_num=6, image_size=TINY).num_tiles for im in images]  # max(1, 12 // 2)
    assert sample.num_patches_list == tiles
    expanded = [proc.expand_image_tokens(n) for n in tiles]
    turns = [(t["from"], t["value"]) for t in record]
    ids, labels = _official_labels(tokenizer, turns, DEFAULT_SYSTEM_MESSAGE, expanded, add_bos=flavour == "internlm2")
    assert sample.input_ids.tolist() == ids
    assert sample.labels.tolist() == labels
    if flavour == "internlm2":
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    input_ids, label_ids, pixel_values, num_patches = sample  # unpacks like a tuple
    assert input_ids is sample.input_ids and label_ids is sample.labels
    assert pixel_values.shape[0] == sum(num_patches) and sample.image_flags.sum() == sum(tiles)
    # the inference path renders and masks the same conversation identically
    messages = [{"role": "user" if r == "human" else "assistant", "content": v} for r, v in turns]
    called = proc(messages, images=images, return_labels=True, max_num=12)
    assert called.input_ids[0].tolist() == ids and called.labels[0].tolist() == labels


def test_encode_conversation_record_rules(proc, tok):
    image = _image(200, 100)
    # one image without placeholder: "<image>\n" prepended to the first human turn; system override; leading gpt dropped
    record = [
        {"from": "system", "value": "Custom system."},
        {"from": "gpt", "value": "stray"},
        {"from": "human", "value": "What is it?"},
        {"from": "gpt", "value": "Noise."},
    ]
    sample = proc.encode_conversation(record, images=image)
    text = tok.decode(sample.input_ids)
    assert text.startswith("<|im_start|>system\nCustom system.<|im_end|>\n<|im_start|>user\n<img>")
    assert "stray" not in text and text.endswith(
        "</img>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nNoise.<|im_end|>\n"
    )
    # text-only: no image tokens, placeholders stay literal, no pixels
    plain = proc.encode_conversation([{"from": "human", "value": "Say <image>"}, {"from": "gpt", "value": "ok"}])
    assert plain.pixel_values is None and plain.num_patches_list == [] and plain.image_flags is None
    assert proc.image_token_id not in plain.input_ids.tolist()
    assert "Say <image>" in tok.decode(plain.input_ids)
    with pytest.raises(DataError, match="1 <image> placeholders but 2 images"):
        proc.encode_conversation([{"from": "human", "value": "<image>"}], images=[image, image])
    with pytest.raises(DataError, match="unknown 'from'"):
        proc.encode_conversation([{"from": "bot", "value": "x"}])
    with pytest.raises(DataError, match="cuts through an image"):
        proc.encode_conversation(record, images=image, max_length=60)
    short = proc.encode_conversation(
        [{"from": "human", "value": "a b c d e f g"}, {"from": "gpt", "value": "h i j"}], max_length=10
    )
    assert len(short.input_ids) == len(short.labels) == 10


def _video(frames: int = 12) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_video_request_and_record(proc, tok):
    video = _video()
    out = proc("What happens?", videos=video, num_segments=4)
    assert "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nFrame-4: <image>\nWhat happens?" in out.prompts[0]
    assert out.num_patches_list == [1, 1, 1, 1]  # one tile per frame, no thumbnail
    assert out.pixel_values.shape == (4, 3, TINY, TINY)
    assert _spans(out.input_ids[0].tolist(), proc) == [4] * 4
    labelled = Processor.from_config(proc.tokenizer, get_preset("tiny"), frame_label="Frame{k}: ")
    assert "Frame1: <image>\nFrame2: <image>\n" in labelled("x", videos=video, num_segments=2).prompts[0]
    record = [{"from": "human", "value": "Summarise."}, {"from": "gpt", "value": "Fade."}]
    sample = proc.encode_conversation(record, videos=video, num_segments=3)
    assert sample.num_patches_list == [1, 1, 1]
    assert tok.decode(sample.input_ids).count("Frame-") == 3
    frames = [_image(40, 40, k) for k in range(2)]  # pre-sampled frames are used as given
    assert proc("x", videos=[frames]).num_patches_list == [1, 1]


def test_mixed_image_and_video_order(proc):
    image = _image(300, 100)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": _video(), "num_segments": 2},
                {"type": "image", "image": image},
                {"type": "text", "text": "Relate them."},
            ],
        }
    ]
    out = proc(messages)
    image_tiles = dynamic_tiles(image, image_size=TINY).num_tiles
    assert out.num_patches_list == [1, 1, image_tiles]  # prompt order: frames first, then the image
    assert out.prompts[0].count("<image>") == 3


def test_mono_template_and_bos(lm2_tok):
    config = dataclasses.replace(get_preset("tiny"), template="internlm2-chat")
    proc = Processor.from_config(lm2_tok, config)
    out = proc("Hi", return_labels=True)
    ids = out.input_ids[0].tolist()
    assert ids[0] == lm2_tok.bos_token_id and ids.count(lm2_tok.bos_token_id) == 1
    assert out.prompts[0] == (
        f"<|im_start|>system\n{LEGACY_SYSTEM_MESSAGE}<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    )
    sample = proc.encode_conversation([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}])
    kept = sample.input_ids[sample.labels != IGNORE_INDEX]
    assert lm2_tok.decode(kept) == "A<|im_end|>"  # no separator tail to mask in internlm2-chat
    assert proc.stop_token_ids[0] == lm2_tok.convert_tokens_to_ids("<|im_end|>")


def test_save_and_load(proc, tmp_path):
    proc.save_pretrained(tmp_path / "p")
    again = Processor.from_pretrained(tmp_path / "p")
    assert again.to_dict() == proc.to_dict()
    image = _image(120, 90)
    a, b = proc("x", images=image), again("x", images=image)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    # from a model directory with an official internvl_chat config.json
    model_dir = tmp_path / "model"
    proc.tokenizer.save_pretrained(model_dir)
    official = {
        "model_type": "internvl_chat",
        "template": "internvl2_5",
        "force_image_size": 56,
        "downsample_ratio": 0.5,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "use_thumbnail": True,
        "vision_config": {"patch_size": 14, "image_size": 56},
    }
    (model_dir / "config.json").write_text(json.dumps(official))
    loaded = Processor.from_pretrained(model_dir)
    assert (loaded.image_size, loaded.num_image_token, loaded.max_num) == (56, 4, 6)


def test_processed_inputs_to(proc):
    out = proc("x", images=_image(64, 64)).to(dtype=torch.bfloat16)
    assert out.pixel_values.dtype == torch.bfloat16 and out.input_ids.dtype == torch.long
    assert out.num_patches_list == [1]


def test_bad_requests(proc):
    with pytest.raises(TemplateError):
        proc(["a", "b"], images=[_image(10, 10)])  # a batch needs one images entry per sample
    with pytest.raises(TemplateError):
        proc([])
    with pytest.raises(ConfigError):
        Processor(proc.tokenizer, image_size=50)
    config = InternVLConfig(vision=VisionConfig(image_size=56), force_image_size=56, image_token_id=500)
    assert Processor.from_config(proc.tokenizer, config).num_image_token == 4
