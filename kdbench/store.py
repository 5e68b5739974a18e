"""Run folders, result records and the teacher cache.

Layout under a recipe's output folder (teachers may live in a shared cache folder)::

    students/<run id>/record.json
    teachers/<teacher id>/record.json, model.pt

Every file is written atomically (temp file in the same folder, fsync, ``os.replace``), so a
crash or a full disk leaves the previous good file intact, and nothing is ever appended to a
file shared by several processes. A write that fails (disk full, no permission, read-only file
system) raises :class:`StoreError`, a :class:`UserError`: one clear message, no traceback.

Record statuses: ``done``, ``diverged`` (a result: the loss became NaN/inf), ``failed`` (an
exception; ``error.txt`` holds the traceback), ``interrupted`` (stopped by a signal with a
checkpoint; resumed by the next ``kdbench run``). Run folders may also hold checkpoints
(``ckpt-*.pt``, see :mod:`kdbench.engine.checkpoint`) and a ``.lock`` file
(:mod:`kdbench.engine.locks`).
"""
from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from kdbench.api import UserError

RECORD = "record.json"
WEIGHTS = "model.pt"


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


class StoreError(UserError):
    """A file of the run store could not be written; the previous version is intact."""


_HINTS = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some space in your quota",
          errno.EROFS: "choose a writable output folder (--output)",
          errno.EACCES: "check the folder's permissions or choose another output folder (--output)"}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600; results are shared files
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            what = exc.strerror or str(exc)
            hint = _HINTS.get(exc.errno, "fix the problem")
            kept = " (the previous version is intact)" if path.exists() else ""
            raise StoreError(f"cannot write {path}: {what}{kept}; {hint} and run the same "
                             "command again") from exc
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RunStore:
    def __init__(self, output_dir: Path, teacher_dir: Path):
        self.output_dir = Path(output_dir)
        self.teacher_dir = Path(teacher_dir)

    def run_dir(self, kind: str, run_id: str) -> Path:
        return (self.teacher_dir if kind == "teacher" else self.output_dir / "students") / run_id

    def record(self, kind: str, run_id: str) -> dict | None:
        return read_json(self.run_dir(kind, run_id) / RECORD)

    def status(self, kind: str, run_id: str) -> str | None:
        """The record's status; None without a (readable) record, and a teacher without its
        weights file is not ``done``."""
        rec = self.record(kind, run_id)
        if not rec:
            return None
        status = rec.get("status")
        if status == "done" and kind == "teacher" and not (self.run_dir(kind, run_id) / WEIGHTS).exists():
            return None
        return status

    def is_done(self, kind: str, run_id: str) -> bool:
        return self.status(kind, run_id) == "done"

    def write_record(self, kind: str, run_id: str, record: dict) -> Path:
        path = self.run_dir(kind, run_id) / RECORD
        atomic_write_json(path, record)
        return path

    def save_weights(self, run_id: str, state_dict: dict) -> None:
        atomic_torch_save(self.run_dir("teacher", run_id) / WEIGHTS, state_dict)

    def load_weights(self, run_id: str, device: torch.device) -> dict:
        return torch.load(self.run_dir("teacher", run_id) / WEIGHTS, map_location=device,
                          weights_only=True)


def iter_records(root: Path) -> Iterator[dict]:
    """Every record.json below ``root`` (students and teachers, any depth)."""
    for path in sorted(Path(root).rglob(RECORD)):
        rec = read_json(path)
        if rec is not None:
            rec.setdefault("_path", str(path))
            yield rec


def provenance(device: torch.device, plugin_versions: dict[str, str]) -> dict:
    """What a result depends on besides its spec. ``device`` is the GPU's name on CUDA, else
    the processor architecture (``platform.processor()``); ``threads`` (torch's intra-op
    thread count: float reductions are split, and summed, differently with another count),
    ``cpu`` (model name), ``cuda``/``cudnn`` (versions torch runs with; cuDNN's only when CUDA
    is available) and ``gpu`` (name, CUDA devices only) say why two runs differ."""
    import kdbench

    info = {
        "kdbench": kdbench.__version__,
        "plugins": plugin_versions,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": _device_name(device),
        "git_commit": _git_commit(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("model name" in /proc/cpuinfo on Linux x86; "Model"/"Hardware"
    on some ARM boards), else ``platform.processor()`` / ``platform.machine()``."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        fields = {}
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    for key in ("model name", "model", "hardware", "cpu model"):
        if fields.get(key) and not fields[key].isdigit():  # x86's "model" is a number
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def _cudnn_version() -> int | None:
    if not torch.cuda.is_available():
        return None
    try:
        return torch.backends.cudnn.version()
    except Exception:  # a broken cuDNN install must not keep the record from being written
        return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
