"""Token-for-token parity with transformers' InternVLProcessor (same system prompt, same tile settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from ivl.config import DEFAULT_SYSTEM_MESSAGE
from ivl.processing.processor import Processor
from ivl.processing.tiling import IMAGENET_MEAN, IMAGENET_STD
from ivl.processing.tokenizer import EXTRA_SPECIAL_TOKENS

# The chat template that transformers' conversion script writes for InternVL checkpoints (reference data).
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)


class NoVideoInternVLProcessor(InternVLProcessor):
    """transformers' processor without its video slot (that needs torchvision, which we do not install)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(
            image_processor, tokenizer, image_seq_length=image_seq_length, chat_template=chat_template, **kwargs
        )


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    # transformers' processor also reads a `video_token` from the tokenizer; add it (after all our ids)
    tok = AutoTokenizer.from_pretrained(
        tiny_tokenizer_dir, extra_special_tokens={**EXTRA_SPECIAL_TOKENS, "video_token": "<video>"}
    )
    tok.add_tokens(["<video>"], special_tokens=True)
    return tok


def _pair(tokenizer, size: int, max_patches: int = 12):
    image_processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
        size={"height": size, "width": size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    seq = (size // 14) ** 2 // 4
    hf = NoVideoInternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=seq, chat_template=HF_CHAT_TEMPLATE
    )
    return hf, Processor(tokenizer, image_size=size)


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf(hf, conversations, images):
    texts = [hf.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    return hf(text=texts, images=images, padding=True, return_tensors="pt")


def _with_system(messages):
    # transformers' template has no default system turn: pass the official one explicitly (spec §4.6 item 4)
    return [{"role": "system", "content": DEFAULT_SYSTEM_MESSAGE}, *messages]


def test_single_image_448(tokenizer):
    hf, ours = _pair(tokenizer, 448)
    image = _image(900, 600, 0)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    reference = _hf(hf, [_with_system(hf_messages)], [image])
    our_messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}],
        }
    ]
    out = ours(our_messages)
    assert out.input_ids.shape[1] > 256 * 7
    assert torch.equal(out.input_ids, reference["input_ids"])
    assert torch.equal(out.attention_mask, reference["attention_mask"])
    torch.testing.assert_close(out.pixel_values, reference["pixel_values"], atol=1e-6, rtol=0)


def test_multi_image_with_labels_and_official_budget(tokenizer):
    hf, ours = _pair(tokenizer, 112, max_patches=6)  # the official budget for 2 images: max(1, 12 // 2) = 6
    images = [_image(500, 300, 1), _image(120, 640, 2)]
    hf_messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Image-1: "},
                {"type": "image"},
                {"type": "text", "text": "Image-2: "},
                {"type": "image"},
                {"type": "text", "text": "What differs?"},
            ],
        }
    ]
    reference = _hf(hf, [_with_system(hf_messages)], [images])
    out = ours("What differs?", images=images, max_num=12)
    assert torch.equal(out.input_ids, reference["input_ids"])
    torch.testing.assert_close(out.pixel_values, reference["pixel_values"], atol=1e-6, rtol=0)


def test_multi_turn_text_only(tokenizer):
    hf, ours = _pair(tokenizer, 112)
    messages = [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Count to three: 1, 2, 3?"},
    ]
    texts = [hf.apply_chat_template(_with_system(messages), add_generation_prompt=True, tokenize=False)]
    reference = hf(text=texts, return_tensors="pt")
    assert torch.equal(ours(messages).input_ids, reference["input_ids"])


def test_left_padded_batch(tokenizer):
    hf, ours = _pair(tokenizer, 112)
    images = [_image(300, 300, 3), _image(800, 200, 4)]
    hf_batch = [
        _with_system([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Short?"}]}]),
        _with_system(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A much longer question here?"}]}]
        ),
    ]
    reference = _hf(hf, hf_batch, [[images[0]], [images[1]]])
    out = ours(["Short?", "A much longer question here?"], images=[images[0], images[1]])
    assert torch.equal(out.input_ids, reference["input_ids"])
    assert torch.equal(out.attention_mask, reference["attention_mask"])
    assert (out.attention_mask == 0).any()  # the batch really was padded
    torch.testing.assert_close(out.pixel_values, reference["pixel_values"], atol=1e-6, rtol=0)
