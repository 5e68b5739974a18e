"""The inline launcher: this process trains the grid (under torchrun, each run across the
ranks), then prints the summary. Exit status: 0 all done, 1 a run failed, 128 + N when stopped
by signal N (the interrupted run saved a checkpoint)."""
from __future__ import annotations

import os
import signal
import sys


def make_runner(args, loaded, registry, progress):
    """The grid runner ``kdbench run`` uses: distributed under torchrun (WORLD_SIZE > 1)."""
    from kdbench.engine.runner import GridRunner

    runner_cls = GridRunner
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from kdbench.engine.distributed import DistributedGridRunner as runner_cls
    runner = runner_cls(loaded, registry, progress, device=args.device, fail_fast=args.fail_fast,
                        checkpoint_every=args.checkpoint_every, retry_diverged=args.retry_diverged)
    if args.run_id:
        runner.only = set(args.run_id)
    return runner


def run_inline(args, loaded, registry) -> int:
    from kdbench.progress import make_progress

    progress = make_progress(force_plain=args.plain)
    runner = make_runner(args, loaded, registry, progress)
    with progress:
        summary = runner.run()
    print(f"kdbench: {len(summary.done)} done, {len(summary.skipped)} skipped (already done), "
          f"{len(summary.failed)} failed, {len(summary.diverged)} diverged, "
          f"{len(summary.interrupted)} interrupted; results in {loaded.output_dir}", file=sys.stderr)
    for label, ids in (("failed", summary.failed), ("diverged", summary.diverged),
                       ("interrupted", summary.interrupted)):
        for run_id in ids:
            print(f"  {label}: {run_id}", file=sys.stderr)
    if summary.signal is not None:
        # Exit like a process killed by the signal would (128 + signal number).
        # (A signal that came during a run's last step lets that run finish: nothing interrupted.)
        saved = "the interrupted run saved a checkpoint: " if summary.interrupted else ""
        print(f"kdbench: stopped by {signal.Signals(summary.signal).name}; {saved}run the same "
              "command again to resume", file=sys.stderr)
        return 128 + summary.signal
    return 1 if summary.failed else 0
