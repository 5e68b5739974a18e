"""Launchers: how the runs of a grid are spread over processes and machines.

* ``inline`` (default): this process trains the whole grid, one run after the other
  (:class:`kdbench.engine.runner.GridRunner`).
* ``local``: a pool of worker processes on this machine, one per device
  (:mod:`kdbench.launchers.local`).
* ``slurm``: Slurm job arrays through submitit (:mod:`kdbench.launchers.slurm`).

Every launcher ends up running ``GridRunner`` over (part of) the same grid, so they all write the
same records; the per-run locks keep two processes from training one run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

LAUNCHER_ENV = "KDBENCH_LAUNCHER"  # set for the processes a launcher starts (for the record)


@dataclass(frozen=True)
class Launcher:
    help: str
    run: Callable[..., int]  # (args, loaded, registry) -> the ``kdbench run`` exit status


def _inline(args, loaded, registry) -> int:
    from kdbench.launchers.inline import run_inline

    return run_inline(args, loaded, registry)


def _local(args, loaded, registry) -> int:
    from kdbench.launchers.local import parse_devices, run_local

    only = [a for run_id in args.run_id or [] for a in ("--run-id", run_id)]
    return run_local(loaded, registry, parse_devices(args.devices, args.workers),
                     passthrough_args(args) + only, plain=args.plain,
                     retry_diverged=args.retry_diverged, only=args.run_id)


def _slurm(args, loaded, registry) -> int:
    from kdbench.launchers.slurm import run_slurm

    return run_slurm(loaded, registry, args)


# The one list of launchers: ``kdbench run --launcher``'s choices and the recipe's ``launcher``.
LAUNCHERS: dict[str, Launcher] = {
    "inline": Launcher("this process trains the grid, one run after the other (default)", _inline),
    "local": Launcher("a worker process per device on this machine", _local),
    "slurm": Launcher("Slurm job arrays, one job per run, through submitit", _slurm),
}


def passthrough_args(args) -> list[str]:
    """The ``kdbench run`` options every worker gets as well."""
    out = []
    if args.output:
        out += ["--output", str(args.output)]
    if args.fail_fast:
        out.append("--fail-fast")
    if args.checkpoint_every is not None:
        out += ["--checkpoint-every", str(args.checkpoint_every)]
    if args.retry_diverged:
        out.append("--retry-diverged")
    return out


def launch(name: str, args, loaded, registry) -> int:
    """Run the grid with launcher ``name``; the ``kdbench run`` exit status."""
    return LAUNCHERS[name].run(args, loaded, registry)
