"""The training device named by a recipe or ``--device``."""
from __future__ import annotations

import torch

from kdbench.api import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device {name!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but no CUDA device is available; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA "
                            "device(s) exist")
    elif device.type != "cpu":
        raise UserError(f"device {name!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device
