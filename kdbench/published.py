"""Published teachers: load a teacher's weights from a checkpoint file instead of training it.

The CIFAR teachers released with RepDistiller and mdistiller are widely reused. Their
checkpoints are ``torch.save`` files holding the state dict, either bare or wrapped:

* RepDistiller ``train_teacher.py`` and mdistiller: ``{"model": state_dict, "epoch": ...,
  "best_acc"/"accuracy": ..., "optimizer": ...}``;
* other CIFAR code bases: ``{"net": state_dict, "acc": ..., "epoch": ...}`` or
  ``{"state_dict": state_dict, ...}``;
* a bare ``state_dict``;

and saved from ``nn.DataParallel`` they prefix every key with ``module.``.

Key layout. kdbench's zoo models (resnet18/34/50, wrn*, vgg8/13, mobilenetv2, shufflenetv2)
use RepDistiller's (and mdistiller's identical) module names, so their state-dict keys and
shapes are the reference layout exactly (tests/test_published.py derives that layout
independently from the reference model definitions and compares, for every zoo model at full
width); parameter-free reference modules (ReLU, pooling, ShuffleBlock/SplitBlock, an empty
``nn.Sequential`` shortcut) have no keys on either side. So for the zoo the mapping is the
identity; a model whose own keys differ from the checkpoint's can declare how with
``remap_published_keys(keys) -> dict[old, new]`` (the ``timm`` plugin's wrapper, for
example, maps a bare timm state dict onto its ``model.`` prefix). Checkpoints from PyTorch
< 0.4.1 have no ``num_batches_tracked`` buffers; those are left at their initial value.

Anything that does not fit (missing keys, unexpected keys, shape mismatches: a different
architecture, width or class count) is one :class:`UserError` naming the keys.

For the runner: ``load_published_teacher(path, model)`` loads the weights into an already
built model (on any device) in place; :func:`checkpoint_metadata` gives what a record should
keep (file hash, the checkpoint's own epoch and accuracy when it stores them).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kdbench.api import UserError

WRAPPER_KEYS = ("model", "net", "state_dict", "model_state_dict")
METADATA_KEYS = ("epoch", "best_acc", "accuracy", "acc", "test_acc")
_MAX_LISTED = 8


def load_published_teacher(path: str | os.PathLike, model: nn.Module) -> None:
    """Load the checkpoint at ``path`` into ``model`` (in place, strict: every parameter and
    buffer must come from the checkpoint, with its shape). Raises UserError on any mismatch."""
    path = Path(os.path.expanduser(str(path)))
    state, layout = read_state_dict(path)
    state = _map_keys(state, model)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise UserError(_mismatch_message(path, layout, model, missing, unexpected, shapes))
    for k, v in own.items():  # old checkpoints: keep the model's own num_batches_tracked
        if k not in state:
            state[k] = v
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """The checkpoint's state dict (unwrapped, ``module.`` prefixes removed) and a description
    of the layout it came in, e.g. ``{"model": state_dict}``."""
    path = Path(path)
    obj = _load(path)
    state, layout = _unwrap(obj, path)
    stripped = {_strip_module(k): v for k, v in state.items()}
    if len(stripped) != len(state):
        raise UserError(f"{path}: keys collide after removing the 'module.' prefixes")
    if any(k != _strip_module(k) for k in state):
        layout += " with 'module.' prefixes"
    return stripped, layout


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a teacher record should say about a published checkpoint: path, SHA-256 of the
    file, the layout, and the epoch/accuracy the checkpoint itself stores (if any)."""
    path = Path(os.path.expanduser(str(path)))
    obj = _load(path)
    _, layout = _unwrap(obj, path)
    meta: dict[str, Any] = {"path": str(path), "sha256": _sha256(path), "layout": layout}
    if isinstance(obj, Mapping):
        for k in METADATA_KEYS:
            v = obj.get(k)
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)):
                meta[k] = v
    return meta


# ------------------------------------------------------------------------------------------------
def _load(path: Path) -> Any:
    if not path.exists():
        raise UserError(f"{path}: teacher checkpoint not found (check the path; relative paths "
                        "are relative to the current directory)")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a checkpoint file (.pth / .pt)")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise UserError(
                f"{path}: stores a Python object ({found.group(1)}) besides tensors, which "
                "kdbench does not unpickle (torch.load(weights_only=True)). Re-save just the "
                "weights: torch.save({'model': model.state_dict()}, path)") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint "
                        f"({_short(str(exc).split('error:')[-1])})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Tensor], str]:
    if _is_state_dict(obj):
        return dict(obj), "a bare state_dict"
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if _is_state_dict(inner):
                return dict(inner), f'{{"{key}": state_dict}}'
            if isinstance(inner, nn.Module):  # not reachable with weights_only, kept for clarity
                return inner.state_dict(), f'{{"{key}": module}}'
        keys = ", ".join(map(repr, list(obj)[:10]))
        raise UserError(f"{path}: no state dict found: expected a state_dict, or a dict with one "
                        f"under {', '.join(map(repr, WRAPPER_KEYS))}; the file has keys {keys}")
    raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, Tensor) for v in obj.values()))


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _map_keys(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    remap = getattr(model, "remap_published_keys", None)
    if remap is None:
        return state
    mapping = remap(list(state))
    return {mapping.get(k, k): v for k, v in state.items()}


def _mismatch_message(path: Path, layout: str, model: nn.Module, missing: list[str],
                      unexpected: list[str], shapes: list[tuple]) -> str:
    name = getattr(model, "timm_name", None) or type(model).__name__
    parts = [f"{path}: the checkpoint ({layout}) does not fit the teacher model {name}"]
    head = _classifier_hint(shapes)
    if head:
        parts.append(head)
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): " + ", ".join(
            f"{k} {tuple(c)} in the file vs {tuple(m)} in the model"
            for k, c, m in shapes[:_MAX_LISTED]) + _more(shapes))
    if missing:
        parts.append(f"{len(missing)} key(s) of the model missing from the file: "
                     + ", ".join(missing[:_MAX_LISTED]) + _more(missing))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the file: "
                     + ", ".join(unexpected[:_MAX_LISTED]) + _more(unexpected))
    if missing and unexpected:
        parts.append("different key names usually mean a different architecture (or width) than "
                     "the recipe's teacher; kdbench's zoo uses RepDistiller's/mdistiller's names")
    return "\n  ".join(parts)


def _classifier_hint(shapes: list[tuple]) -> str | None:
    """A shape mismatch in the last linear layer only: say it is the class count."""
    heads = [(k, c, m) for k, c, m in shapes if re.search(r"(linear|fc|classifier(\.\d+)?|head)"
                                                           r"\.(weight|bias)$", k)]
    if heads and len(heads) == len(shapes):
        k, c, m = heads[0]
        return (f"its classifier has {c[0]} classes, the data set {m[0]}: a teacher for another "
                "data set")
    return None


def _more(items: list) -> str:
    return f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
