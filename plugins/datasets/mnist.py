"""Fashion-MNIST, MNIST and Kuzushiji-MNIST (KMNIST), read from the standard IDX files.

Each dataset is four files (gzipped ``.gz`` or not)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte   (60000 images / labels)
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte    (10000 images / labels)

found either directly in ``root`` (a flat folder, e.g. Debian's ``dataset-fashion-mnist``
package: ``/usr/share/datasets/fashion-mnist``, see ``dpkg -L dataset-fashion-mnist``) or in
torchvision's layout ``root/FashionMNIST/raw`` (``MNIST/raw``, ``KMNIST/raw``), which is what
``torchvision.datasets.FashionMNIST(root, download=True)`` leaves behind (``download = true``
does exactly that first). ``root/raw`` (root pointing at ``root/FashionMNIST``) works too.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian int32 magic number
``0x0000 <type> <ndim>`` (2051 = unsigned bytes, 3 dims: an image file; 2049 = unsigned bytes,
1 dim: a label file), then ``ndim`` big-endian int32 sizes, then the data, row-major. We parse
it here (numpy) rather than through torchvision's reader so that every malformed file (wrong
magic, truncated, counts that disagree, corrupt gzip) is reported naming the file.

The images are 28x28 gray. ``size`` makes them 32x32 for the CIFAR zoo (``pad``: 2 zero pixels
on each side, the default, no interpolation; ``resize``: bilinear) or keeps them 28x28
(``native``); ``channels = 3`` (the default) repeats the gray channel so that the zoo models,
whose first convolution takes RGB, work unchanged.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.api import ImageData, Params, UserError, hookimpl

# Where Debian's package dataset-fashion-mnist puts the four .gz files (dpkg -L shows it).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
SIDE = 28
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Per-channel normalisation statistics, in 0..1 units: the mean and std of every pixel of the
# 60000 training images (28x28, before padding/resizing), the values published with and used
# throughout for each dataset (Fashion-MNIST 0.2860/0.3530 checked against the Debian files by
# tests/test_mnist.py; MNIST 0.1307/0.3081 as in PyTorch's MNIST example; KMNIST 0.1918/0.3483
# as commonly used with torchvision's KMNIST). Repeated per channel when channels = 3. Zero
# padding to 32 px lowers the true mean of the padded images a little; these values are kept
# regardless, so that "pad" and "native" normalise the digit pixels identically.
FASHION_MNIST_STATS = (0.2860, 0.3530)
MNIST_STATS = (0.1307, 0.3081)
KMNIST_STATS = (0.1918, 0.3483)


class MnistParams(Params):
    root: str = Field(
        description="folder holding the four IDX files (train-images-idx3-ubyte[.gz], ...), or "
        "torchvision's root with <root>/<MNIST|FashionMNIST|KMNIST>/raw"
    )
    download: bool = Field(
        False, description="fetch with torchvision's dataset class first (needs network; "
        "no-op if present)"
    )
    size: Literal["pad", "resize", "native"] = Field(
        "pad", description="'pad': 28->32 px by 2 zero pixels each side (CIFAR zoo input size); "
        "'resize': bilinear to 32x32; 'native': keep 28x28"
    )
    channels: Literal[1, 3] = Field(
        3, description="3 (default): the gray channel repeated, so the CIFAR zoo models (RGB "
        "input) work unchanged; 1: gray only (needs a model with a 1-channel stem)"
    )


class FashionMnistParams(MnistParams):
    root: str | None = Field(
        None, description="folder holding the four IDX files, or torchvision's root with "
        f"<root>/FashionMNIST/raw; default: Debian's {DEBIAN_FASHION_MNIST} "
        "(apt-get install dataset-fashion-mnist)"
    )


@dataclass(frozen=True)
class _Spec:
    name: str  # the plugin name
    title: str
    torchvision_class: str  # also torchvision's folder name under root
    stats: tuple[float, float]
    install_hint: str  # how to get the files without a network, if there is a way


FASHION_MNIST = _Spec("fashion_mnist", "Fashion-MNIST", "FashionMNIST", FASHION_MNIST_STATS,
                      "apt-get install dataset-fashion-mnist (files in "
                      f"{DEBIAN_FASHION_MNIST}), or set download = true")
MNIST = _Spec("mnist", "MNIST", "MNIST", MNIST_STATS, "set download = true")
KMNIST = _Spec("kmnist", "KMNIST", "KMNIST", KMNIST_STATS, "set download = true")


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes:
    """The file's contents, gunzipped if its name ends in .gz."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(
            f"gzip file {path} is corrupt or truncated ({detail}); delete it and fetch it again "
            "(download = true, or reinstall the package it came from)"
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot read IDX file {path}: {exc.strerror or exc}") from exc


def read_idx(path: str, magic: int) -> np.ndarray:
    """One IDX file of unsigned bytes with the expected magic number -> uint8 array of the
    shape its header gives. Every problem is a UserError naming the file."""
    data = _read_bytes(path)
    what = "image" if magic == IMAGES_MAGIC else "label"
    if len(data) < 4:
        raise UserError(f"IDX {what} file {path} is truncated: {len(data)} bytes, not even the "
                        "4-byte magic number; delete it and fetch it again")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        if data[:2] == b"\x1f\x8b":
            hint = "it is gzip-compressed: name it .gz or gunzip it"
        elif found in (IMAGES_MAGIC, LABELS_MAGIC):
            other = "an image" if found == IMAGES_MAGIC else "a label"
            hint = f"it is {other} file: are the file names swapped?"
        else:
            hint = "not an IDX file, or a damaged one"
        raise UserError(f"IDX {what} file {path} has magic number {found}, expected {magic} "
                        f"({hint})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"IDX {what} file {path} is truncated: {len(data)} bytes, shorter than "
                        f"its {header}-byte header; delete it and fetch it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)
    body = len(data) - header
    dims = "x".join(map(str, shape))
    if body < expected:
        raise UserError(f"IDX {what} file {path} is truncated: its header says {dims} "
                        f"({expected} bytes of data) but only {body} bytes follow; delete it and "
                        "fetch it again")
    if body > expected:
        raise UserError(f"IDX {what} file {path} has {body - expected} bytes after the {dims} "
                        "its header announces (a damaged or concatenated file); fetch it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_split(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """An images file and its labels file -> (uint8 (N, 28, 28), int64 (N,))."""
    images = read_idx(images_path, IMAGES_MAGIC)
    if images.shape[1:] != (SIDE, SIDE):
        raise UserError(f"IDX image file {images_path} holds images of "
                        f"{'x'.join(map(str, images.shape[1:]))}, expected {SIDE}x{SIDE}")
    labels = read_idx(labels_path, LABELS_MAGIC)
    if labels.shape[0] != images.shape[0]:
        raise UserError(f"{images_path} has {images.shape[0]} images but {labels_path} has "
                        f"{labels.shape[0]} labels; the two files are from different "
                        "downloads or one is damaged: fetch both again")
    if labels.size and labels.max() > 9:
        raise UserError(f"IDX label file {labels_path} has label {int(labels.max())}, outside "
                        "0..9 (is it a file of this dataset?)")
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------
def _find(folder: str, name: str) -> str | None:
    """``name`` or ``name.gz`` in folder (the uncompressed one first: no gunzip needed)."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _locate(spec: _Spec, root: str, split: str) -> tuple[str, str]:
    """(images path, labels path) of ``split``: root itself, root/raw, or torchvision's
    root/<Class>/raw, whichever holds any of the dataset's files."""
    all_files = FILES["train"] + FILES["test"]
    folders = [root, os.path.join(root, "raw"),
               os.path.join(root, spec.torchvision_class, "raw")]
    expected = (f"the files {', '.join(all_files)} (each may be .gz) in {root} or in "
                f"{os.path.join(root, spec.torchvision_class, 'raw')}")
    if not os.path.isdir(root):
        raise UserError(f"{spec.title} not found: dataset.root = {root!r} is not a folder "
                        f"(expected {expected}); {spec.install_hint}, or fix dataset.root")
    for folder in folders:
        if not any(_find(folder, name) for name in all_files):
            continue
        paths = [_find(folder, name) for name in FILES[split]]
        missing = [name for name, p in zip(FILES[split], paths) if p is None]
        if missing:
            raise UserError(f"{spec.title} at {folder} is incomplete: missing "
                            f"{' and '.join(n + '[.gz]' for n in missing)}; "
                            f"{spec.install_hint}, or fix dataset.root")
        return paths[0], paths[1]
    raise UserError(f"{spec.title} not found under dataset.root = {root!r} (expected "
                    f"{expected}); {spec.install_hint}, or fix dataset.root")


def _download(spec: _Spec, root: str) -> None:
    import torchvision.datasets as tvd

    try:
        os.makedirs(root, exist_ok=True)
        # Fetches all four files (both splits) into root/<Class>/raw, gzipped and extracted.
        getattr(tvd, spec.torchvision_class)(root, train=True, download=True)
    except Exception as exc:  # network errors, read-only folder, disk full, ...: one line
        msg = " ".join(str(exc).split())
        raise UserError(f"could not download {spec.title} to {root}: {msg} (set dataset.root "
                        "to a writable folder, or get the files another way and set "
                        "download = false)") from exc


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
def to_size(images: torch.Tensor, size: str) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> uint8 (N, 1, 32, 32) ('pad' / 'resize') or unchanged."""
    if size == "native":
        return images
    if size == "pad":
        out = torch.zeros((images.shape[0], 1, 32, 32), dtype=torch.uint8)
        out[:, :, 2:30, 2:30] = images
        return out
    out = torch.empty((images.shape[0], 1, 32, 32), dtype=torch.uint8)
    for start in range(0, images.shape[0], 8192):  # bounded float memory
        chunk = images[start:start + 8192].float()
        up = F.interpolate(chunk, size=(32, 32), mode="bilinear", align_corners=False)
        out[start:start + 8192] = up.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _root(spec: _Spec, params: MnistParams) -> str:
    if params.root is not None:
        return os.path.expanduser(params.root)
    # Only fashion_mnist's params allow no root: Debian's folder is the default.
    if params.download:
        raise UserError(f"{spec.name}: download = true needs a writable dataset.root to "
                        f"download into (the default {DEBIAN_FASHION_MNIST} is the Debian "
                        "package's); set dataset.root")
    if not os.path.isdir(DEBIAN_FASHION_MNIST):
        raise UserError(f"{spec.title}: dataset.root is not set and the default "
                        f"{DEBIAN_FASHION_MNIST} does not exist; apt-get install "
                        "dataset-fashion-mnist, or set dataset.root (with download = true to "
                        "fetch the files there)")
    return DEBIAN_FASHION_MNIST


def load_mnist(spec: _Spec, params: MnistParams, split: str) -> ImageData:
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = _root(spec, params)
    if params.download:
        _download(spec, root)
    images_path, labels_path = _locate(spec, root, split)
    images, labels = read_split(images_path, labels_path)
    x = to_size(torch.from_numpy(images).unsqueeze(1), params.size)
    if params.channels == 3:
        x = x.repeat(1, 3, 1, 1)
    mean, std = spec.stats
    return ImageData(
        images=x.contiguous(),
        labels=torch.from_numpy(labels),
        num_classes=10,
        mean=(mean,) * params.channels,
        std=(std,) * params.channels,
    )


def fashion_mnist(params: FashionMnistParams, split: str) -> ImageData:
    return load_mnist(FASHION_MNIST, params, split)


def mnist(params: MnistParams, split: str) -> ImageData:
    return load_mnist(MNIST, params, split)


def kmnist(params: MnistParams, split: str) -> ImageData:
    return load_mnist(KMNIST, params, split)


@hookimpl
def kdbench_register_datasets(register):
    register("fashion_mnist", fashion_mnist, params=FashionMnistParams,
             help="Fashion-MNIST (60k/10k 28x28 gray, 10 classes), IDX files; default root: "
             "Debian's dataset-fashion-mnist")
    register("mnist", mnist, params=MnistParams,
             help="MNIST digits (60k/10k 28x28 gray, 10 classes), IDX files or torchvision layout")
    register("kmnist", kmnist, params=MnistParams,
             help="Kuzushiji-MNIST (60k/10k 28x28 gray, 10 classes), IDX files or torchvision "
             "layout")
