"""Load, save and convert InternVL checkpoints (sharded safetensors, official or transformers-native layout).

Loading builds the model with its parameters on the ``meta`` device, checks every name and shape against the
safetensors headers before any tensor data is read, then streams tensors shard by shard through the key map
and assigns them one by one, so weights are never materialised twice. Saving and converting write into a
temporary directory beside the target, fsync it and rename it into place: an interrupted or failing write
never leaves a half-written checkpoint at the target path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ivl.checkpoint import configs
from ivl.checkpoint.keymap import KeyMap, KeyStream, from_ours_map, hf_file_name, to_ours_map, truncated
from ivl.checkpoint.layouts import Layout, check_layout, is_checkpoint_dir, layout_of_config, read_config
from ivl.config import InternVLConfig
from ivl.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from ivl.models.internvl import InternVL

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# ---------------------------------------------------------------------------------------------------------
# reading a checkpoint directory


@dataclass
class TensorInfo:
    """One tensor of a shard, known from the safetensors header alone."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Shard:
    file: str
    tensors: list[TensorInfo]
    metadata: dict[str, str] | None


@dataclass
class CheckpointFiles:
    """The weight files of a directory: shards in index order, plus the index itself when there is one."""

    directory: Path
    shards: list[Shard]
    index: dict[str, Any] | None


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5·10⁹ bytes (decimal units as in transformers), ``"2GiB"`` -> 2·2³⁰; ints are bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise CheckpointError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise CheckpointError(f"max_shard_size {size!r} is not a size such as '5GB', '500MB' or '2GiB'")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = int(number * scale[unit])
    if value <= 0:
        raise CheckpointError(f"max_shard_size {size!r} must be positive")
    return value


def checkpoint_files(path: str | Path) -> CheckpointFiles:
    """Find the safetensors shards (``model.safetensors.index.json`` or one ``model.safetensors``)."""
    directory = Path(path)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map: dict[str, str] = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shard files listed in {INDEX_FILE} are missing: {truncated(missing)}")
        shards = [_read_header(directory / f) for f in files]
        for shard in shards:
            present = {t.key for t in shard.tensors}
            absent = [k for k, f in weight_map.items() if f == shard.file and k not in present]
            if absent:
                raise CheckpointError(
                    f"{directory / shard.file}: lacks tensors the index puts there: {truncated(absent)}"
                )
        return CheckpointFiles(directory, shards, index)
    single = directory / SINGLE_FILE
    if single.is_file():
        return CheckpointFiles(directory, [_read_header(single)], None)
    others = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
    hint = f" (found {', '.join(others)}; only safetensors are supported)" if others else ""
    raise CheckpointError(f"{directory}: no {INDEX_FILE} or {SINGLE_FILE}{hint}")


def _read_header(file: Path) -> Shard:
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = []
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not mappings
                piece = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {piece.get_dtype()}")
                tensors.append(TensorInfo(key, tuple(piece.get_shape()), dtype))
            return Shard(file.name, tensors, f.metadata())
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors header ({exc})") from exc


def _tokenizer_image_token_id(directory: Path) -> int | None:
    """The ``<IMG_CONTEXT>`` id from the tokenizer files next to the weights (official configs lack it)."""
    try:
        return _find_added_token(directory, "<IMG_CONTEXT>")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{directory}: unreadable tokenizer files ({exc})") from exc


def _find_added_token(directory: Path, token: str) -> int | None:
    added = directory / "added_tokens.json"
    if added.is_file():
        value = json.loads(added.read_text(encoding="utf-8")).get(token)
        if value is not None:
            return int(value)
    tok = directory / "tokenizer.json"
    if tok.is_file():
        for entry in json.loads(tok.read_text(encoding="utf-8")).get("added_tokens", []):
            if entry.get("content") == token:
                return int(entry["id"])
    tok_config = directory / "tokenizer_config.json"
    if tok_config.is_file():
        decoder = json.loads(tok_config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for idx, entry in decoder.items():
            if isinstance(entry, dict) and entry.get("content") == token:
                return int(idx)
    return None


def read_checkpoint_config(path: str | Path) -> tuple[Layout, InternVLConfig]:
    """Layout and model config of a checkpoint directory."""
    directory = Path(path)
    data, _ = read_config(directory)
    layout = layout_of_config(data, str(directory / "config.json"))
    return layout, config_from_dict(data, layout, directory)


def config_from_dict(data: dict[str, Any], layout: Layout, directory: Path) -> InternVLConfig:
    """Parse a config.json dict of ``layout`` (``directory`` supplies the tokenizer and the name)."""
    try:
        if layout == "official":
            config = configs.official_to_config(data, image_token_id=_tokenizer_image_token_id(directory))
        else:
            config = configs.hf_to_config(data)
    except ConfigError as exc:
        raise CheckpointError(f"{directory / 'config.json'}: {exc}") from exc
    config.name = directory.name
    return config


# ---------------------------------------------------------------------------------------------------------
# building a model without memory


_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device and skip ``torch.nn.init`` (pointless there, and slow:
    meta random kernels run in Python). Buffers stay real: they are computed, not loaded."""
    original = nn.Module.register_parameter
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def skip(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    for name in saved:
        setattr(nn.init, name, skip)
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def empty_model(config: InternVLConfig) -> InternVL:
    """The model for ``config`` with meta parameters (no memory, no init cost)."""
    from ivl.models.internvl import InternVL
    from ivl.models.mono import MonoInternVL

    model_class = MonoInternVL if config.is_mono else InternVL
    with parameters_on_meta():
        return model_class(config)


def _expected(model: nn.Module) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """Names and shapes a checkpoint must provide, and aliases (tied names) -> their canonical name."""
    expected: dict[str, torch.Size] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        expected[name] = tensor.shape
    return expected, aliases


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attr)
    if old is not None:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"{name}: not a parameter or buffer of the model")


# ---------------------------------------------------------------------------------------------------------
# mapping pipeline (source layout -> ours -> target layout)


class _Pipeline:
    """Chained key maps with an optional final rename (transformers' file spelling)."""

    def __init__(self, maps: list[KeyMap], rename: Callable[[str], str] | None = None) -> None:
        self.streams: list[KeyStream] = [m.stream() for m in maps]
        self.rename = rename

    def push(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        items = [(key, tensor)]
        for stream in self.streams:
            items = [out for k, t in items for out in stream.push(k, t)]
        if self.rename is not None:
            items = [(self.rename(k), t) for k, t in items]
        return items

    @property
    def unmatched(self) -> list[str]:
        return self.streams[0].unmatched

    def finish(self) -> None:
        for stream in self.streams:
            stream.finish()
        inner = [k for s in self.streams[1:] for k in s.unmatched]
        if inner:
            raise CheckpointError(f"no mapping to the target layout for: {truncated(inner)}")


def _check_against_model(
    pipeline: _Pipeline, files: CheckpointFiles, expected: dict[str, torch.Size], aliases: dict[str, str]
) -> None:
    """Map names and shapes from the headers only; raise one CheckpointError listing every problem."""
    produced: dict[str, torch.Size] = {}
    duplicates: list[str] = []
    for shard in files.shards:
        for info in shard.tensors:
            for name, tensor in pipeline.push(info.key, torch.empty(info.shape, dtype=info.dtype, device="meta")):
                if name in produced:
                    duplicates.append(name)
                produced[name] = tensor.shape
    problems: list[str] = []
    incomplete = pipeline.streams[0].incomplete()
    if incomplete:
        items = [f"{dst} (have {', '.join(srcs)})" for dst, srcs in sorted(incomplete.items())]
        problems.append(f"incomplete tensor groups ({len(items)}): {truncated(items)}")
    if duplicates:
        problems.append(f"tensors given twice ({len(duplicates)}): {truncated(duplicates)}")
    unexpected = list(pipeline.unmatched) + [n for n in produced if n not in expected and n not in aliases]
    missing = [n for n in expected if n not in produced]
    mismatched = [
        f"{n}: expected {tuple(expected[n])}, found {tuple(shape)}"
        for n, shape in produced.items()
        if n in expected and shape != expected[n]
    ]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {truncated(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {truncated(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): {truncated(mismatched, 6)}")
    if problems:
        raise CheckpointError(f"{files.directory}: checkpoint does not fit the model: " + "; ".join(problems))


def _stream_tensors(
    files: CheckpointFiles, dtype: torch.dtype | None, device: torch.device | None
) -> Iterator[tuple[int, str, torch.Tensor]]:
    """``(shard index, key, tensor)`` in header order, cast to ``dtype`` (floating tensors only)."""
    where = "cpu" if device is None else str(device)  # straight onto the target device, no host copy
    for index, shard in enumerate(files.shards):
        with safe_open(str(files.directory / shard.file), framework="pt", device=where) as f:
            for info in shard.tensors:
                tensor = f.get_tensor(info.key)
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                yield index, info.key, tensor


# ---------------------------------------------------------------------------------------------------------
# load


def load_model(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> InternVL:
    """Load a checkpoint directory (official or transformers-native layout) into :class:`InternVL`, in eval mode.

    ``dtype`` None keeps the checkpoint's ``torch_dtype`` (or, without one, each tensor's stored dtype).
    Raises :class:`CheckpointError` for a missing shard, missing or unexpected keys and shape mismatches,
    before reading any tensor data.
    """
    directory = Path(path)
    data, _ = read_config(directory)
    layout = layout_of_config(data, str(directory / "config.json"))
    config = config_from_dict(data, layout, directory)
    target = configs.parse_dtype(dtype, "dtype") if dtype is not None else configs.config_dtype(data)
    device = torch.device(device) if device is not None else None
    files = checkpoint_files(directory)
    model = empty_model(config)
    expected, aliases = _expected(model)
    _check_against_model(_Pipeline([to_ours_map(layout, config)]), files, expected, aliases)

    pipeline = _Pipeline([to_ours_map(layout, config)])
    for _, key, tensor in _stream_tensors(files, target, device):
        for name, value in pipeline.push(key, tensor):
            if name not in aliases:  # a tied copy on disk: the canonical tensor already fills it
                _assign(model, name, value)
    pipeline.finish()
    leftovers = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if leftovers:  # cannot happen after the check above, unless the model has unusual state
        raise CheckpointError(f"{directory}: tensors left unloaded: {truncated(leftovers)}")
    if device is not None:
        model.to(device)  # buffers only: parameters were loaded onto the device already
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# writing


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success fsync it and rename it to ``path``.

    An existing ``path`` is replaced only if it is empty or a checkpoint directory (never user data). On any
    error the temporary directory is removed and ``path`` is left as it was.
    """
    target = Path(path).absolute()
    if target.exists():
        if not target.is_dir():
            raise CheckpointError(f"{target} exists and is not a directory; refusing to overwrite it")
        if any(target.iterdir()) and not is_checkpoint_dir(target):
            raise CheckpointError(f"{target} exists and is not a checkpoint directory; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _is_weight_file(name: str) -> bool:
    return name == INDEX_FILE or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def copy_auxiliary_files(source: str | Path, destination: Path) -> list[str]:
    """Copy everything but weights and config.json (tokenizer, generation/preprocessor configs, code, docs)."""
    copied = []
    for entry in sorted(Path(source).iterdir()):
        if entry.name.startswith(".") or entry.name == "config.json" or _is_weight_file(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, destination / entry.name)
        else:
            shutil.copy2(entry, destination / entry.name)
        copied.append(entry.name)
    return copied


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _nbytes(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for dim in shape:
        numel *= int(dim)
    return numel * torch.empty((), dtype=dtype).element_size()


def _greedy_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Consecutive groups of at most ``limit`` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _write_shards(
    directory: Path,
    outputs: Iterable[tuple[str, torch.Tensor]],
    shards: list[tuple[str, list[str], dict[str, str] | None]],
) -> dict[str, str]:
    """Write tensors (arriving in plan order) into ``shards`` ``(file, names, metadata)``; returns the weight map."""
    owner = {name: i for i, (_, names, _) in enumerate(shards) for name in names}
    pending: list[dict[str, torch.Tensor]] = [{} for _ in shards]
    weight_map: dict[str, str] = {}
    done = 0
    for name, tensor in outputs:
        slot = owner[name]
        pending[slot][name] = tensor.detach().to("cpu").contiguous()
        while done < len(shards) and len(pending[done]) == len(shards[done][1]):
            file, names, metadata = shards[done]
            save_file(pending[done], str(directory / file), metadata=metadata or {"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            pending[done] = {}
            done += 1
    if done != len(shards):
        missing = [n for i in range(done, len(shards)) for n in shards[i][1] if n not in pending[i]]
        raise CheckpointError(f"internal error: tensors never produced: {truncated(missing)}")
    return weight_map


def _write_index(directory: Path, weight_map: dict[str, str], total: int, base: dict[str, Any] | None) -> None:
    metadata = dict((base or {}).get("metadata") or {})
    metadata["total_size"] = total
    index = {**(base or {}), "metadata": metadata, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(configs.dump_json(index), encoding="utf-8")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype holding most parameters (what ``torch_dtype`` should say)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.__getitem__) if counts else None


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    layout: str = "official",
    max_shard_size: int | str = "5GB",
    copy_files_from: str | Path | None = None,
) -> Path:
    """Write ``model`` as a checkpoint directory in the ``official`` or ``hf`` layout, atomically.

    Sharded safetensors (one ``model.safetensors`` when everything fits one shard, else numbered shards and
    ``model.safetensors.index.json``) plus config.json with ``torch_dtype``. ``copy_files_from`` copies the
    tokenizer and other non-weight files of another checkpoint directory (e.g. the one the model came from).
    """
    target_layout = check_layout(layout)
    config: InternVLConfig = model.config  # type: ignore[assignment]
    dtype = _model_dtype(model)
    if target_layout == "official":
        config_text = configs.dump_json(configs.config_to_official(config, dtype=dtype))
    else:
        config_text = configs.dump_json(configs.config_to_hf(config, dtype=dtype))
    limit = parse_size(max_shard_size)
    rename = hf_file_name if target_layout == "hf" else None
    state = model.state_dict()

    plan = _Pipeline([from_ours_map(target_layout, config)], rename)
    sizes: list[tuple[str, int]] = []
    for key, tensor in state.items():
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        sizes += [(name, _nbytes(t.shape, t.dtype)) for name, t in plan.push(key, meta)]
    if plan.unmatched:
        raise CheckpointError(f"no {target_layout} name for model tensors: {truncated(plan.unmatched)}")
    plan.finish()
    groups = _greedy_shards(sizes, limit)
    shards = [(file, names, None) for file, names in zip(_shard_names(len(groups)), groups, strict=True)]

    def outputs() -> Iterator[tuple[str, torch.Tensor]]:
        pipeline = _Pipeline([from_ours_map(target_layout, config)], rename)
        for key, tensor in state.items():
            yield from pipeline.push(key, tensor)
        pipeline.finish()

    with atomic_directory(path) as tmp:
        weight_map = _write_shards(tmp, outputs(), shards)
        if len(shards) > 1:
            _write_index(tmp, weight_map, sum(size for _, size in sizes), None)
        if copy_files_from is not None:
            copy_auxiliary_files(copy_files_from, tmp)
        (tmp / "config.json").write_text(config_text, encoding="utf-8")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# convert


def _same_layout_config(data: dict[str, Any], text: str, dtype: torch.dtype | None) -> str:
    """Copy config.json verbatim, or with every ``torch_dtype``/``dtype`` entry changed to ``dtype``."""
    if dtype is None:
        return text
    name = configs.dtype_name(dtype)
    out = json.loads(text)
    sections = [out] + [out[k] for k in ("llm_config", "vision_config", "text_config") if isinstance(out.get(k), dict)]
    for section in sections:
        for key in ("torch_dtype", "dtype"):
            if key in section:
                section[key] = name
    if "torch_dtype" not in out and "dtype" not in out:
        out["torch_dtype"] = name
    return configs.dump_json(out)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    layout: str,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Convert checkpoint ``src`` into ``layout`` (``official`` or ``hf``) at ``dst``, streaming shard by shard.

    Without ``max_shard_size`` every source shard becomes one destination shard with the same file name,
    so official -> hf -> official reproduces the original files byte for byte (config.json included).
    Tokenizer, generation and preprocessor configs and other non-weight files are copied verbatim.
    """
    source = Path(src)
    target_layout = check_layout(layout)
    data, text = read_config(source)
    source_layout = layout_of_config(data, str(source / "config.json"))
    config = config_from_dict(data, source_layout, source)
    target_dtype = configs.parse_dtype(dtype, "dtype") if dtype is not None else None
    try:
        if source_layout == target_layout:
            config_text = _same_layout_config(data, text, target_dtype)
        elif target_layout == "hf":
            _, config_text = configs.official_to_hf_dict(
                data, text=text, image_token_id=_tokenizer_image_token_id(source), dtype=target_dtype
            )
        else:
            _, config_text = configs.hf_to_official_dict(data, text=text, dtype=target_dtype)
    except ConfigError as exc:
        raise CheckpointError(f"{source / 'config.json'}: {exc}") from exc

    files = checkpoint_files(source)
    expected, aliases = _expected(empty_model(config))
    _check_against_model(_Pipeline([to_ours_map(source_layout, config)]), files, expected, aliases)

    def pipeline() -> _Pipeline:
        rename = hf_file_name if target_layout == "hf" else None
        return _Pipeline([to_ours_map(source_layout, config), from_ours_map(target_layout, config)], rename)

    plan = pipeline()
    produced: list[tuple[str, int, int]] = []  # name, source shard, bytes
    for index, shard in enumerate(files.shards):
        for info in shard.tensors:
            meta = torch.empty(info.shape, dtype=info.dtype, device="meta")
            for name, t in plan.push(info.key, meta):
                cast = target_dtype if target_dtype is not None and t.is_floating_point() else t.dtype
                produced.append((name, index, _nbytes(t.shape, cast)))
    plan.finish()

    if max_shard_size is None:  # keep the source partition and file names
        shards = [
            (shard.file, [n for n, i, _ in produced if i == index], shard.metadata)
            for index, shard in enumerate(files.shards)
        ]
        shards = [s for s in shards if s[1]]
    else:
        groups = _greedy_shards([(n, b) for n, _, b in produced], parse_size(max_shard_size))
        shards = [(file, names, None) for file, names in zip(_shard_names(len(groups)), groups, strict=True)]

    def outputs() -> Iterator[tuple[str, torch.Tensor]]:
        mapper = pipeline()
        for _, key, tensor in _stream_tensors(files, target_dtype, None):
            yield from mapper.push(key, tensor)
        mapper.finish()

    with atomic_directory(dst) as tmp:
        weight_map = _write_shards(tmp, outputs(), shards)
        keep_partition = max_shard_size is None
        if len(shards) > 1 or (keep_partition and files.index is not None):
            base = files.index if keep_partition else None
            _write_index(tmp, weight_map, sum(b for _, _, b in produced), base)
        copy_auxiliary_files(source, tmp)
        (tmp / "config.json").write_text(config_text, encoding="utf-8")
    return Path(dst)
