"""ivl: InternVL-2.5 and Mono-InternVL, from checkpoint to chat, training and evaluation.

Public names are imported lazily so that `import ivl` stays fast and light (the CLI imports torch only
for the commands that need it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "InternVL": "ivl.models.internvl",
    "MonoInternVL": "ivl.models.mono",
    "InternVLConfig": "ivl.config",
    "VisionConfig": "ivl.config",
    "TextConfig": "ivl.config",
    "MonoConfig": "ivl.config",
    "get_preset": "ivl.config",
    "Processor": "ivl.processing.processor",
    "dynamic_tiles": "ivl.processing.tiling",
    "load_image": "ivl.processing.images",
    "GenerationConfig": "ivl.inference.engine",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ivl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
