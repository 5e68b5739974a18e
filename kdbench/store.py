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
(``ckpt-*.pt``, see :mod:`kdbench.engine.checkpoint`), a ``.lock`` file
(:mod:`kdbench.engine.locks`) and ``attempts`` (how many times the run was started, killed
attempts included: they write no record).

Bad state on disk is never taken for a result: a record that is not a JSON object, lacks what
every record holds, or is ``done`` without its numbers (:func:`record_problem`), and a teacher
whose ``model.pt`` cannot be loaded or does not match the record's ``weights_sha256``, count as
not done. The run that trains such a run again first moves the bad files aside
(``record.json.corrupt-<UTC time>``), so nothing is deleted.
"""
from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from kdbench.api import UserError

RECORD = "record.json"
WEIGHTS = "model.pt"
ATTEMPTS = "attempts"
STALE_TEMP_S = 60.0  # a temp file this old in a run folder we hold the lock of is a dead writer's


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


class StoreError(UserError):
    """A file of the run store could not be written; the previous version is intact."""


WRITE_HINTS = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some space in your quota",
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
            hint = WRITE_HINTS.get(exc.errno, "fix the problem")
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
    """The JSON object in ``path``; None if it is missing, unreadable, not JSON or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Whether files can be written in ``folder``, made as needed: a probe file is written (and
    removed) in it, or in its nearest existing parent if it does not exist yet (nothing is
    made). A :class:`StoreError` naming ``what`` (e.g. "output folder"), the folder, why and
    ``fix`` otherwise. Run before any training, so an unwritable output is one line."""
    folder = Path(folder)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        why = "it is a file, not a folder" if existing == folder else f"{existing} is a file, not a folder"
        raise StoreError(f"{what} {folder}: {why}; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kdbench-write-check.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = "files cannot be made there" if exc.errno == errno.ENOENT else exc.strerror or exc
        raise StoreError(f"{what} {folder}: cannot write there ({reason}); {fix}") from None


def remove_stale_temp_files(folder: Path, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Delete the temp files of atomic writes (``.<name>.*.tmp``) below ``folder`` that are older
    than ``older_than_s``: left by a process killed mid-write. Call only while holding the
    folder's run lock: the lock holder is the only writer there, and the age spares the one
    write done without it (a student's "teacher failed" record). The files removed."""
    removed, now = [], time.time()
    for p in Path(folder).rglob(".*.tmp"):
        try:
            if p.is_file() and now - p.stat().st_mtime > older_than_s:
                p.unlink()
                removed.append(p)
        except OSError:
            pass  # gone already, or not ours to delete: harmless either way
    return removed


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(rec: Any, kind: str | None = None) -> str | None:
    """Why ``rec`` (a parsed record.json) cannot be used as a record; None if it can. Every
    record is an object with ``id``, ``kind``, ``status`` and ``spec``; a ``done`` record has
    numbers in ``final.top1`` and ``best.top1``; a student's ``meta`` names its group, dataset,
    pair and method set, and its ``spec`` its seed (a teacher's row comes from its students')."""
    if not isinstance(rec, dict):
        return f"it holds a JSON {type(rec).__name__}, not an object"
    missing = [k for k in ("id", "kind", "status") if not isinstance(rec.get(k), str)]
    missing += ["spec"] if not isinstance(rec.get("spec"), dict) else []
    missing += ["meta"] if rec.get("kind") == "student" and not isinstance(rec.get("meta"), dict) else []
    if missing:
        return "it has no " + ", ".join(repr(k) for k in missing)
    if kind is not None and rec["kind"] != kind:
        return f"it is a {rec['kind']!r} record in a {kind}'s folder"
    if rec["kind"] == "student":
        lacking = [k for k in ("group", "dataset", "pair", "method_set") if k not in rec["meta"]]
        lacking += ["spec.seed"] if "seed" not in rec["spec"] else []
        if lacking:
            return "a student record without " + ", ".join(lacking)
    if rec["status"] == "done":
        for m in ("final", "best"):
            part = rec.get(m)
            if not isinstance(part, dict) or not _number(part.get("top1")):
                return f"a done record without a number in {m}.top1"
    return None


def load_record(path: Path, kind: str | None = None) -> tuple[dict | None, str | None]:
    """(record, None) for a good record, (None, why) for a bad one, (None, None) if there is
    none."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    if not text.strip():
        return None, "it is empty"
    try:
        rec = json.loads(text)
    except ValueError as exc:
        return None, f"it is not valid JSON (truncated?): {exc}"
    why = record_problem(rec, kind)
    return (None, why) if why else (rec, None)


def set_aside(path: Path) -> Path:
    """Move a bad file out of the way, to ``<name>.corrupt-<UTC time>`` beside it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, dest)
    return dest


class RunStore:
    def __init__(self, output_dir: Path, teacher_dir: Path):
        self.output_dir = Path(output_dir)
        self.teacher_dir = Path(teacher_dir)
        # (weights file, size, mtime, recorded sha256) -> the problem found (None: good); each
        # teacher's weights are loaded and checked once per process, not at every status().
        self._weights_checked: dict[tuple, str | None] = {}

    def run_dir(self, kind: str, run_id: str) -> Path:
        return (self.teacher_dir if kind == "teacher" else self.output_dir / "students") / run_id

    def record(self, kind: str, run_id: str) -> dict | None:
        """The run's record; None if there is none or it is bad (see :meth:`problems`)."""
        return load_record(self.run_dir(kind, run_id) / RECORD, kind)[0]

    def status(self, kind: str, run_id: str) -> str | None:
        """The record's status; None without a good record, and a teacher whose weights file is
        missing, unreadable or not the recorded weights is not ``done``."""
        rec = self.record(kind, run_id)
        if not rec:
            return None
        status = rec.get("status")
        if status == "done" and kind == "teacher" and self.weights_problem(run_id, rec):
            return None
        return status

    def weights_problem(self, run_id: str, rec: dict) -> str | None:
        """Why a done teacher's ``model.pt`` cannot be used (None: it can): missing, unreadable
        (truncated), or its weights' fingerprint is not the record's ``weights_sha256``."""
        from kdbench.engine.reproducibility import weights_sha256

        path = self.run_dir("teacher", run_id) / WEIGHTS
        try:
            st = path.stat()
        except OSError:
            return f"its weights file {path} is missing"
        key = (str(path), st.st_size, st.st_mtime_ns, rec.get("weights_sha256"))
        if key not in self._weights_checked:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict):
                    raise ValueError("not a state dict")
            except Exception as exc:
                problem = (f"its weights file {path} cannot be loaded (truncated or corrupt: "
                           f"{' '.join(str(exc).split())[:120]})")
            else:
                want = rec.get("weights_sha256")
                problem = (f"its weights file {path} does not hold the recorded weights "
                           "(weights_sha256 differs: replaced by another file?)"
                           if want and weights_sha256(state) != want else None)
            self._weights_checked[key] = problem
        return self._weights_checked[key]

    def problems(self, kind: str, run_id: str) -> list[tuple[Path, str]]:
        """The bad files of a run: (path, why), a bad record or a done teacher's bad weights."""
        path = self.run_dir(kind, run_id) / RECORD
        rec, why = load_record(path, kind)
        if why:
            return [(path, f"{path}: {why}")]
        if rec is not None and kind == "teacher" and rec.get("status") == "done":
            weights = self.weights_problem(run_id, rec)
            if weights and (self.run_dir(kind, run_id) / WEIGHTS).exists():
                return [(path, weights), (self.run_dir(kind, run_id) / WEIGHTS, weights)]
        return []

    def set_aside_bad_files(self, kind: str, run_id: str) -> tuple[str, list[Path]] | None:
        """Move the run's bad files (see :meth:`problems`) aside before it is trained again;
        (why, where they went), or None if there were none. Call with the run's lock held."""
        bad = self.problems(kind, run_id)
        moved = []
        for path, why in bad:
            try:
                moved.append(set_aside(path))
            except OSError as exc:
                raise StoreError(f"{path} cannot be used ({why}) nor moved aside: "
                                 f"{exc.strerror or exc}; move or delete it and run the same "
                                 "command again") from None
        return (bad[0][1], moved) if bad else None

    def attempts(self, kind: str, run_id: str) -> int:
        """How many times the run was started (0 if never counted)."""
        try:
            return max(0, int((self.run_dir(kind, run_id) / ATTEMPTS).read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            return 0

    def start_attempt(self, kind: str, run_id: str) -> int:
        """Count one more start of the run (before training it, with its lock held); the count.
        Persisted, so attempts killed before they wrote a record are counted too."""
        n = self.attempts(kind, run_id) + 1
        atomic_write_bytes(self.run_dir(kind, run_id) / ATTEMPTS, f"{n}\n".encode())
        return n

    def remove_stale_temp_files(self, kind: str, run_id: str) -> list[Path]:
        """Temp files of writes killed half-way in the run's folder (with its lock held)."""
        return remove_stale_temp_files(self.run_dir(kind, run_id))

    def is_done(self, kind: str, run_id: str) -> bool:
        return self.status(kind, run_id) == "done"

    def write_record(self, kind: str, run_id: str, record: dict) -> Path:
        path = self.run_dir(kind, run_id) / RECORD
        atomic_write_json(path, record)
        return path

    def save_weights(self, run_id: str, state_dict: dict) -> None:
        atomic_torch_save(self.run_dir("teacher", run_id) / WEIGHTS, state_dict)

    def load_weights(self, run_id: str, device: torch.device) -> dict:
        path = self.run_dir("teacher", run_id) / WEIGHTS
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:
            # Found bad after status() said done (changed since): the next run retrains it.
            raise ValueError(f"teacher weights {path} cannot be loaded ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:120]}); run the same command again: "
                             "the teacher is checked and trained again") from None


def scan_records(root: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every record.json below ``root`` (students and teachers, any depth): the good records
    (each with its ``_path``) and (path, why) for each bad one."""
    good, bad = [], []
    for path in sorted(Path(root).rglob(RECORD)):
        rec, why = load_record(path)
        if why:
            bad.append((path, why))
        elif rec is not None:
            rec.setdefault("_path", str(path))
            good.append(rec)
    return good, bad


def iter_records(root: Path) -> Iterator[dict]:
    """Every good record.json below ``root`` (see :func:`scan_records` for the bad ones)."""
    yield from scan_records(root)[0]


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
        "git_commit": git_state()[0],
        "git_dirty": git_state()[1],  # True: trained by uncommitted changes to that commit
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


_GIT_STATE: dict[str, tuple[str | None, bool | None]] = {}


def git_state(checkout: Path | str | None = None) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the git checkout holding kdbench
    (or ``checkout``), as the first call in this process found it; (None, None) outside git.

    Read once and kept: a long grid records the code it started with, not a commit made in
    the checkout while it trains (the runner calls this when it is built)."""
    here = str(Path(checkout) if checkout else Path(__file__).resolve().parent.parent)
    if here not in _GIT_STATE:
        def git(*args: str) -> str | None:
            try:
                out = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                                     timeout=5)
            except (OSError, subprocess.SubprocessError):
                return None
            return out.stdout if out.returncode == 0 else None

        commit = (git("rev-parse", "HEAD") or "").strip() or None
        changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
        _GIT_STATE[here] = (commit, None if changes is None else bool(changes.strip()))
    return _GIT_STATE[here]
