"""Shared helpers of the benchmark scripts: synthetic data, the KD student task built exactly as
``GridRunner._train_student`` builds it, device handling and markdown tables.

Nothing here is timed; the scripts import it as ``_common`` (they run as
``python benchmarks/<script>.py`` so this folder is on ``sys.path``).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

os.environ.setdefault("KDBENCH_ONLY_DISTS", "kdbench")  # the built-in plugins only

import torch  # noqa: E402

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
PUBLISHED_WIDTH = {"mobilenetv2": 0.5}  # zoo models whose published width_mult is not 1.0

# The paper's pairs (Tables 1 and 2): label -> (teacher, student).
PAPER_PAIRS = {
    "resnet50->resnet34": ("resnet50", "resnet34"),
    "wrn_40_2->wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "vgg13->vgg8": ("vgg13", "vgg8"),
    "resnet50->mobilenetv2": ("resnet50", "mobilenetv2"),
    "vgg13->mobilenetv2": ("vgg13", "mobilenetv2"),
    "wrn_40_2->shufflenetv2": ("wrn_40_2", "shufflenetv2"),
}
KD_METHODS = (("ce", 0.1, {}), ("kd", 0.9, {"temperature": 4.0}))  # the paper's KD row


def parse_pairs(text: str, known: dict = PAPER_PAIRS) -> list[str]:
    """Comma-separated pair labels; ``teacher->student`` of any zoo models is also accepted."""
    out = []
    for p in (s.strip() for s in text.split(",")):
        if not p:
            continue
        if p not in known and "->" not in p:
            raise SystemExit(f"unknown pair {p!r}: one of {', '.join(known)} or teacher->student")
        out.append(p)
    return out


def pair_models(label: str) -> tuple[str, str]:
    if label in PAPER_PAIRS:
        return PAPER_PAIRS[label]
    t, s = label.split("->")
    return t.strip(), s.strip()


def resolve_devices(arg: str) -> list[str]:
    """cpu | cuda | all (cpu, and cuda when present) | auto (cuda when present, else cpu)."""
    has_cuda = torch.cuda.is_available()
    if arg == "cuda" and not has_cuda:
        raise SystemExit("--device cuda: no CUDA device is available")
    return {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if has_cuda else []),
            "auto": ["cuda" if has_cuda else "cpu"]}[arg]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n > 1 else ''})"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}{gpu}, "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}")


def synthetic_images(n: int, num_classes: int = 100, size: int = 32, seed: int = 0):
    """``n`` uniform random uint8 images (N, 3, size, size) and labels: the shape of CIFAR."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return images, labels


def image_data(images, labels, num_classes: int = 100):
    from kdbench.api import ImageData

    return ImageData(images, labels, num_classes, CIFAR100_MEAN, CIFAR100_STD)


_REGISTRY = None


def registry():
    global _REGISTRY
    if _REGISTRY is None:
        from kdbench.registry import load_registry

        _REGISTRY = load_registry()
    return _REGISTRY


def model_spec(name: str, width_mult: float) -> dict:
    return {"name": name, "params": {"width_mult": PUBLISHED_WIDTH.get(name, 1.0) * width_mult}}


def build_net(name: str, width_mult: float, num_classes: int, device):
    from kdbench.engine.runner import build_model

    return build_model(registry(), model_spec(name, width_mult), num_classes).to(device)


def frozen_teacher(name: str, width_mult: float, num_classes: int, device):
    """As ``GridRunner.load_teacher``: eval mode, no gradients (random weights here)."""
    teacher = build_net(name, width_mult, num_classes, device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def student_methods(student, teacher, train, device, methods=KD_METHODS):
    """``[(name, weight, module)]`` built as ``GridRunner._train_student`` builds them."""
    from kdbench.api import MethodSetup
    from kdbench.engine.runner import dummy_forward

    setup = MethodSetup(student=student, teacher=teacher,
                        student_out=dummy_forward(student, train),
                        teacher_out=dummy_forward(teacher, train) if teacher is not None else None,
                        num_classes=train.num_classes, num_train_samples=len(train),
                        train_labels=train.labels, image_size=int(train.images.shape[-1]),
                        device=torch.device(device))
    out = []
    for name, weight, params in methods:
        plugin = registry().find("student_method", name)
        method = plugin.factory(plugin.params.model_validate(params), setup)
        out.append((name, weight, method.to(device)))
    return out


def kd_task(teacher, student, train, device):
    """The engine's StudentTask for ce 0.1 + kd 0.9 (T = 4)."""
    from kdbench.engine.runner import StudentTask

    return StudentTask(student, teacher, student_methods(student, teacher, train, device))


class NoProgress:
    """The progress interface ``loop.fit`` reports to, silent."""

    def batch(self):
        pass

    def epoch_done(self, epoch, metrics):
        pass


def schedule(batch_size: int, epochs: int = 1, lr: float = 0.05):
    from kdbench.recipe import Schedule

    return Schedule(epochs=epochs, batch_size=batch_size, lr=lr)


class PILDataset(torch.utils.data.Dataset):
    """CIFAR as torchvision (and RepDistiller) hold it: an (N, H, W, 3) uint8 numpy array, one
    ``PIL.Image`` per ``__getitem__``, then the transform."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        import numpy as np

        self.data = np.ascontiguousarray(images_nchw.permute(0, 2, 3, 1).numpy())
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def pil_transform(size: int = 32):
    """The CIFAR training transform of torchvision-based KD code (RepDistiller, mdistiller)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def md_table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A markdown table; columns whose index is in ``right`` are right-aligned (default: all
    but the first two)."""
    right = set(range(2, len(headers))) if right is None else right
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)
