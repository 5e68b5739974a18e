"""Seeds, the data generator and the weights' fingerprint: what makes a run repeatable and
lets a record say that two runs ended with the same weights."""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device
    if deterministic:
        # cuBLAS is only deterministic with a fixed workspace; read when cuBLAS initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def data_generator(seed: int, device: torch.device) -> torch.Generator:
    """The data-order/augmentation generator, on the training device, separate from the one
    used for initialisation so that adding a method never changes the data stream."""
    return torch.Generator(device=device).manual_seed(seed + 7919)


def weights_sha256(state_dict: dict) -> str:
    """A fingerprint of the exact weights (names, dtypes, shapes and bytes), for the record:
    two runs with the same fingerprint ended with bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(state_dict[name].shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
