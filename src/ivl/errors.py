"""Typed errors: every failure names the input that caused it, so users can fix it without a debugger."""

from __future__ import annotations


class IvlError(Exception):
    """Base class of every error ivl raises on purpose."""


class ConfigError(IvlError, ValueError):
    """A configuration (dataclass, JSON, YAML recipe) is invalid or inconsistent."""


class CheckpointError(IvlError):
    """A checkpoint directory cannot be read or written: missing shard, key or shape mismatch, unknown layout."""


class ImageError(IvlError, ValueError):
    """An image (or video frame) cannot be decoded or is unusable."""


class VideoError(ImageError):
    """A video cannot be opened or decoded."""


class ModelInputError(IvlError, ValueError):
    """Inputs given to a model are inconsistent (e.g. image-token count differs from image features)."""


class TemplateError(IvlError, ValueError):
    """A conversation cannot be rendered with the chosen template."""


class DataError(IvlError, ValueError):
    """A training or evaluation record is malformed; the message names the file and line."""


class GenerationError(IvlError, ValueError):
    """Generation parameters are invalid (e.g. negative temperature, empty stop list entry)."""
