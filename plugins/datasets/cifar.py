"""CIFAR-10 and CIFAR-100, read from torchvision's on-disk layout.

Layout (what ``torchvision.datasets.CIFAR10/100(root, download=True)`` leaves behind)::

    root/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    root/cifar-100-python/train, test

Each file is a pickled dict with ``b"data"``: uint8 (N, 3072), one image per row stored as
1024 red, then 1024 green, then 1024 blue values, each plane row-major (so a plain reshape
gives (N, 3, 32, 32), already CHW), and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
(CIFAR-100). We read the pickles directly: faster than going through torchvision's PIL-based
dataset class and lets us name the exact file when something is wrong. No md5 check: a bad
file shows up as a shape/format error below.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from kdbench.api import ImageData, Params, UserError, hookimpl

# Per-channel statistics of the training sets, in 0..1 units. CIFAR-100: the values used by
# the CRD/ReviewKD code bases. CIFAR-10: the true pixel std (not the often-copied 0.2023...,
# which is the std of per-image means).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

_ROW = 3 * 32 * 32


class CifarParams(Params):
    root: str = Field(description="folder holding cifar-10-batches-py / cifar-100-python")
    download: bool = Field(
        False, description="fetch with torchvision first (needs network; no-op if present)"
    )


@dataclass(frozen=True)
class _Spec:
    title: str
    folder: str
    files: dict[str, tuple[str, ...]]  # split -> batch files
    label_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str


CIFAR10 = _Spec(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key=b"labels",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    torchvision_class="CIFAR10",
)
CIFAR100 = _Spec(
    title="CIFAR-100",
    folder="cifar-100-python",
    files={"train": ("train",), "test": ("test",)},
    label_key=b"fine_labels",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
    torchvision_class="CIFAR100",
)


def _download(spec: _Spec, root: str) -> None:
    import torchvision.datasets as tvd

    try:
        # Constructing the dataset downloads and extracts the whole archive (both splits).
        getattr(tvd, spec.torchvision_class)(root, train=True, download=True)
    except Exception as exc:  # network errors, disk full, ... : one readable line
        msg = " ".join(str(exc).split())
        raise UserError(f"could not download {spec.title} to {root}: {msg}") from exc


def _read_batch(path: str, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 (n, 3, 32, 32), int64 (n,)) with clear errors."""
    try:
        with open(path, "rb") as f:
            # pickle can run code; acceptable here because these are the well-known CIFAR
            # archive files the user pointed us at (same trust model as torchvision's reader).
            entry = pickle.load(f, encoding="bytes")
    except OSError as exc:
        raise UserError(f"cannot read CIFAR batch file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # EOFError, UnpicklingError, ... from a cut-off download
        raise UserError(
            f"CIFAR batch file {path} is truncated or corrupt ({type(exc).__name__}: "
            f"{' '.join(str(exc).split()) or 'unreadable pickle'}); delete it and download again"
        ) from exc

    if not isinstance(entry, dict) or b"data" not in entry or spec.label_key not in entry:
        if isinstance(entry, dict):
            found = "keys " + ", ".join(sorted(repr(k) for k in entry))
        else:
            found = type(entry).__name__
        raise UserError(
            f"CIFAR batch file {path} is not a {spec.title} batch (expected a dict with "
            f"b'data' and {spec.label_key!r}; found {found})"
        )
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[spec.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise UserError(
            f"CIFAR batch file {path} has data of shape {tuple(data.shape)} and dtype {data.dtype} "
            f"(expected uint8 (N, {_ROW}): 32x32 RGB images, one per row)"
        )
    if labels.shape != (data.shape[0],):
        raise UserError(
            f"CIFAR batch file {path} has {labels.size} labels for {data.shape[0]} images"
        )
    if labels.size and labels.dtype.kind not in "iu":
        raise UserError(f"CIFAR batch file {path} has non-integer labels ({labels.dtype})")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserError(
            f"CIFAR batch file {path} has labels outside 0..{spec.num_classes - 1} "
            f"(is it a {spec.title} file?)"
        )
    # Row layout is plane-major (R, G, B), each plane row-major: a reshape is already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(spec: _Spec, params: CifarParams, split: str) -> ImageData:
    if split not in spec.files:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = os.path.expanduser(params.root)
    if params.download:
        _download(spec, root)
    folder = os.path.join(root, spec.folder)
    expected = spec.files["train"] + spec.files["test"]
    if not os.path.isdir(folder):
        if os.path.isfile(os.path.join(root, expected[0])):  # root points inside the folder
            raise UserError(
                f"{spec.title} not found at {folder}, but {root} holds its files: set "
                f"dataset.root to the folder that contains {spec.folder} "
                f"({os.path.dirname(os.path.abspath(root))})"
            )
        raise UserError(
            f"{spec.title} not found at {folder} (expected files {', '.join(expected)}: the "
            f"torchvision layout; set download = true or fix dataset.root)"
        )
    missing = [name for name in spec.files[split] if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(
            f"{spec.title} at {folder} is incomplete: missing {', '.join(missing)} (expected files "
            f"{', '.join(expected)}: the torchvision layout; set download = true or re-extract)"
        )
    parts = [_read_batch(os.path.join(folder, name), spec) for name in spec.files[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageData(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
    )


def cifar10(params: CifarParams, split: str) -> ImageData:
    return load_cifar(CIFAR10, params, split)


def cifar100(params: CifarParams, split: str) -> ImageData:
    return load_cifar(CIFAR100, params, split)


@hookimpl
def kdbench_register_datasets(register):
    register("cifar10", cifar10, params=CifarParams,
             help="CIFAR-10 (50k/10k 32x32 RGB, 10 classes), torchvision on-disk layout")
    register("cifar100", cifar100, params=CifarParams,
             help="CIFAR-100 (50k/10k 32x32 RGB, 100 fine classes), torchvision on-disk layout")
