"""Shared helpers of the benchmark scripts: synthetic data, nets and tasks built by the engine's
own builders (:mod:`kdbench.engine.tasks`: nothing here builds a task by hand), device handling
and markdown tables.

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

from _tables import md_table  # noqa: E402,F401  (re-exported)

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


def has_init_stage(registry, name: str) -> bool:
    """The student method overrides StudentMethod.init_stage (the base declares no stage)."""
    from kdbench.api import StudentMethod

    factory = registry.find("student_method", name).factory
    return isinstance(factory, type) and factory.init_stage is not StudentMethod.init_stage


def model_spec(name: str, width_mult: float) -> dict:
    return {"name": name, "params": {"width_mult": PUBLISHED_WIDTH.get(name, 1.0) * width_mult}}


LAYOUTS = ("engine", "channels_last", "contiguous")


def memory_format(layout: str):
    """torch memory format of an explicit layout ("channels_last", "contiguous")."""
    return {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[layout]


def build_net(name: str, width_mult: float, num_classes: int, device, layout: str = "engine",
              compile: bool = False):
    """``name`` built and placed by the engine (``tasks.build_model`` + ``tasks.place_model``:
    channels_last on CUDA, compiled in place if ``compile``). ``layout`` other than "engine"
    then puts the weights in that memory format (not with ``compile``)."""
    from kdbench.engine.tasks import build_model, place_model

    if compile and layout != "engine":
        raise ValueError("compile=True builds the engine's layout only")
    model = place_model(build_model(registry(), model_spec(name, width_mult), num_classes),
                        torch.device(device), compile=compile)
    if layout != "engine":
        model = model.to(memory_format=memory_format(layout))
    return model


def freeze(model):
    """As ``RunTrainer.load_teacher`` leaves a teacher: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_teacher(name: str, width_mult: float, num_classes: int, device, layout: str = "engine",
                   compile: bool = False):
    """A frozen teacher (random weights here) as ``RunTrainer.load_teacher`` leaves it."""
    return freeze(build_net(name, width_mult, num_classes, device, layout, compile))


def device_data(data, device, layout: str = "engine"):
    """``DeviceData`` with the registry's augmentation views, as the trainer builds it. The
    engine's batches are channels_last on CUDA and contiguous on the CPU; ``layout`` other than
    "engine" makes every batch (and view) come out in that memory format instead."""
    from kdbench.data.loader import DeviceData

    formats = {"engine": None, "contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    return DeviceData(data, torch.device(device), registry().view_makers(), memory_format=formats[layout])


def batch_layout(data) -> str:
    """The memory format ``data``'s batches actually come out in (what a row really ran)."""
    x = data.normalize(data.images[:2])
    if x.is_contiguous():
        return "contiguous"
    return "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "strided"


def net_layout(model) -> str:
    """The memory format of ``model``'s first 4-d weight."""
    for p in model.parameters():
        if p.dim() == 4:
            if p.is_contiguous():
                return "contiguous"
            return "channels_last" if p.is_contiguous(memory_format=torch.channels_last) else "strided"
    return "contiguous"


def student_task(student, teacher, train, device, methods=KD_METHODS, precision: str = "fp32",
                 cast_teacher: bool = True, optimizer=None):
    """The engine's StudentTask for ``methods`` (default: the paper's KD row), built by
    ``kdbench.engine.tasks.build_student_task`` exactly as a run builds it (sizing forward,
    then the teacher's one-time cast to ``precision``'s autocast dtype if ``cast_teacher``);
    ``optimizer``: (name, params) of an optimizer plugin, the task's ``update_rule``."""
    from kdbench.engine.tasks import build_student_task

    return build_student_task(registry(), list(methods), student, teacher, train,
                              torch.device(device), precision, cast_teacher=cast_teacher,
                              optimizer=optimizer)


def teacher_task(model, objective, train, device):
    """The engine's TeacherTask for ``objective`` = (name, params)."""
    from kdbench.engine.tasks import build_teacher_task

    return build_teacher_task(registry(), objective, model, train, torch.device(device))


def trained_params(task):
    return [p for m in task.modules() for p in m.parameters() if p.requires_grad]


def resolve_precision(device, precision: str) -> str:
    """What a precision means on ``device``: "bf16" if the engine autocasts to bf16, else "fp32"."""
    from kdbench.engine.loop import autocast_dtype

    return "bf16" if autocast_dtype(torch.device(device), precision) is not None else "fp32"


def NoProgress():
    """The progress interface ``loop.fit`` reports to, silent (the engine's own)."""
    from kdbench.progress import SilentProgress

    return SilentProgress()


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


def log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)
