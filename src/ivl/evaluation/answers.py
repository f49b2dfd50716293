"""Answer normalisation and extraction: turn a model's free-form reply into something a metric can compare.

Two families live here:

* **normalisers** that reproduce the official benchmark conventions (VQA answer normalisation, ANLS and
  exact-match text folding), so that our scores match the published evaluation scripts;
* **extractors** for test-time scaling: the final ``Answer: X`` line of a chain-of-thought reply, an option
  letter, a number, a yes/no label, and a canonical form used to count votes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

AnswerKind = Literal["letter", "number", "phrase", "yesno", "box"]

# --------------------------------------------------------------------------------------------------------
# VQA answer normalisation (official VQA evaluation / VLMEvalKit `process_answer`)

_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is written "(?!<=\d)(\.)(?!\d)": the first group is a (typo'd) lookahead that never
# fires, so its effect is "drop every period not followed by a digit". We reproduce the effect.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings restored to their contraction, as in the official VQA table (its capitalised keys
# are unreachable after lower-casing and are left out; behaviour is unchanged).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip


def _vqa_punctuation(text: str) -> str:
    """Official rule: a mark touching a space (or any text with a digit-comma-digit) is deleted, else spaced."""
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _VQA_PUNCT:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The standard VQA answer normalisation: punctuation, number words, articles, contractions, case."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def normalize_anls(text: str) -> str:
    """ANLS folding (DocVQA/InfoVQA scripts): lower-case and collapse whitespace."""
    return " ".join(text.strip().lower().split())


def normalize_text(text: str) -> str:
    """Exact-match folding: case, surrounding whitespace/quotes and trailing sentence punctuation are ignored."""
    text = " ".join(text.strip().lower().split())
    return text.strip("\"'`").rstrip(".!?。").strip()


# --------------------------------------------------------------------------------------------------------
# chain-of-thought final answers

_FINAL_LINE = re.compile(r"(?:final\s+)?answer\s*(?:is)?\s*[:：]\s*(.*)", re.IGNORECASE)
_BOXED = "\\boxed{"


def _unbox(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (brace-balanced); None when there is none or it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    begin = start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def _clean_final(text: str) -> str:
    text = text.strip()
    boxed = _unbox(text)
    text = (text if boxed is None else boxed).strip().strip("*_`$ ").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text.rstrip(".。").strip()


def extract_final_answer(text: str) -> str:
    """The answer a chain-of-thought reply commits to.

    Priority: the last line containing ``Answer: X`` (also ``Final answer:``; a ``\\boxed{}`` inside it is
    unwrapped), then the last ``\\boxed{X}`` anywhere, then the whole reply, so a direct answer comes back
    unchanged (apart from surrounding whitespace) and letter/number extraction can still search all of it.
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        match = _FINAL_LINE.search(line)
        if match and match.group(1).strip():
            return _clean_final(match.group(1))
    boxed = _unbox(text)
    if boxed is not None:
        return _clean_final(boxed)
    return text.strip()


# --------------------------------------------------------------------------------------------------------
# option letters

_LEADING_LETTER = re.compile(r"^\s*[(\[]?\s*([A-Z])\s*(?:[)\]]|[.:,：]|$)")
_CUED_LETTER = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|：)?\s*[(\[]?([A-Z])\b(?![A-Za-z'])")
_TOKENS = re.compile(r"[A-Za-z0-9']+")


def extract_choice(text: str, choices: Mapping[str, str] | Sequence[str]) -> str | None:
    """The option letter a reply selects, or None when it cannot be told.

    ``choices`` maps letters to option texts (or is just the letters). Rules, first hit wins:
    a reply that starts with a marked letter (``B``, ``(B)``, ``B.``, ``B: cat``); a cue (``answer is B``,
    ``option B``); exactly one distinct option letter standing alone as a word; exactly one option
    whose text occurs in the reply (case-insensitive).
    """
    options = dict(choices) if isinstance(choices, Mapping) else {c: "" for c in choices}
    letters = set(options)
    reply = text.strip()
    if not reply:
        return None
    match = _LEADING_LETTER.match(reply)
    if match and match.group(1) in letters:
        return match.group(1)
    cued = [m.group(1) for m in _CUED_LETTER.finditer(reply) if m.group(1) in letters]
    if cued:
        return cued[-1]
    standalone = {tok for tok in _TOKENS.findall(reply) if tok in letters}
    if len(standalone) == 1:
        return standalone.pop()
    lowered = reply.lower()
    hits = [k for k, v in options.items() if str(v).strip() and str(v).strip().lower() in lowered]
    if len(hits) > 1:  # "red" and "dark red" both occur: keep the options not contained in another hit
        hits = [k for k in hits if not any(k != o and options[k].lower() in options[o].lower() for o in hits)]
    return hits[0] if len(hits) == 1 else None


# --------------------------------------------------------------------------------------------------------
# numbers, yes/no

_NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:,\d{3})*(?:\.\d+)?%?|(?<![\w.])[-−]?\.\d+%?")


def extract_number(text: str) -> float | None:
    """The last number in the text (thousands separators and a minus sign handled; ``%`` divides by 100)."""
    found = _NUMBER.findall(text)
    if not found:
        words = normalize_vqa_answer(text).split()
        digits = [w for w in words if w.isdigit()]
        return float(digits[-1]) if digits else None
    token = found[-1].replace(",", "").replace("−", "-")
    if token.endswith("%"):
        return float(token[:-1]) / 100.0
    return float(token)


def parse_yes_no(text: str) -> Literal["yes", "no"]:
    """POPE rule of the official evaluation: first sentence; any word ``no``/``not`` means no, else yes.

    The official script matches ``No``/``no``/``not`` case-sensitively; we fold case (``NOT``, ``Not``
    count as no), which only differs on replies the official rule misreads.
    """
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


def canonical_answer(text: str, kind: AnswerKind, choices: Mapping[str, str] | None = None) -> str | None:
    """A comparable key for voting: same key ⇔ same answer. None when nothing usable can be read.

    ``letter`` → option letter; ``number`` → the number in shortest float form (falls back to the phrase);
    ``yesno`` → yes/no; ``box`` → the first four numbers, rounded; ``phrase`` → the VQA-normalised text.
    """
    if kind == "letter":
        return extract_choice(text, choices or {})
    if kind == "number":
        value = extract_number(text)
        if value is not None:
            return repr(float(value))
    if kind == "yesno":
        return parse_yes_no(text) if text.strip() else None
    if kind == "box":
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
        return ",".join(str(round(float(v))) for v in numbers[:4]) if len(numbers) >= 4 else None
    key = normalize_vqa_answer(text)
    return key or None
