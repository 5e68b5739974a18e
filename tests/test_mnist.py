"""The MNIST family (fashion_mnist, mnist, kmnist) read through the registered plugins from small
IDX files written here byte by byte (gzipped and not, flat folder and torchvision's layout),
malformed files, and the real Fashion-MNIST files of Debian's dataset-fashion-mnist package."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from kdbench.api import ImageData, Params, UserError
from kdbench.cli import main
from kdbench.data.loader import subset_per_class
from kdbench_plugins.datasets import mnist as plugin

NAMES = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "kmnist": "KMNIST"}
STATS = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081),
         "kmnist": (0.1918, 0.3483)}
IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


# --------------------------------------------------------------------------------------------
# Writing IDX files
# --------------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX format spelled out: big-endian int32 magic, one big-endian int32 per dimension,
    then the unsigned bytes row-major."""
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10  # every class, several times
    rng.shuffle(labels)
    return images, labels.astype(np.uint8)


def write_dataset(root: Path, name: str = "fashion_mnist", layout: str = "flat",
                  gz: bool = True, n: dict | None = None) -> dict:
    """The four IDX files in root (flat) or root/<Class>/raw (torchvision); returns the arrays."""
    folder = root if layout == "flat" else root / NAMES[name] / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    n = n or {"train": 30, "test": 20}
    arrays = {}
    for i, split in enumerate(("train", "test")):
        images, labels = make_split(n[split], seed=i)
        write_file(folder / IMAGES[split], idx_bytes(images, 2051), gz)
        write_file(folder / LABELS[split], idx_bytes(labels, 2049), gz)
        arrays[split] = (images, labels)
    return arrays


def load(registry, name: str, split: str, **params) -> ImageData:
    found = registry.find("dataset", name)
    return found.factory(found.params.model_validate(params), split)


# --------------------------------------------------------------------------------------------
# Registration and round trips
# --------------------------------------------------------------------------------------------
def test_registered_with_params_and_help(registry):
    for name in NAMES:
        found = registry.find("dataset", name)
        assert issubclass(found.params, Params)
        assert found.help and "\n" not in found.help
        with pytest.raises(pydantic.ValidationError):
            found.params.model_validate({"root": "x", "no_such_key": 1})
        with pytest.raises(pydantic.ValidationError):
            found.params.model_validate({"root": "x", "size": "crop"})
        with pytest.raises(pydantic.ValidationError):
            found.params.model_validate({"root": "x", "channels": 2})
        fields = found.params.model_fields
        assert all(f.description for f in fields.values())
        assert "CIFAR zoo" in fields["channels"].description
    # Only Fashion-MNIST has a default root (Debian's package folder).
    assert registry.find("dataset", "fashion_mnist").params().root is None
    with pytest.raises(pydantic.ValidationError):
        registry.find("dataset", "mnist").params()


@pytest.mark.parametrize("name", list(NAMES))
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_pixels_and_labels_round_trip(registry, tmp_path, name, layout, gz):
    arrays = write_dataset(tmp_path, name, layout, gz)
    for split, (images, labels) in arrays.items():
        data = load(registry, name, split, root=str(tmp_path), size="native", channels=1)
        assert data.images.dtype == torch.uint8 and data.images.shape == (len(images), 1, 28, 28)
        assert np.array_equal(data.images[:, 0].numpy(), images)
        assert np.array_equal(data.labels.numpy(), labels.astype(np.int64))
        assert data.labels.dtype == torch.int64 and data.num_classes == 10
        assert data.mean == (STATS[name][0],) and data.std == (STATS[name][1],)


def test_torchvision_root_pointing_at_the_class_folder(registry, tmp_path):
    arrays = write_dataset(tmp_path, "mnist", "torchvision", gz=False)
    data = load(registry, "mnist", "test", root=str(tmp_path / "MNIST"), size="native")
    assert np.array_equal(data.images[:, 0].numpy(), arrays["test"][0])


def test_uncompressed_file_preferred_when_both_exist(registry, tmp_path):
    """torchvision's raw folder holds both; the two must agree, and the .gz is not needed."""
    arrays = write_dataset(tmp_path, "kmnist", "torchvision", gz=False)
    raw = tmp_path / "KMNIST" / "raw"
    for name in (IMAGES["train"], LABELS["train"]):
        (raw / (name + ".gz")).write_bytes(b"not gzip at all")  # would fail if read
    data = load(registry, "kmnist", "train", root=str(tmp_path), size="native")
    assert np.array_equal(data.labels.numpy(), arrays["train"][1])


def test_pad_resize_native_and_channels(registry, tmp_path):
    images, _ = write_dataset(tmp_path)["train"]
    root = str(tmp_path)
    pad = load(registry, "fashion_mnist", "train", root=root)  # defaults: pad, 3 channels
    assert pad.images.shape == (30, 3, 32, 32) and pad.image_size == 32
    assert torch.equal(pad.images[:, 0], pad.images[:, 1])
    assert torch.equal(pad.images[:, 0], pad.images[:, 2])
    assert np.array_equal(pad.images[:, 0, 2:30, 2:30].numpy(), images)
    border = pad.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.count_nonzero()) == 0
    assert pad.mean == (0.2860,) * 3 and pad.std == (0.3530,) * 3

    native = load(registry, "fashion_mnist", "train", root=root, size="native")
    assert native.images.shape == (30, 3, 28, 28)

    gray = load(registry, "fashion_mnist", "train", root=root, size="pad", channels=1)
    assert gray.images.shape == (30, 1, 32, 32) and gray.mean == (0.2860,)

    resized = load(registry, "fashion_mnist", "train", root=root, size="resize", channels=1)
    assert resized.images.dtype == torch.uint8 and resized.images.shape == (30, 1, 32, 32)
    assert not torch.equal(resized.images, gray.images)
    # Bilinear upsampling: each output pixel lies between the input pixels around it, so the
    # image keeps its range and its mean brightness (no black border as with padding).
    x = torch.from_numpy(images).float()
    y = resized.images[:, 0].float()
    assert y.amin() >= x.amin() and y.amax() <= x.amax()
    assert torch.allclose(y.mean(dim=(1, 2)), x.mean(dim=(1, 2)), atol=4.0)
    # Exactly what torchvision's bilinear Resize((32, 32)) makes of the uint8 images.
    import torchvision.transforms.functional as TF

    expected = TF.resize(torch.from_numpy(images).unsqueeze(1), [32, 32],
                         interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(resized.images, expected)


def test_resize_of_constant_and_ramp_images(tmp_path, registry):
    """Exact values: a constant image stays constant; a horizontal ramp stays a monotone ramp."""
    images = np.zeros((10, 28, 28), np.uint8)
    images[0] = 173
    images[1] = (np.arange(28) * 9).astype(np.uint8)[None, :]
    labels = np.arange(10, dtype=np.uint8)
    for split in ("train", "test"):
        write_file(tmp_path / IMAGES[split], idx_bytes(images, 2051), gz=False)
        write_file(tmp_path / LABELS[split], idx_bytes(labels, 2049), gz=False)
    out = load(registry, "mnist", "train", root=str(tmp_path), size="resize", channels=1).images
    assert torch.all(out[0] == 173)
    ramp = out[1, 0].int()
    assert torch.all(ramp == ramp[0:1])  # rows identical
    assert torch.all(ramp[0, 1:] >= ramp[0, :-1]) and ramp[0, 0] == 0 and ramp[0, -1] == 243


def test_subsets_per_class(registry, tmp_path):
    write_dataset(tmp_path, n={"train": 50, "test": 20})
    data = load(registry, "fashion_mnist", "train", root=str(tmp_path))
    sub = subset_per_class(data, 3, seed=0)
    assert sub.images.shape == (30, 3, 32, 32)
    assert torch.bincount(sub.labels, minlength=10).tolist() == [3] * 10
    # Each kept image is still paired with its own label.
    for img, y in zip(sub.images, sub.labels):
        match = (data.images == img).flatten(1).all(1).nonzero().flatten()
        assert len(match) == 1 and data.labels[match[0]] == y


# --------------------------------------------------------------------------------------------
# Missing and malformed files
# --------------------------------------------------------------------------------------------
def raises(fn, *needles: str) -> str:
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    return msg


def test_missing_root_and_files_name_path_and_fix(registry, tmp_path):
    nowhere = tmp_path / "nowhere"
    raises(lambda: load(registry, "fashion_mnist", "train", root=str(nowhere)),
           str(nowhere), "dataset.root", "apt-get install dataset-fashion-mnist", "download = true")
    raises(lambda: load(registry, "mnist", "train", root=str(nowhere)),
           str(nowhere), "download = true")
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(lambda: load(registry, "kmnist", "test", root=str(empty)),
           "KMNIST not found", str(empty), os.path.join(str(empty), "KMNIST", "raw"),
           "t10k-images-idx3-ubyte", "download = true")
    write_dataset(tmp_path / "part", layout="flat")
    os.remove(tmp_path / "part" / (LABELS["test"] + ".gz"))
    load(registry, "fashion_mnist", "train", root=str(tmp_path / "part"))  # train is complete
    raises(lambda: load(registry, "fashion_mnist", "test", root=str(tmp_path / "part")),
           str(tmp_path / "part"), "incomplete", "t10k-labels-idx1-ubyte")


def test_wrong_magic_numbers(registry, tmp_path):
    write_dataset(tmp_path, gz=False)
    images_path = tmp_path / IMAGES["train"]
    labels_path = tmp_path / LABELS["train"]
    good_images, good_labels = images_path.read_bytes(), labels_path.read_bytes()
    # The two files swapped.
    images_path.write_bytes(good_labels)
    raises(lambda: load(registry, "fashion_mnist", "train", root=str(tmp_path)),
           str(images_path), "magic number 2049", "expected 2051", "swapped")
    images_path.write_bytes(good_images)
    labels_path.write_bytes(b"\x12\x34\x56\x78" + good_labels[4:])
    raises(lambda: load(registry, "fashion_mnist", "train", root=str(tmp_path)),
           str(labels_path), f"magic number {0x12345678}", "expected 2049")
    # A gzipped file without the .gz name.
    labels_path.write_bytes(gzip.compress(good_labels))
    raises(lambda: load(registry, "fashion_mnist", "train", root=str(tmp_path)),
           str(labels_path), "gzip-compressed")


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_files(registry, tmp_path, gz):
    write_dataset(tmp_path, gz=False)
    data = (tmp_path / IMAGES["test"]).read_bytes()
    (tmp_path / IMAGES["test"]).unlink()
    cut = write_file(tmp_path / IMAGES["test"], data[:-100], gz)  # a valid gzip of a short file
    raises(lambda: load(registry, "fashion_mnist", "test", root=str(tmp_path)),
           str(cut), "truncated", "20x28x28", f"only {20 * 784 - 100} bytes")
    write_file(tmp_path / IMAGES["test"], data[:10], gz)  # inside the header
    raises(lambda: load(registry, "fashion_mnist", "test", root=str(tmp_path)),
           str(cut), "truncated", "header")
    write_file(tmp_path / IMAGES["test"], data + b"\0" * 7, gz)
    raises(lambda: load(registry, "fashion_mnist", "test", root=str(tmp_path)),
           str(cut), "7 bytes after")


def test_counts_that_disagree(registry, tmp_path):
    write_dataset(tmp_path, gz=True)
    labels_path = write_file(tmp_path / LABELS["train"], idx_bytes(np.zeros(29, np.uint8), 2049),
                             gz=True)
    images_path = tmp_path / (IMAGES["train"] + ".gz")
    raises(lambda: load(registry, "fashion_mnist", "train", root=str(tmp_path)),
           str(images_path), "30 images", str(labels_path), "29 labels")


def test_labels_out_of_range_and_wrong_image_size(registry, tmp_path):
    write_dataset(tmp_path, gz=False)
    labels_path = tmp_path / LABELS["train"]
    write_file(labels_path, idx_bytes(np.full(30, 10, np.uint8), 2049), gz=False)
    raises(lambda: load(registry, "mnist", "train", root=str(tmp_path)),
           str(labels_path), "label 10", "0..9")
    images_path = tmp_path / IMAGES["test"]
    write_file(images_path, idx_bytes(np.zeros((20, 32, 32), np.uint8), 2051), gz=False)
    raises(lambda: load(registry, "mnist", "test", root=str(tmp_path)),
           str(images_path), "32x32", "expected 28x28")


def test_corrupt_gzip(registry, tmp_path):
    write_dataset(tmp_path, gz=True)
    path = tmp_path / (IMAGES["train"] + ".gz")
    good = path.read_bytes()
    path.write_bytes(b"this is not gzip data at all")
    raises(lambda: load(registry, "fashion_mnist", "train", root=str(tmp_path)),
           f"gzip file {path}", "corrupt")
    path.write_bytes(good[: len(good) // 2])  # a cut-off download
    raises(lambda: load(registry, "fashion_mnist", "train", root=str(tmp_path)),
           f"gzip file {path}", "corrupt or truncated")
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # damaged in the middle: bad data or a CRC mismatch
    path.write_bytes(bytes(flipped))
    raises(lambda: load(registry, "fashion_mnist", "train", root=str(tmp_path)),
           f"gzip file {path}", "corrupt")


def test_bad_file_through_the_cli_exits_2_naming_the_file(tiny_recipe, tmp_path, capsys):
    write_dataset(tmp_path / "fm", gz=True)
    path = tmp_path / "fm" / (LABELS["test"] + ".gz")
    path.write_bytes(path.read_bytes()[:-9])
    recipe = tiny_recipe()
    text = recipe.read_text()
    old = ('[dataset]\nname = "synthetic"\nnum_classes = 4\ntrain_per_class = 12\n'
           'test_per_class = 6\nimage_size = 16')
    assert old in text
    recipe.write_text(text.replace(old, f'[dataset]\nname = "fashion_mnist"\n'
                                        f'root = "{(tmp_path / "fm").as_posix()}"'))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdbench: error: ") and "Traceback" not in err
    assert str(path) in err and "corrupt or truncated" in err


# --------------------------------------------------------------------------------------------
# Default root (Debian) and download = true
# --------------------------------------------------------------------------------------------
def test_fashion_mnist_default_root_is_the_debian_folder(registry, tmp_path, monkeypatch):
    arrays = write_dataset(tmp_path / "debian")
    monkeypatch.setattr(plugin, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    data = load(registry, "fashion_mnist", "test", size="native", channels=1)
    assert np.array_equal(data.images[:, 0].numpy(), arrays["test"][0])
    monkeypatch.setattr(plugin, "DEBIAN_FASHION_MNIST", str(tmp_path / "not-installed"))
    raises(lambda: load(registry, "fashion_mnist", "test"),
           "dataset.root is not set", str(tmp_path / "not-installed"),
           "apt-get install dataset-fashion-mnist")
    raises(lambda: load(registry, "fashion_mnist", "test", download=True),
           "download = true", "set dataset.root")


def test_download_uses_torchvision_dataset_class(registry, tmp_path, monkeypatch):
    """download = true constructs torchvision's class with download=True (faked here: no
    network), then reads what it left in root/<Class>/raw."""
    import torchvision.datasets as tvd

    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_dataset(Path(root), "mnist", "torchvision", gz=True)

    monkeypatch.setattr(tvd, "MNIST", FakeMNIST)
    root = tmp_path / "new" / "data"
    data = load(registry, "mnist", "train", root=str(root), download=True, size="native")
    assert calls == [(str(root), True, True)]
    assert data.images.shape == (30, 3, 28, 28)

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")

    monkeypatch.setattr(tvd, "KMNIST", Offline)
    raises(lambda: load(registry, "kmnist", "train", root=str(tmp_path / "k"), download=True),
           "could not download KMNIST", str(tmp_path / "k"), "no network")


# --------------------------------------------------------------------------------------------
# The real files
# --------------------------------------------------------------------------------------------
def test_real_debian_fashion_mnist(registry, tmp_path):
    folder = plugin.DEBIAN_FASHION_MNIST
    if not os.path.isdir(folder):
        pytest.fail(f"{folder} is missing: apt-get install dataset-fashion-mnist "
                    "(.ci/run installs it)")
    train = load(registry, "fashion_mnist", "train")  # root omitted: Debian's folder
    test = load(registry, "fashion_mnist", "test", size="native", channels=1)
    assert train.images.shape == (60000, 3, 32, 32) and test.images.shape == (10000, 1, 28, 28)
    assert train.num_classes == test.num_classes == 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    # The published normalisation values are those of these training pixels.
    native = train.images[:, 0, 2:30, 2:30].double() / 255
    assert abs(native.mean().item() - 0.2860) < 5e-5
    assert abs(native.std().item() - 0.3530) < 5e-5
    assert int(train.images[:, :, :2].count_nonzero()) == 0  # padding
    # An independent reader (torchvision's) gives the same arrays for the test split.
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(os.path.join(folder, name + ".gz"), "rb") as src, \
                open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert torch.equal(read_image_file(str(tmp_path / "t10k-images-idx3-ubyte")),
                       test.images[:, 0])
    assert torch.equal(read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")), test.labels)
