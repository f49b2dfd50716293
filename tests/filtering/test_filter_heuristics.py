"""Heuristic rules, each with crafted positives and negatives; media rules on real files written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageStat

from ivl.filtering.heuristics import (
    count_mojibake,
    encoding_problems,
    longest_sentence,
    longest_zero_run,
    read_image_stats,
)
from ivl.filtering.rules import RecordParseError, Sample, build_rule, parse_line


def convo(answer: str, question: str = "Question?", **extra) -> Sample:
    return Sample({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra})


def check(rule: str, sample: Sample, **params):
    return build_rule(rule, params).check(sample)


# ------------------------------------------------------------------ text helpers


def test_longest_sentence_counts_words_and_skips_code():
    assert longest_sentence("One two three. Four five!") == (3, 13)
    code = "See:\n```python\n" + "x = " + " + ".join(["a"] * 300) + "\n```\nDone."
    assert longest_sentence(code)[0] < 5
    assert longest_sentence(code, skip_code=False)[0] > 500


def test_longest_zero_run():
    assert longest_zero_run("1,000,000 and 2.05") == 6
    assert longest_zero_run("0 " * 40) == 40
    assert longest_zero_run("0.0000000000001") == 13
    assert longest_zero_run("no digits") == 0
    assert longest_zero_run("0 & 0 & 0") == 1  # '&' is not a separator


def test_encoding_problems_and_mojibake():
    clean = "café naïve Ünïcödé 你好 ✓ — “quotes” € ½ déjà vu São Paulo NÃO"
    assert encoding_problems(clean) == []
    broken = "caf\u00c3\u00a9 and it\u00e2\u20ac\u2122s"  # "café" and "it’s" read as cp1252
    assert count_mojibake(broken) == 2
    assert any("mojibake" in p for p in encoding_problems(broken))
    assert encoding_problems(broken, max_mojibake=2) == []
    assert any("U+FFFD" in p for p in encoding_problems("bad \ufffd char"))
    assert any("control" in p for p in encoding_problems("bell \x07 here"))
    assert encoding_problems("tab\tnew\nline\r") == []
    assert any("surrogate" in p for p in encoding_problems(json.loads('"x\\ud800y"')))


# ------------------------------------------------------------------ text rules


def test_answer_length():
    assert check("answer_length", convo("   ")).score == 0
    assert check("answer_length", convo("x" * 50), max_chars=40).score == 50
    assert check("answer_length", convo("Yes")) is None
    no_answer = Sample({"conversations": [{"from": "human", "value": "hi"}]})
    assert check("answer_length", no_answer) is not None


def test_sentence_length():
    salad = " ".join(["word"] * 250)
    assert check("sentence_length", convo(salad)).score == 250
    assert check("sentence_length", convo("好" * 2000)).score == 2000  # no spaces: caught by characters
    normal = "This is fine. " * 100
    assert check("sentence_length", convo(normal)) is None


def test_zero_run_rule():
    assert check("zero_run", convo("The matrix is " + "0, " * 40)).score == 40
    assert check("zero_run", convo("x = 1,000,000,000,000 and 0.001")) is None
    assert check("zero_run", convo("ok", question="0" * 64)) is not None  # all turns by default
    assert check("zero_run", convo("ok", question="0" * 64), fields="answers") is None


def test_encoding_rule():
    assert check("encoding", convo("The r\u00c3\u00a9sum\u00c3\u00a9 is ready")) is not None
    assert check("encoding", convo("Le résumé est prêt, 你好")) is None


def test_turn_order():
    def roles(*rs):
        return Sample({"conversations": [{"from": r, "value": "x"} for r in rs]})

    assert check("turn_order", roles("system", "human", "gpt", "human", "gpt")) is None
    assert check("turn_order", roles("gpt", "human", "gpt")) is not None
    assert check("turn_order", roles("human", "human", "gpt")) is not None
    assert check("turn_order", roles("human", "gpt", "human")) is not None
    assert check("turn_order", roles("system")) is not None


@pytest.mark.parametrize(
    ("question", "answer", "media", "flagged"),
    [
        ("hi", "ok", {}, False),
        ("<image>\nhi", "ok", {}, True),  # placeholder without an image
        ("hi", "ok", {"image": "a.png"}, False),  # single image: the loader prepends it
        ("<image>\nhi", "ok", {"image": "a.png"}, False),
        ("<image><image>hi", "ok", {"image": "a.png"}, True),
        ("<image>\n<image>\nhi", "ok", {"image": ["a.png", "b.png"]}, False),
        ("<image>\nhi", "ok", {"image": ["a.png", "b.png"]}, True),
        ("hi", "ok", {"image": ["a.png", "b.png"]}, True),
        ("hi", "see <image>", {"image": "a.png"}, True),  # placeholder in an answer
        ("<video>\nhi", "ok", {"video": "v.mp4"}, False),
        ("hi", "ok", {"video": "v.mp4"}, False),
        ("<image>\nhi", "ok", {"video": "v.mp4"}, True),
        ("<video>\nhi", "ok", {}, True),
    ],
)
def test_image_placeholders(question, answer, media, flagged):
    assert (check("image_placeholders", convo(answer, question, **media)) is not None) is flagged


def test_image_placeholders_strict_mode():
    assert check("image_placeholders", convo("ok", "hi", image="a.png"), allow_implicit=False) is not None


# ------------------------------------------------------------------ media rules


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def media_dir(tmp_path):
    noise(64, 48).save(tmp_path / "good.png")
    noise(64, 48).save(tmp_path / "good.jpg", quality=90)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "blank.png")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "blank.jpg", quality=75)
    noise(6, 6).save(tmp_path / "tiny.png")
    noise(400, 10).save(tmp_path / "strip.png")
    for name in ("good.png", "good.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"trunc_{name}").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    return tmp_path


def image_sample(root, image, **extra) -> Sample:
    return Sample(
        {
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
            "image": image,
            **extra,
        },
        root=str(root),
    )


def test_read_image_stats(media_dir):
    stats = read_image_stats(str(media_dir / "good.jpg"))
    assert (stats.width, stats.height) == (64, 48) and stats.std > 30
    assert read_image_stats(str(media_dir / "blank.png")).std == 0
    assert read_image_stats(str(media_dir / "blank.jpg")).std < 2
    # A yellow cross on a grey of the same luminance: blank in grayscale, plainly not blank in colour.
    img = Image.new("RGB", (80, 40), (197, 199, 197))
    img.paste((235, 200, 20), (66, 0, 74, 10))
    img.save(media_dir / "iso.png")
    assert abs(ImageStat.Stat(img.convert("L")).stddev[0]) < 2 < read_image_stats(str(media_dir / "iso.png")).std


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ("missing.png", "missing image"),
        ("trunc_good.png", "unreadable"),
        ("trunc_good.jpg", "unreadable"),
        ("garbage.png", "unreadable"),
        (["good.png", "missing.jpg"], "missing image 'missing.jpg'"),
    ],
)
def test_media_flags_missing_and_broken_images(media_dir, image, fragment):
    flag = check("media", image_sample(media_dir, image))
    assert flag is not None and fragment in flag.reason


def test_media_passes_good_images_and_checks_declared_size(media_dir):
    assert check("media", image_sample(media_dir, "good.jpg")) is None
    assert check("media", image_sample(media_dir, ["good.png", "good.jpg"])) is None
    assert check("media", image_sample(media_dir, "good.png", width=64, height=48)) is None
    assert "declared size" in check("media", image_sample(media_dir, "good.png", width=48, height=64)).reason
    assert check("media", image_sample(media_dir, "good.png", width=48, height=64), check_declared_size=False) is None


def test_media_video(media_dir):
    import av

    path = media_dir / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 40, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    (media_dir / "broken.mp4").write_bytes(b"\x00" * 100)

    def vid(name):
        return Sample(
            {
                "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A."}],
                "video": name,
            },
            root=str(media_dir),
        )

    assert check("media", vid("clip.mp4")) is None
    assert "missing video" in check("media", vid("none.mp4")).reason
    assert "unreadable video" in check("media", vid("broken.mp4")).reason
    assert check("media", vid("broken.mp4"), decode_video=False) is None


@pytest.mark.parametrize(
    ("image", "fragment"),
    [("blank.png", "blank"), ("blank.jpg", "blank"), ("tiny.png", "side"), ("strip.png", "aspect")],
)
def test_degenerate_images(media_dir, image, fragment):
    flag = check("degenerate_image", image_sample(media_dir, image))
    assert flag is not None and fragment in flag.reason


def test_degenerate_passes_good_and_leaves_unreadable_to_media(media_dir):
    assert check("degenerate_image", image_sample(media_dir, ["good.png", "good.jpg"])) is None
    assert check("degenerate_image", image_sample(media_dir, "garbage.png")) is None
    assert check("degenerate_image", image_sample(media_dir, "strip.png"), max_aspect=50) is None


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("raw", "filter_name", "fragment"),
    [
        (b"\n", "parse", "blank"),
        (b"{bad json\n", "parse", "invalid JSON"),
        (b'{"a": "\xff"}\n', "parse", "UTF-8"),
        (b"[1, 2]\n", "schema", "JSON object"),
        (b'{"conversations": []}\n', "schema", "non-empty"),
        (b'{"conversations": [{"from": "bot", "value": "x"}]}\n', "schema", "human/gpt/system"),
        (b'{"conversations": [{"from": "human", "value": 3}]}\n', "schema", "string"),
        (b'{"conversations": [{"from": "human", "value": "x"}], "image": 5}\n', "schema", "image"),
        (b'{"conversations": [{"from": "human", "value": "x"}], "image": "a", "video": "b"}\n', "schema", "not both"),
    ],
)
def test_parse_line_errors(raw, filter_name, fragment):
    with pytest.raises(RecordParseError, match=fragment) as info:
        parse_line(raw, "f.jsonl", 7)
    assert info.value.filter == filter_name and "f.jsonl:7" in str(info.value)
