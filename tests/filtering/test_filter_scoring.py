"""LLM scoring: reply parsing, prompt templates, decisions, the HTTP scorer against a fake OpenAI server
on loopback, the pipeline's LLM stage, and the local engine scorer on a tiny random model."""

from __future__ import annotations

import json
import time

import pytest

from ivl.errors import ConfigError
from ivl.filtering.config import FilterConfig, InputSpec, ScorerConfig
from ivl.filtering.pipeline import run_filter, unwrap_record
from ivl.filtering.rules import Sample, build_rule
from ivl.filtering.scoring import (
    OpenAIScorer,
    PromptLibrary,
    ScoringError,
    guess_domain,
    parse_score,
    render_conversation,
)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("Score: 7", 7.0),
        ("The answer is correct.\nScore: 8", 8.0),
        ("**Score:** 9/10", 9.0),
        ("score = 6.5", 6.5),
        ("I'd give a score of 3 because it has 2 errors.", 3.0),
        ("Score: 4 out of 10", 4.0),
        ("Score: 2\nOn reflection...\nFinal score: 5", 5.0),
        ("7", 7.0),
        ("7/10.", 7.0),
        ("评分：8", 8.0),
        ("Rating: 10", 10.0),
        ("Score: 0", 0.0),
    ],
)
def test_parse_score_accepts(reply, score):
    assert parse_score(reply) == (score, None)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ("", "empty"),
        ("This sample is fine.", "no score"),
        ("Score: 7 or 8", "ambiguous"),
        ("Score: 7-8", "ambiguous"),
        ("Score: 4/5", "another scale"),
        ("Score: 11", "outside"),
        ("Score: -1", "outside"),
        ("It has 3 steps and 2 errors", "no score"),
    ],
)
def test_parse_score_refuses_to_guess(reply, why):
    score, error = parse_score(reply)
    assert score is None and why in error


def test_prompt_library_shipped_and_user_templates(tmp_path):
    library = PromptLibrary()
    assert {"general", "math", "code", "ocr", "captioning", "repetition"} <= set(library.names())
    for name in library.names():
        assert "{conversation}" in library.get(name)
    (tmp_path / "math.txt").write_text("MY MATH {domain}: {conversation}")
    (tmp_path / "legal.txt").write_text("LEGAL {conversation}")
    (tmp_path / "broken.txt").write_text("no placeholder")
    user = PromptLibrary(tmp_path)
    assert user.get("math").startswith("MY MATH") and user.get("general") == library.get("general")
    assert "legal" in user.names()
    with pytest.raises(ConfigError, match="placeholder"):
        user.get("broken")
    with pytest.raises(ConfigError, match="no prompt template"):
        user.get("nothing")
    with pytest.raises(ConfigError, match="not a folder"):
        PromptLibrary(tmp_path / "missing")


def test_render_and_prompt_keep_braces_and_truncate():
    s = Sample(
        {
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is {x}?"},
                {"from": "gpt", "value": "a" * 5000 + "TAIL"},
            ],
            "image": "i.png",
        }
    )
    text = render_conversation(s, max_chars=600)
    assert (
        "1 image(s)" in text
        and "What is {x}?" in text
        and text.endswith("TAIL")
        and "omitted" in text
        and len(text) < 700
    )
    prompt = build_rule("llm_quality").prompt(s, "general", PromptLibrary())
    assert "What is {x}?" in prompt and "Score: N" in prompt


def make(question: str, answer: str, **extra) -> Sample:
    return Sample({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra})


def test_guess_domain():
    assert guess_domain(make("Write a function", "```python\ndef f(): pass\n```")) == "code"
    assert guess_domain(make("Solve x^2 = 4", "$x = \\pm 2$")) == "math"
    assert guess_domain(make("<image>\nDescribe the image.", "A cat.", image="a.png")) == "captioning"
    assert guess_domain(make("<image>\nTranscribe the text in the image.", "STOP", image="a.png")) == "ocr"
    assert guess_domain(make("Hello", "Hi there.")) == "general"
    configured = make("Hello", "Hi there.")
    configured.domain = "chat"
    assert guess_domain(configured) == "chat"


def test_llm_rule_decisions():
    rule = build_rule("llm_quality", {"enabled": True, "thresholds": {"math": 8}, "review_below": 8.5})
    assert rule.decide("Score: 6", "general")[1].action == "reject"
    assert rule.decide("Score: 7.5", "math")[1].action == "reject"  # math needs 8
    assert rule.decide("Score: 8", "general")[1].action == "review"  # in [7, 8.5)
    assert rule.decide("Score: 9", "general") == (9.0, None)
    score, flag = rule.decide("no idea", "general")
    assert score is None and flag.action == "review" and "unparsable" in flag.reason and "no idea" in flag.reason
    assert build_rule("llm_quality", {"on_unparsable": "keep"}).decide("no idea", "general") == (None, None)
    assert build_rule("llm_quality", {"on_unparsable": "reject"}).decide("no idea", "general")[1].action == "reject"
    rep = build_rule("llm_repetition", {"enabled": True})
    assert rep.threshold == 3 and rep.decide("Score: 2", "general")[1].action == "reject"
    assert rep.decide("Score: 3", "general")[1] is None
    with pytest.raises(ConfigError, match="threshold"):
        build_rule("llm_quality", {"threshold": 12})
    text, image = make("q", "a"), make("<image>\nq", "a", image="a.png")
    assert rule.applies(text) and not rule.applies(image) and rep.applies(image)


# ------------------------------------------------------------------ HTTP scorer


def test_openai_scorer_replies_in_order_with_bounded_concurrency(fake_openai):
    scorer = OpenAIScorer(fake_openai.base_url, "judge", api_key="sk-test", concurrency=3)
    prompts = [f"sample {i} SCORE={i % 11}" for i in range(12)]
    replies = scorer.score_batch(prompts)
    assert [parse_score(r)[0] for r in replies] == [float(i % 11) for i in range(12)]
    assert 1 < fake_openai.max_in_flight <= 3
    request = fake_openai.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge" and request["body"]["temperature"] == 0.0


def test_openai_scorer_retries_then_succeeds(fake_openai):
    scorer = OpenAIScorer(fake_openai.base_url, "judge", max_retries=3, backoff_s=0.01)
    replies = scorer.score_batch(["a FAIL429=2 SCORE=5", "b FAIL500=1 SCORE=6", "c SCORE=7"])
    assert [parse_score(r)[0] for r in replies] == [5.0, 6.0, 7.0]
    assert fake_openai.attempts["a FAIL429=2 SCORE=5"] == 3 and fake_openai.attempts["b FAIL500=1 SCORE=6"] == 2


def test_openai_scorer_reports_failures_with_partial_replies(fake_openai):
    scorer = OpenAIScorer(fake_openai.base_url, "judge", max_retries=1, backoff_s=0.01)
    with pytest.raises(ScoringError) as info:
        scorer.score_batch(["ok SCORE=4", "BAD400", "FAIL500=5"])
    assert parse_score(info.value.replies[0])[0] == 4.0 and info.value.errors[0] is None
    assert "HTTP 400" in info.value.errors[1] and fake_openai.attempts["BAD400"] == 1  # 4xx is not retried
    assert "gave up after 2 attempts" in info.value.errors[2] and fake_openai.attempts["FAIL500=5"] == 2


def test_openai_scorer_rate_limit_spaces_requests(fake_openai):
    scorer = OpenAIScorer(fake_openai.base_url, "judge", concurrency=8, rate_limit=40.0)
    start = time.monotonic()
    scorer.score_batch([f"p{i}" for i in range(9)])
    assert time.monotonic() - start >= 8 / 40  # starts are spaced 1/rate apart: the 9th waits 8 intervals
    assert len(fake_openai.requests) == 9


def test_openai_scorer_unreachable_endpoint_and_bad_config():
    scorer = OpenAIScorer("http://127.0.0.1:9", "judge", max_retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(ScoringError, match="ConnectError"):
        scorer.score_batch(["x"])
    with pytest.raises(ConfigError, match="concurrency"):
        OpenAIScorer("http://x", "m", concurrency=0)
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIScorer("localhost:8000", "m")


# ------------------------------------------------------------------ pipeline with LLM rules


def write_jsonl(path, records):
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))


def test_pipeline_llm_stage_against_fake_server(tmp_path, fake_openai):
    records = [
        {"conversations": [{"from": "human", "value": "q0"}, {"from": "gpt", "value": "good SCORE=9"}]},
        {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "poor SCORE=4"}]},
        {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "borderline SCORE=7"}]},
        {"conversations": [{"from": "human", "value": "q3"}, {"from": "gpt", "value": "judge confused GARBLE"}]},
        {"conversations": [{"from": "human", "value": "q4"}, {"from": "gpt", "value": "loopy SCORE=9 REP=1"}]},
        {
            "conversations": [{"from": "human", "value": "q5"}, {"from": "gpt", "value": "x" * 100}]
        },  # char_run rejects first
        {
            "conversations": [{"from": "human", "value": "<image>\nq6"}, {"from": "gpt", "value": "image SCORE=1"}],
            "image": "i.png",
        },
    ]
    write_jsonl(tmp_path / "in.jsonl", records)
    config = FilterConfig(
        inputs=[InputSpec(str(tmp_path / "in.jsonl"))],
        output_dir=str(tmp_path / "out"),
        chain=["char_run", "llm_repetition", "llm_quality"],
        rules={"llm_quality": {"enabled": True, "review_below": 8}, "llm_repetition": {"enabled": True}},
        scorer=ScorerConfig(
            base_url=fake_openai.base_url, model="judge", api_key_env=None, concurrency=4, batch_size=3
        ),
    )
    summary = run_filter(config)
    out = tmp_path / "out"
    kept = (out / "kept.jsonl").read_bytes().splitlines()
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    review = [json.loads(x) for x in (out / "review.jsonl").read_text().splitlines()]
    assert [json.loads(k)["conversations"][1]["value"] for k in kept] == [
        "good SCORE=9",
        "image SCORE=1",
    ]  # quality skips images
    assert {(r["line"], r["filter"], r["score"]) for r in rejected} == {
        (2, "llm_quality", 4.0),
        (5, "llm_repetition", 1.0),
        (6, "char_run", 100.0),
    }
    assert {(r["line"], r["filter"]) for r in review} == {(3, "llm_quality"), (4, "llm_repetition")}
    garbled = next(r for r in review if r["line"] == 4)  # both judges got an unparsable reply: both are recorded
    assert [f["filter"] for f in garbled["flags"]] == ["llm_repetition", "llm_quality"]
    assert all("unparsable" in f["reason"] and "GARBLE" not in f["reason"] for f in garbled["flags"])
    assert summary["llm"]["llm_quality"]["unparsable"] == 1 and summary["llm"]["llm_quality"]["scored"] == 3
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 6 + 4  # repetition on every survivor (6), quality on the text survivors of it (4)
    # the review lines still carry the original bytes
    assert (
        unwrap_record(json.dumps(review[0]))
        == json.dumps(records[review[0]["line"] - 1], ensure_ascii=False).encode() + b"\n"
    )


def test_pipeline_scoring_errors_stop_or_review(tmp_path, fake_openai):
    write_jsonl(
        tmp_path / "in.jsonl",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "BAD400"}]}],
    )

    def config(on_error, out):
        return FilterConfig(
            inputs=[InputSpec(str(tmp_path / "in.jsonl"))],
            output_dir=str(tmp_path / out),
            rules={"llm_quality": {"enabled": True}},
            scorer=ScorerConfig(base_url=fake_openai.base_url, api_key_env=None, max_retries=0, on_error=on_error),
        )

    with pytest.raises(ScoringError):
        run_filter(config("stop", "a"))
    assert (tmp_path / "a" / "kept.jsonl").read_bytes() == b""  # nothing committed, the run can resume later
    summary = run_filter(config("review", "b"))
    assert summary["review"] == 1 and summary["llm"]["llm_quality"]["failed"] == 1
    assert "scoring failed" in json.loads((tmp_path / "b" / "review.jsonl").read_text())["reason"]


def test_pipeline_requires_a_scorer_for_llm_rules(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [])
    config = FilterConfig(
        inputs=[InputSpec(str(tmp_path / "in.jsonl"))],
        output_dir=str(tmp_path / "o"),
        rules={"llm_quality": {"enabled": True}},
    )
    with pytest.raises(ConfigError, match="no scorer"):
        run_filter(config)


# ------------------------------------------------------------------ local engine scorer


def test_engine_scorer_matches_direct_generation():
    torch = pytest.importorskip("torch")
    from ivl.config import get_preset
    from ivl.filtering.scoring import EngineScorer
    from ivl.inference.engine import Engine, GenerationConfig, GenerationRequest
    from ivl.models.internvl import InternVL
    from ivl.processing.tokenizer import build_tokenizer

    config = get_preset("tiny")
    torch.manual_seed(0)
    model = InternVL(config).eval()
    tokenizer = build_tokenizer()  # default vocabulary: <IMG_CONTEXT> is id 500, as in the tiny preset
    engine = Engine(model, tokenizer, max_batch_size=4)
    scorer = EngineScorer(engine, max_new_tokens=6, system_message="judge")
    prompts = ["Rate this: hello", "Rate this: a longer sample with more words in it"]
    replies = scorer.score_batch(prompts)
    # Independent path: the template string built by hand, one request at a time.
    for prompt, reply in zip(prompts, replies, strict=True):
        text = f"<|im_start|>system\njudge<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ids = tokenizer(text)["input_ids"]
        direct = engine.generate(
            [GenerationRequest(input_ids=ids, generation=GenerationConfig(max_new_tokens=6, do_sample=False))]
        )
        assert reply == direct[0].text
    with pytest.raises(ScoringError) as info:
        scorer.score_batch(["short", "long " * 5000, "literal <IMG_CONTEXT> token"])
    assert info.value.replies[0] == scorer.score_batch(["short"])[0]
    assert "exceeds the context" in info.value.errors[1] and "ModelInputError" in info.value.errors[2]
