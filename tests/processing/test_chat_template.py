"""Templates as data: byte-exact prompts for internvl2_5 and internlm2-chat, and OpenAI messages -> turns."""

from __future__ import annotations

import pytest

from ivl.config import DEFAULT_SYSTEM_MESSAGE
from ivl.errors import TemplateError
from ivl.processing.template import (
    LEGACY_SYSTEM_MESSAGE,
    TEMPLATES,
    expand_videos,
    frame_lines,
    get_template,
    media_prefix,
    parse_messages,
)

# Spec §5.1, copied from the spec text (full-width comma U+FF0C and full-width period U+3002).
SPEC_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
# Mono-InternVL spec §11 (older prompt, with an ASCII ", " after InternVL).
SPEC_LEGACY = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


def test_default_system_messages_are_byte_exact():
    assert TEMPLATES["internvl2_5"].system_message.encode() == SPEC_SYSTEM.encode()
    assert DEFAULT_SYSTEM_MESSAGE == SPEC_SYSTEM
    assert "\uff0c" in SPEC_SYSTEM and SPEC_SYSTEM.endswith("\u3002")
    assert TEMPLATES["internlm2-chat"].system_message.encode() == SPEC_LEGACY.encode()
    assert LEGACY_SYSTEM_MESSAGE == SPEC_LEGACY


def test_internvl2_5_multi_turn_prompt():
    prompt = get_template("internvl2_5").render([("user", "Q1"), ("assistant", "A1"), ("user", "Q2")])
    expected = (
        f"<|im_start|>system\n{SPEC_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt == expected


def test_internlm2_chat_has_no_newline_between_turns():
    prompt = get_template("internlm2-chat").render([("user", "Q1"), ("assistant", "A1"), ("user", "Q2")])
    expected = (
        f"<|im_start|>system\n{SPEC_LEGACY}<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|>"
        "<|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert prompt == expected
    assert get_template("internlm2-chat").stop_words[0] == "<|im_end|>"


def test_mpt_edge_cases():
    template = get_template("internvl2_5")
    # an empty system string still produces an (empty) system block
    assert template.render([("user", "hi")], system_message="").startswith("<|im_start|>system\n<|im_end|>\n")
    # official MPT rule: an empty message is a bare role header
    assert template.message("assistant", "") == "<|im_start|>assistant\n"
    assert template.message("assistant", "", empty_as_header=False) == "<|im_start|>assistant\n<|im_end|>\n"
    assert template.render([("user", "hi")], add_generation_prompt=False).endswith("hi<|im_end|>\n")
    with pytest.raises(TemplateError, match="nope"):
        get_template("nope")


def test_parse_openai_messages():
    conversation = parse_messages(
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {"role": "assistant", "content": "A cat."},
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": "clip.mp4", "num_segments": 4},
                    {"type": "text", "text": "And this?"},
                ],
            },
        ]
    )
    assert conversation.system == "Be brief."
    assert conversation.turns == [
        ("user", "<image>\nWhat is this?"),
        ("assistant", "A cat."),
        ("user", "<video>\nAnd this?"),
    ]
    assert [(s.kind, s.source, s.options) for s in conversation.slots] == [
        ("image", "data:image/png;base64,AAAA", {}),
        ("video", "clip.mp4", {"num_segments": 4}),
    ]


def test_several_image_parts_get_image_k_labels():
    conversation = parse_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": "a.png", "max_num": 4},
                    {"type": "image", "image": "b.png"},
                    {"type": "text", "text": "Compare."},
                ],
            }
        ]
    )
    assert conversation.turns == [("user", "Image-1: <image>\nImage-2: <image>\nCompare.")]
    assert conversation.slots[0].options == {"max_num": 4}


def test_string_placeholders_become_unbound_slots():
    conversation = parse_messages([{"role": "user", "content": "<image>\nA <video> B <image>"}])
    assert [s.kind for s in conversation.slots] == ["image", "video", "image"]
    assert all(s.source is None for s in conversation.slots)
    # placeholders in assistant text are plain text, not slots
    assert parse_messages([{"role": "assistant", "content": "<image>"}]).slots == []


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unknown content type"),
        ([{"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}], "only allowed in user"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "only allowed first"),
        ([{"role": "user", "content": 5}], "content must be"),
        (["hello"], "mapping"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(TemplateError, match=match):
        parse_messages(messages)


def test_prefixes_and_frames():
    assert media_prefix(1, 0) == "<image>\n"
    assert media_prefix(3, 0) == "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\n"
    assert media_prefix(0, 1) == "<video>\n"
    assert frame_lines(3) == "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\n"
    assert frame_lines(2, frame_label="Frame{k}: ") == "Frame1: <image>\nFrame2: <image>\n"
    # training replaces "<video>\n" by the frame lines; a bare "<video>" gets them without the final newline
    assert expand_videos("<video>\nWhat happens?", [2]) == "Frame-1: <image>\nFrame-2: <image>\nWhat happens?"
    assert expand_videos("See <video> now", [1]) == "See Frame-1: <image> now"
    with pytest.raises(TemplateError, match="2 videos"):
        expand_videos("<video>", [1, 2])
