"""Experiment trackers: plugins that receive each run's start, its per-epoch metrics and its end
(TensorBoard, Weights & Biases, MLflow, ... each one small plugin).

A plugin registers a factory through the ``kdbench_register_trackers`` hook::

    @hookimpl
    def kdbench_register_trackers(register):
        register("tensorboard", TensorBoardTracker, params=TensorBoardParams, help="...")

``factory(params, output_dir) -> Tracker`` is built once per process, when its first run starts
(``output_dir``: the recipe's output folder). A tracker is switched on per command,
``kdbench run RECIPE --tracker NAME[:key=value,...]`` (repeatable; checked before anything
runs), which also sets ``KDBENCH_TRACKERS`` so that the processes a launcher starts (local
workers, Slurm jobs) track their runs too. It is off by default, and run specs, ids and weights
never depend on it.

Only the process that writes the records calls trackers (rank 0 under torchrun), once per
epoch, with the metrics :func:`kdbench.engine.loop.fit` has already read to the host (its
``on_epoch``), never from inside the training step. A tracker that raises is reported in one
line and switched off for the rest of the process; the training goes on.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdbench.api import UserError

TRACKERS_ENV = "KDBENCH_TRACKERS"  # a JSON list of --tracker texts


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker is told about a run."""

    id: str
    kind: str  # "teacher" or "student"
    describe: str  # one line: pair, row or objective, seed
    spec: dict  # the run spec (the run id's contents)
    meta: dict  # labels: group, dataset, pair, method set, objective
    run_dir: Path  # the run's folder (record.json, checkpoints)


class Tracker:
    """Base class of a tracker; override what you need. ``status`` at the end is one of done,
    diverged, interrupted, failed; ``result`` holds the record's ``final`` and ``best`` (done
    runs) or is empty."""

    def start(self, run: TrackedRun) -> None:
        pass

    def epoch(self, run: TrackedRun, metrics: dict[str, float]) -> None:
        pass

    def end(self, run: TrackedRun, status: str, result: dict) -> None:
        pass


def parse_option(text: str) -> tuple[str, dict[str, str]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, {key: value})."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--tracker {text!r}: {item!r} is not key=value "
                            "(write --tracker NAME or --tracker NAME:key=value,key=value)")
        params[key.strip()] = value.strip()
    return name.strip(), params


def enable(registry, options: list[str]) -> None:
    """Check each ``--tracker`` option against the registered trackers (a UserError naming the
    option otherwise) and switch them on for this process and the ones it starts."""
    for text in options:
        _resolve(registry, text)
    os.environ[TRACKERS_ENV] = json.dumps(list(options))


def _resolve(registry, text: str):
    from pydantic import ValidationError

    name, raw = parse_option(text)
    try:
        plugin = registry.find("tracker", name)
    except UserError as exc:
        broken = "; ".join(f"{b.entry_point} ({b.error})" for b in registry.broken)
        raise UserError(f"--tracker {text!r}: {exc}" + (f"; plugins that failed to load: {broken}"
                                                        if broken else "")) from None
    try:
        params = plugin.params.model_validate(raw)
    except ValidationError as exc:
        what = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"--tracker {text!r}: {what} (see `kdbench list` for its parameters)") from None
    return plugin, params


def _rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass
class _Session:
    """One run's calls; ``on_epoch`` is None when no tracker listens (fit then calls nothing)."""

    trackers: "Trackers"
    run: TrackedRun | None
    status: str = "failed"
    result: dict = field(default_factory=dict)

    @property
    def on_epoch(self) -> Callable[[dict], None] | None:
        return self._epoch if self.run is not None else None

    def _epoch(self, record: dict) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        self.trackers._call("epoch", self.run, metrics)

    def done(self, record: dict) -> None:
        self.status = "done"
        self.result = {k: record[k] for k in ("final", "best") if isinstance(record.get(k), dict)}


class Trackers:
    """The trackers of this process (from ``KDBENCH_TRACKERS``), built on first use."""

    def __init__(self, registry, output_dir: Path, log: Callable[[str], None],
                 options: list[str] | None = None):
        self.registry, self.output_dir, self.log = registry, Path(output_dir), log
        self.options = _from_env() if options is None else options
        self.live: list[tuple[str, Tracker]] | None = None  # built at the first run

    @contextmanager
    def run(self, spec, run_dir: Path):
        """Around one run's training: start, the session (its ``on_epoch`` goes to fit, its
        ``done(record)`` marks success), and the end with the run's status."""
        if not self.options or not _rank_zero():
            yield _Session(self, None)
            return
        from kdbench.engine.loop import Diverged, Interrupted

        run = TrackedRun(spec.id, spec.kind, spec.describe, spec.spec, spec.meta_dict(), Path(run_dir))
        session = _Session(self, run)
        self._call("start", run)
        try:
            yield session
        except Diverged:
            session.status = "diverged"
            raise
        except Interrupted:
            session.status = "interrupted"
            raise
        finally:
            self._call("end", run, session.status, session.result)

    def _build(self) -> list[tuple[str, Tracker]]:
        live = []
        for text in self.options:
            try:
                plugin, params = _resolve(self.registry, text)
                live.append((plugin.name, plugin.factory(params, self.output_dir)))
            except Exception as exc:  # a broken tracker never stops the training
                self._report(text, "could not be started", exc)
        return live

    def _call(self, method: str, *args) -> None:
        if self.live is None:
            self.live = self._build()
        for entry in list(self.live):
            name, tracker = entry
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:
                self._report(name, f"failed in {method}()", exc)
                self.live.remove(entry)

    def _report(self, name: str, what: str, exc: BaseException) -> None:
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        self.log(f"  warning: tracker {name} {what} and is switched off for this process "
                 f"(training goes on): {text}")


def _from_env() -> list[str]:
    text = os.environ.get(TRACKERS_ENV, "").strip()
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        value = text.split(";")  # set by hand: NAME[:k=v,...];NAME...
    return [str(v) for v in (value if isinstance(value, list) else [value]) if str(v).strip()]
