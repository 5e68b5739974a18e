"""The ``local`` launcher: a pool of worker processes on this machine, one per device.

Each worker is a plain ``kdbench run <recipe> --launcher inline --device <its device>``: a
:class:`~kdbench.engine.runner.GridRunner` over the same grid. The per-run locks
(:mod:`kdbench.engine.locks`) do the scheduling: a worker skips a run another worker holds and
comes back to it, and a student whose teacher another worker is training waits for it, so every
teacher is trained once and before its students, whatever the number of workers.

A worker that dies (even by SIGKILL) loses only its current run: the kernel drops its lock, and
another worker that still has the run queued takes it up from its last checkpoint (or a rerun of
the same command does).

The parent trains nothing. It watches the run folders (records, and which run locks are held and
by which worker) and shows one view of the whole grid: runs finished, the run of each device, an
ETA. The stop signals it receives (SIGTERM, SIGINT, SIGUSR1, SIGUSR2: :mod:`kdbench.engine.signals`)
are passed on to the workers, which write a checkpoint and stop. Each worker's output goes to
``<output>/logs/worker-<i>.log``.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdbench.api import UserError
from kdbench.engine.locks import LOCK
from kdbench.engine.signals import STOP_SIGNALS
from kdbench.launchers import LAUNCHER_ENV
from kdbench.recipe import LoadedRecipe, RunSpec, expand
from kdbench.registry import Registry
from kdbench.store import RunStore

POLL_S = 1.0
FINAL = ("done", "diverged", "failed")
# Test-only: "<i>:<step>" makes worker i SIGKILL itself after step <step> of its first fresh run;
# the other workers start once it has begun (its log is written to), so that it gets a run.
KILL_WORKER_ENV = "KDBENCH_TEST_KILL_WORKER"
# Test-only: seconds to wait before starting each worker after the first (a signal then arrives
# while the pool is starting).
START_DELAY_ENV = "KDBENCH_TEST_WORKER_START_DELAY"


def parse_devices(devices: str | None, workers: int | None) -> list[str]:
    """One device name per worker, from ``--devices a,b,...`` or ``--workers N`` (CPU workers);
    without either, one worker per CUDA device."""
    import torch

    from kdbench.engine.device import resolve_device

    if devices and workers:
        raise UserError("give either --devices or --workers, not both")
    if devices:
        names = [d.strip() for d in devices.split(",") if d.strip()]
        for name in names:
            if name == "auto":
                raise UserError("--devices takes explicit devices (cpu, cuda:N), not 'auto'")
            resolve_device(name)  # a UserError if it does not exist
    elif workers is not None:
        if workers <= 0:
            raise UserError(f"--workers must be a positive number, got {workers}")
        names = ["cpu"] * workers
    elif torch.cuda.is_available():
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        raise UserError("the local launcher needs --devices (e.g. cuda:0,cuda:1 or cpu,cpu) or "
                        "--workers N (CPU workers): no CUDA device is available")
    if not names:
        raise UserError("--devices names no device")
    return names


@dataclass
class Worker:
    index: int
    device: str
    proc: subprocess.Popen
    log: Path

    @property
    def label(self) -> str:
        return f"{self.device}#{self.index}"


def worker_command(recipe: Path, device: str, passthrough: list[str]) -> list[str]:
    return [sys.executable, "-m", "kdbench", "run", str(recipe), "--launcher", "inline",
            "--device", device, "--plain", *passthrough]


def start_workers(recipe: Path, devices: list[str], passthrough: list[str], log_dir: Path,
                  launcher: str = "local", workers: list[Worker] | None = None,
                  stopped: Callable[[], bool] = lambda: False) -> list[Worker]:
    """One worker per device, each appended to ``workers`` as soon as it runs (the parent's
    signal handler passes signals on to that list); once ``stopped()`` no more are started."""
    log_dir.mkdir(parents=True, exist_ok=True)
    ncpu = sum(d == "cpu" for d in devices)
    kill = os.environ.get(KILL_WORKER_ENV, "")
    delay = float(os.environ.get(START_DELAY_ENV, "0") or 0)
    workers = [] if workers is None else workers
    for i, device in enumerate(devices):
        if i and delay:
            time.sleep(delay)
        if stopped():
            break
        env = dict(os.environ)
        env[LAUNCHER_ENV] = launcher
        env.pop(KILL_WORKER_ENV, None)
        if kill.partition(":")[0] == str(i):
            env["KDBENCH_TEST_KILL_AT_STEP"] = kill.partition(":")[2]
        if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ncpu))  # share the cores
        log = log_dir / f"worker-{i}.log"
        size = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            # A session of its own: a Ctrl-C on the terminal reaches only the parent, which
            # passes it on once (a second signal would make a worker stop without its checkpoint).
            proc = subprocess.Popen(worker_command(recipe, device, passthrough), env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        workers.append(Worker(i, device, proc, log))
        if kill.partition(":")[0] == str(i):  # test hook: it must get a run before the others start
            deadline = time.monotonic() + 120
            while log.stat().st_size == size and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
    return workers


def lock_holder_pid(run_dir: Path) -> int | None:
    """The pid holding the run's lock, or None if it is free. Probes without taking the lock
    for more than an instant and without writing the lock file."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 200).decode(errors="replace").split()
            return int(text[1]) if len(text) > 1 and text[0] == "pid" and text[1].isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class GridView:
    """The state of a grid, read from its run folders: what is finished and what runs where."""

    def __init__(self, loaded: LoadedRecipe, registry: Registry, retry_diverged: bool = False,
                 only: list[str] | None = None):
        self.store = RunStore(loaded.output_dir, loaded.teacher_dir)
        teachers, students = expand(loaded, registry)
        self.final = ("done", "failed") if retry_diverged else FINAL
        done = {"done"} if retry_diverged else {"done", "diverged"}
        needed = {s.teacher.id for s in students if s.teacher and self.status(s) not in done}
        self.specs: list[RunSpec] = ([t for t in teachers if t.id in needed and self.status(t) not in done]
                                     + [s for s in students if self.status(s) not in done])
        if only:  # kdbench run --run-id
            self.specs = [s for s in self.specs if s.id in set(only)]
        # Runs with a final status already (failed before: the workers retry them), not
        # counted in the ETA.
        self.start_finished = sum(self.status(s) in self.final for s in self.specs)

    def status(self, spec: RunSpec) -> str | None:
        return self.store.status(spec.kind, spec.id)

    def poll(self) -> tuple[dict[str, int], dict[int, RunSpec]]:
        """(count of runs by status, running run by worker pid)."""
        counts: dict[str, int] = {}
        running: dict[int, RunSpec] = {}
        for spec in self.specs:
            status = self.status(spec)
            if status not in self.final:
                pid = lock_holder_pid(self.store.run_dir(spec.kind, spec.id))
                if pid is not None:
                    running[pid] = spec
            counts[status or "todo"] = counts.get(status or "todo", 0) + 1
        return counts, running


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Watcher:
    """Prints the grid's state: a line whenever it changes (plain), or bars on a terminal."""

    def __init__(self, view: GridView, workers: list[Worker], plain: bool):
        self.view, self.workers, self.plain = view, workers, plain
        self.t0 = time.monotonic()
        self.last = ""
        self.bars = None
        if not plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[eta]}"), transient=False)
            self.bars.start()
            self.grid = self.bars.add_task("grid", total=len(view.specs), eta="")
            self.rows = {w.index: self.bars.add_task(f"  {w.label}", total=None, eta="") for w in workers}

    def log(self, text: str) -> None:
        if self.bars is not None:
            self.bars.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self) -> dict[str, int]:
        counts, running = self.view.poll()
        total = len(self.view.specs)
        finished = sum(counts.get(s, 0) for s in self.view.final)
        fresh = finished - self.view.start_finished
        eta = ""
        if 0 < fresh and finished < total:
            eta = "ETA " + _eta((time.monotonic() - self.t0) / fresh * (total - finished))
        by_worker = {w.index: running.get(w.proc.pid) for w in self.workers}
        if self.bars is not None:
            self.bars.update(self.grid, completed=finished, eta=eta)
            for w in self.workers:
                spec = by_worker[w.index]
                state = (spec.describe if spec else "idle") if w.proc.poll() is None else "exited"
                self.bars.update(self.rows[w.index], description=f"  {w.label}: {state}")
            return counts
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in ("done", "todo"))
        states = []
        for w in self.workers:
            spec = by_worker[w.index]
            state = f"{spec.describe} ({spec.id})" if spec else "idle" if w.proc.poll() is None else "exited"
            states.append(f"{w.label}: {state}")
        line = f"[{finished}/{total}] finished" + (f" ({parts})" if parts else "") + "; " + "; ".join(states)
        if line != self.last:
            self.last = line
            self.log(line + (f"; {eta}" if eta else ""))
        return counts

    def close(self) -> None:
        if self.bars is not None:
            self.bars.stop()


def run_local(loaded: LoadedRecipe, registry: Registry, devices: list[str], passthrough: list[str],
              plain: bool = False, retry_diverged: bool = False, only: list[str] | None = None) -> int:
    """Train the grid (or the runs ``only``) with one worker process per device; the
    ``kdbench run`` exit status."""
    view = GridView(loaded, registry, retry_diverged, only)
    if not view.specs:
        print(f"kdbench: nothing to train; results in {loaded.output_dir}", file=sys.stderr)
        return 0
    plain = plain or bool(os.environ.get("CI")) or not sys.stderr.isatty()
    log_dir = loaded.output_dir / "logs"
    workers: list[Worker] = []
    got: list[int] = []
    watcher: Watcher | None = None

    def forward(signum, frame):
        got.append(signum)
        text = f"kdbench: got {signal.Signals(signum).name}: passing it on to the workers"
        if watcher is not None:
            watcher.log(text)
        else:
            print(text, file=sys.stderr, flush=True)
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signum)

    # All of the runs' stop signals (inside a Slurm allocation USR2 is submitit's warning),
    # before the first worker starts: a signal while the pool starts reaches the workers already
    # running, and no more start; it never kills the parent and leaves workers behind.
    old = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    died = []
    try:
        start_workers(loaded.path, devices, passthrough, log_dir, workers=workers, stopped=lambda: bool(got))
        watcher = Watcher(view, workers, plain)
        watcher.log(f"kdbench: {len(view.specs)} run(s) on {len(workers)} worker(s) "
                    f"({', '.join(w.device for w in workers)}); worker logs in {log_dir}")
        alive = set(range(len(workers)))
        while alive:
            time.sleep(POLL_S)
            watcher.update()
            for w in workers:
                if w.index in alive and w.proc.poll() is not None:
                    alive.discard(w.index)
                    rc = w.proc.returncode
                    if rc not in (0, 1) and not got:
                        died.append(w)
                    watcher.log(f"kdbench: worker {w.label} (pid {w.proc.pid}) exited with status "
                                f"{rc}" + ("" if rc in (0, 1) else f"; see {w.log}"))
        counts = watcher.update()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if watcher is not None:
            watcher.close()
    total = len(view.specs)
    print(f"kdbench: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
          f"{counts.get('diverged', 0)} diverged, "
          f"{total - sum(counts.get(s, 0) for s in FINAL)} not finished, of {total}; "
          f"results in {loaded.output_dir}", file=sys.stderr)
    if got:
        print("kdbench: stopped by a signal; run the same command again to resume", file=sys.stderr)
        return 128 + got[0]
    unfinished = total - sum(counts.get(s, 0) for s in view.final)
    if unfinished:
        print(f"kdbench: {unfinished} run(s) not finished ({len(died)} worker(s) died); run the "
              "same command again to resume them from their checkpoints", file=sys.stderr)
        return 1
    return 1 if counts.get("failed") else 0
