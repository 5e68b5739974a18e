"""Tiny ImageNet (200 classes, 64x64 RGB), read from the official ``tiny-imagenet-200`` layout::

    root/wnids.txt                          class ids, one per line (optional here)
    root/train/<wnid>/images/*.JPEG         500 training images per class
    root/val/images/*.JPEG                  10k validation images
    root/val/val_annotations.txt            filename <TAB> wnid <TAB> bbox...

Split ``"test"`` is the official *val* set (the official test set has no labels). Some images
are grayscale; they are expanded to 3 channels. Decoding ~100k JPEGs takes a while, so the
decoded uint8 tensors are cached next to the data (``root/.kdbench_cache_<split>.pt``) and
reused until the image files change.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from pydantic import Field

from kdbench.api import ImageData, Params, UserError, hookimpl

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
IMAGE_EXTS = (".jpeg", ".jpg", ".png")  # the official files are .JPEG
LAYOUT = "the official tiny-imagenet-200 layout"
CACHE_VERSION = 1


class TinyImageNetParams(Params):
    root: str = Field(description="the tiny-imagenet-200 folder (train/, val/, wnids.txt)")
    cache: bool = Field(
        True, description="cache decoded tensors in root/.kdbench_cache_<split>.pt if writable"
    )


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------
def _class_ids(root: str) -> list[str]:
    """wnids.txt if present (the official class order), else the sorted train/ folder names."""
    wnids_path = os.path.join(root, "wnids.txt")
    if os.path.isfile(wnids_path):
        with open(wnids_path, encoding="utf-8") as f:
            wnids = [line.strip() for line in f if line.strip()]
        if not wnids:
            raise UserError(f"Tiny ImageNet class list {wnids_path} is empty")
        if len(set(wnids)) != len(wnids):
            raise UserError(f"Tiny ImageNet class list {wnids_path} has duplicate entries")
        return wnids
    train_dir = _require_dir(os.path.join(root, "train"), "train folder")
    wnids = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not wnids:
        raise UserError(f"Tiny ImageNet train folder {train_dir} has no class folders ({LAYOUT})")
    return wnids


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise UserError(f"Tiny ImageNet {what} missing: expected {path} ({LAYOUT})")
    return path


def _image_files(folder: str) -> list[str]:
    return sorted(
        e.path for e in os.scandir(folder)
        if e.is_file() and e.name.lower().endswith(IMAGE_EXTS)
    )


def _list_train(root: str, wnids: list[str]) -> tuple[list[str], list[int]]:
    _require_dir(os.path.join(root, "train"), "train folder")
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = _require_dir(os.path.join(root, "train", wnid, "images"), f"class folder {wnid}")
        files = _image_files(folder)
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _list_val(root: str, wnids: list[str]) -> tuple[list[str], list[int]]:
    images_dir = _require_dir(os.path.join(root, "val", "images"), "val images folder")
    ann_path = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(ann_path):
        raise UserError(f"Tiny ImageNet val annotations missing: expected {ann_path} ({LAYOUT})")
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    with open(ann_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 2:
                raise UserError(
                    f"{ann_path}:{lineno}: expected 'filename<TAB>wnid<TAB>bbox...', "
                    f"got {line.strip()!r}"
                )
            name, wnid = fields[0], fields[1]
            if wnid not in index:
                raise UserError(f"{ann_path}:{lineno}: class {wnid!r} is not a training class")
            paths.append(os.path.join(images_dir, name))
            labels.append(index[wnid])
    if not paths:
        raise UserError(f"Tiny ImageNet val annotations {ann_path} list no images")
    return paths, labels


# --------------------------------------------------------------------------------------------
# Decoding and caching
# --------------------------------------------------------------------------------------------
def _signature(root: str, paths: list[str], labels: list[int], wnids: list[str]) -> list:
    """What the cache depends on: file list + labels (hashed), file count, newest mtime, bytes."""
    newest, total = 0, 0
    extra = [os.path.join(root, "wnids.txt"), os.path.join(root, "val", "val_annotations.txt")]
    for p in paths + [e for e in extra if os.path.exists(e)]:
        try:
            st = os.stat(p)
        except OSError:  # reported properly when the image is decoded
            continue
        newest, total = max(newest, st.st_mtime_ns), total + st.st_size
    digest = hashlib.sha1()
    for p, y in zip(paths, labels):
        digest.update(f"{os.path.relpath(p, root)}\t{y}\n".encode())
    digest.update("\n".join(wnids).encode())
    return [CACHE_VERSION, len(paths), newest, total, digest.hexdigest()]


def _decode(path: str) -> np.ndarray:
    """One image file -> uint8 (3, H, W); grayscale/CMYK/palette images become RGB."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))  # a writable copy, for torch.from_numpy
    except FileNotFoundError as exc:
        raise UserError(f"Tiny ImageNet image missing: {path}") from exc
    except Exception as exc:  # PIL raises a mix of OSError/ValueError/SyntaxError subclasses
        detail = " ".join(str(exc).replace(repr(path), "").replace(path, "").split())
        raise UserError(
            f"cannot read Tiny ImageNet image {path} ({type(exc).__name__}"
            f"{': ' + detail if detail else ''})"
        ) from exc
    return arr.transpose(2, 0, 1)


def _decode_all(paths: list[str]) -> torch.Tensor:
    first = _decode(paths[0])
    size = first.shape[1:]
    out = torch.empty((len(paths), 3, *size), dtype=torch.uint8)
    out[0] = torch.from_numpy(first)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            arr = _decode(paths[i])
            if arr.shape[1:] != size:
                raise UserError(
                    f"Tiny ImageNet image {paths[i]} is {arr.shape[2]}x{arr.shape[1]}, "
                    f"expected {size[1]}x{size[0]} like the others"
                )
            out[i] = torch.from_numpy(arr)

    # PIL releases the GIL while decoding, so threads give a real speed-up.
    workers = max(1, min(8, os.cpu_count() or 1))
    chunk = 512
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(work, s, min(s + chunk, len(paths)))
                   for s in range(1, len(paths), chunk)]
        for fut in futures:
            fut.result()  # re-raises the first error (a UserError naming the file)
    finally:
        pool.shutdown(cancel_futures=True)  # on error, don't decode the rest first
    return out


def _load_cache(path: str, signature: list) -> torch.Tensor | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # stale format, half-written by an old crash, ...: rebuild it
        return None
    if not isinstance(blob, dict) or blob.get("signature") != signature:
        return None
    images = blob.get("images")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
            or images.dim() != 4 or images.shape[0] != signature[1]:
        return None
    return images


def _save_cache(path: str, signature: list, images: torch.Tensor) -> None:
    """Atomic write (temp file + rename) so a concurrent or interrupted run never sees half a
    file; silently skipped when the folder is not writable."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".kdbench_cache_",
                                   suffix=".tmp")
        os.close(fd)
        torch.save({"signature": signature, "images": images}, tmp)
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError):  # read-only root, disk full, ...
        pass
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass


def cache_path(root: str, split: str) -> str:
    return os.path.join(root, f".kdbench_cache_{split}.pt")


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
def tiny_imagenet(params: TinyImageNetParams, split: str) -> ImageData:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = os.path.expanduser(params.root)
    if not os.path.isdir(root):
        raise UserError(
            f"Tiny ImageNet not found at {root} (expected {LAYOUT}: wnids.txt, "
            f"train/<wnid>/images/*.JPEG, val/images, val/val_annotations.txt; fix dataset.root)"
        )
    wnids = _class_ids(root)
    paths, labels = (_list_train if split == "train" else _list_val)(root, wnids)
    if not paths:
        raise UserError(f"Tiny ImageNet at {root} has no {split} images ({LAYOUT})")

    images, signature = None, None
    if params.cache:
        signature = _signature(root, paths, labels, wnids)
        images = _load_cache(cache_path(root, split), signature)
    if images is None:
        images = _decode_all(paths)
        if params.cache:
            _save_cache(cache_path(root, split), signature, images)
    return ImageData(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=len(wnids),
        mean=MEAN,
        std=STD,
    )


@hookimpl
def kdbench_register_datasets(register):
    register("tiny_imagenet", tiny_imagenet, params=TinyImageNetParams,
             help="Tiny ImageNet (100k/10k 64x64 RGB, 200 classes; test = official val)")
