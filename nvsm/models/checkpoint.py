"""Checkpoint files: tensors plus JSON metadata, written atomically, read with weights_only.

Layout of the file (a ``torch.save`` pickle restricted to what ``weights_only=True`` loads):

    {"format": "nvsm-checkpoint", "version": 1,
     "tensors": {name: Tensor | {name: Tensor}},     # e.g. {"backbone": sd, "bank/car": sd}
     "metadata": "<JSON text>"}

Metadata is stored as JSON text, so whatever goes in must be JSON-serialisable and comes back
exactly as ``json.loads`` gives it.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvsm.io import atomic_open

CHECKPOINT_FORMAT = "nvsm-checkpoint"
CHECKPOINT_VERSION = 1

TensorTree = Mapping[str, "torch.Tensor | TensorTree"]


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, corrupt or lacks expected entries."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        tensors: name -> tensor, or name -> dict of tensors (a state dict).
        metadata: the JSON metadata.
        path: the file it came from.
    """

    tensors: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _prepare(tree: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint keys must be strings, got {key!r} in {where or 'tensors'}")
        name = f"{where}.{key}" if where else key
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().clone()
        elif isinstance(value, Mapping):
            out[key] = _prepare(value, name)
        else:
            raise TypeError(f"checkpoint entry {name!r} is {type(value).__name__}, not a tensor")
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename; never a half-written file).

    Args:
        path: destination file (parents are created).
        tensors: name -> tensor or name -> (nested) dict of tensors, e.g.
            ``{"backbone": model.state_dict(), "bank": bank.state_dict()}``. Tensors are
            detached and copied to the CPU.
        metadata: JSON-serialisable dict (config, step, categories, ...).

    Returns:
        The path written.

    Raises:
        TypeError: a non-tensor entry or non-JSON metadata.
    """
    path = Path(path)
    try:
        meta_text = json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint metadata for {path} is not JSON-serialisable: {exc}") from exc
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "tensors": _prepare(tensors, ""),
        "metadata": meta_text,
    }
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)
    return path


def _check_tree(tree: Any, where: str, path: Path) -> None:
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: entry {where or 'tensors'!r} is not a dict")
    for key, value in tree.items():
        name = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict):
            _check_tree(value, name, path)
        elif not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is {type(value).__name__}, not a tensor")


def load_error_summary(exc: BaseException) -> str:
    """``torch.load``'s error, its first sentence only: the rest of its weights-only message
    advises loading with ``weights_only=False``, which nvsm never does."""
    return f"{type(exc).__name__}: {str(exc).strip().split(chr(10))[0].split('. ')[0]}"


def load_checkpoint(
    path: str | os.PathLike[str],
    required: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (``torch.load(weights_only=True)``).

    Args:
        path: the file.
        required: top-level tensor entries that must be present.
        map_location: device the tensors are loaded onto.

    Raises:
        CheckpointError: missing file, unreadable/corrupt file (a damaged byte included),
            wrong format or version, metadata that is not a JSON object, or a missing required
            entry. The message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file in it (model.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_crc(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint, not one nvsm wrote "
            f"({load_error_summary(exc)})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not an nvsm checkpoint (no format={CHECKPOINT_FORMAT!r} entry)"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')!r}; "
            f"this nvsm reads version {CHECKPOINT_VERSION}"
        )
    for key in ("tensors", "metadata"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks its {key!r} entry")
    _check_tree(payload["tensors"], "", path)
    try:
        metadata = json.loads(payload["metadata"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{path}: checkpoint metadata must be a JSON object, got {type(metadata).__name__}"
        )
    missing = [k for k in required if k not in payload["tensors"]]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks entries {missing}; it has {sorted(payload['tensors'])}"
        )
    return Checkpoint(tensors=payload["tensors"], metadata=metadata, path=path)


def _check_crc(path: Path) -> None:
    """Raise CheckpointError when an entry of the zip archive ``torch.save`` writes fails its
    CRC-32: ``torch.load`` does not check them, so a damaged byte inside a tensor's data loaded
    as NaN or garbage weights without a word. A file that is no zip archive at all is left to
    ``torch.load``'s own error."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            bad = f"? ({exc})"
    if bad is not None:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: its entry {bad} fails the CRC-32 check (the file was "
            "damaged after it was written); use another copy or train again"
        )


def state_mismatch(module: nn.Module, state: Mapping[str, Any],
                   ignore_missing: tuple[str, ...] = ()) -> str | None:
    """Why ``state`` does not fit ``module.load_state_dict``, in one line, or None when it fits.

    Counts the missing (except names starting with ``ignore_missing``), unexpected, non-tensor
    and other-shape entries, naming the first few of each: torch's own message lists every key,
    thousands of them for a backbone of another kind.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore_missing)]
    unexpected = [k for k in state if k not in own]
    not_tensor = [k for k in state if k in own and not isinstance(state[k], torch.Tensor)]
    reshaped = [f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in own
                if isinstance(state.get(k), torch.Tensor) and state[k].shape != own[k].shape]
    parts = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for what, keys in (("missing", missing), ("unexpected", unexpected),
                                ("not a tensor", not_tensor), ("of another shape", reshaped))
             if keys]
    return "; ".join(parts) or None


def load_module_state(module: nn.Module, checkpoint: Checkpoint, key: str) -> None:
    """``module.load_state_dict(checkpoint.tensors[key])`` with errors that name the file.

    ``key`` may name a nested entry with dots (``"banks.car"``).

    Raises:
        CheckpointError: the entry is missing, not a state dict or does not fit the module
            (``state_mismatch``).
    """
    where = checkpoint.path or "<checkpoint>"
    state: Any = checkpoint.tensors
    for part in key.split("."):
        state = state.get(part) if isinstance(state, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{where}: no state dict {key!r}; entries: {sorted(checkpoint.tensors)}"
        )
    why = state_mismatch(module, state)
    if why:
        raise CheckpointError(f"{where}: entry {key!r} does not fit {type(module).__name__}: {why}")
    module.load_state_dict(state)


def load_pretrained_weights(net: nn.Module, path: Path, what: str,
                            skip: tuple[str, ...] = ()) -> None:
    """Load an ImageNet weight file (a state dict, or ``{"state_dict": ...}``) into ``net``.

    Args:
        net: the network the file was saved from (e.g. torchvision's ``resnet50``).
        path: the file (read with ``weights_only=True``).
        what: the network, as errors name it.
        skip: prefixes of entries left out on both sides (heads nvsm does not use).
    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file: unreadable, not a state dict of tensors, or not ``what``'s
            (``state_mismatch``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read backbone weights {path} ({load_error_summary(exc)})") \
            from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {path} are not a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    why = state_mismatch(net, state, ignore_missing=skip)
    if why:
        raise ValueError(f"{path} does not hold {what}'s weights: {why}")
    net.load_state_dict(state, strict=False)
