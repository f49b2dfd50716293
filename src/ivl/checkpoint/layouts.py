"""Which layout a checkpoint directory is in, judged from its ``config.json``.

* ``official``: ``model_type: internvl_chat`` / ``InternVLChatModel`` (OpenGVLab's remote-code checkpoints);
* ``hf``: ``model_type: internvl`` / ``InternVLForConditionalGeneration`` (transformers-native).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ivl.errors import CheckpointError

Layout = Literal["official", "hf"]
LAYOUTS: tuple[Layout, ...] = ("official", "hf")

_OFFICIAL = ({"internvl_chat"}, {"InternVLChatModel"})
_HF = ({"internvl"}, {"InternVLForConditionalGeneration"})


def read_config(path: str | Path) -> tuple[dict[str, Any], str]:
    """``(parsed config.json, its exact text)`` of a checkpoint directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (it does not exist or is a file)")
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{file}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data, text


def layout_of_config(data: dict[str, Any], where: str = "config.json") -> Layout:
    """Layout of a parsed config.json (``model_type`` first, then ``architectures``)."""
    model_type = data.get("model_type")
    archs = set(data.get("architectures") or [])
    for layout, (types, classes) in (("official", _OFFICIAL), ("hf", _HF)):
        if model_type in types or (model_type is None and archs & classes):
            return layout  # type: ignore[return-value]
    raise CheckpointError(
        f"{where}: unknown checkpoint layout (model_type {model_type!r}, architectures {sorted(archs)}); "
        "expected internvl_chat (official) or internvl (transformers-native)"
    )


def detect_layout(path: str | Path) -> Layout:
    """``"official"`` or ``"hf"`` for a checkpoint directory; :class:`CheckpointError` otherwise."""
    data, _ = read_config(path)
    return layout_of_config(data, str(Path(path) / "config.json"))


def is_checkpoint_dir(path: str | Path) -> bool:
    """True for a directory holding a config.json of a known layout (safe to replace when saving)."""
    try:
        detect_layout(path)
    except CheckpointError:
        return False
    return True


def check_layout(layout: str) -> Layout:
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return layout  # type: ignore[return-value]
