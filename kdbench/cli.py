"""Command line: argument parsing only; the work happens in the modules it calls.

Every error the user can fix (a :class:`kdbench.api.UserError`) prints one clear message and
exits with status 2, without a traceback. ``kdbench run`` exits 0 when every run finished (done,
or diverged: a result), 1 if a run failed, and 128 + N when signal N (SIGTERM, SIGINT, SIGUSR1,
SIGUSR2) stopped it after writing a checkpoint; the same command again resumes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    # Everything heavy (torch comes with kdbench.api) is imported inside: a Ctrl-C in the
    # first second, while it loads, is held until the imports are done, then the same one line
    # as later (kdbench.engine.signals: raised inside torch's import it can abort Python).
    from kdbench.engine.signals import catch_early_interrupts, raise_if_interrupted, restore_interrupts

    previous = catch_early_interrupts()
    try:
        from kdbench.api import UserError

        parser = _parser()
        raise_if_interrupted()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USAGE
        try:
            return args.func(args)
        except UserError as exc:
            print(f"kdbench: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    except KeyboardInterrupt:
        print("kdbench: interrupted", file=sys.stderr)
        return 130
    finally:
        restore_interrupts(previous)


def _parser() -> argparse.ArgumentParser:
    from kdbench.launchers import LAUNCHERS

    p = argparse.ArgumentParser(prog="kdbench", description="Knowledge-distillation benchmark.")
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="train the teachers and students of a recipe")
    run.add_argument("recipe", type=Path)
    run.add_argument("--dry-run", action="store_true", help="print the grid, train nothing")
    run.add_argument("--calibrate", type=int, metavar="STEPS", default=0,
                     help="with --dry-run: time STEPS training steps of each kind of run on the "
                          "device and estimate the device-hours of the grid")
    run.add_argument("--throughput", type=float, metavar="IMG_PER_S",
                     help="with --dry-run: estimate device-hours from this training speed")
    run.add_argument("--threads", type=int, metavar="N",
                     help="CPU threads for torch (default: torch's; 1 is fastest on a busy machine)")
    run.add_argument("--device", help="override the recipe's device (cpu, cuda, cuda:N, auto)")
    run.add_argument("--output", type=Path, help="override the recipe's output folder")
    run.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help="also checkpoint every N steps (default: the recipe's "
                          "checkpoint_every_steps; always at the end of every epoch)")
    run.add_argument("--retry-diverged", action="store_true",
                     help="train runs recorded as diverged again (default: keep them as results)")
    run.add_argument("--plain", action="store_true", help="plain progress lines, no bars")
    run.add_argument("--launcher", choices=list(LAUNCHERS),
                     help="; ".join(f"{name}: {launcher.help}" for name, launcher in LAUNCHERS.items())
                     + " (default: the recipe's launcher, inline)")
    run.add_argument("--devices", metavar="D1,D2,...",
                     help="local launcher: one worker per device (cuda:0,cuda:1 or cpu,cpu)")
    run.add_argument("--workers", type=int, metavar="N", help="local launcher: N CPU workers")
    run.add_argument("--max-parallel", type=int, metavar="N",
                     help="slurm launcher: at most N jobs of an array at once")
    run.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                     help="slurm launcher: a submitit executor parameter (e.g. slurm_partition=gpu, "
                          "timeout_min=240, gpus_per_node=1); repeatable")
    run.add_argument("--tracker", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                     help="also send every run's per-epoch metrics to this experiment tracker "
                          "(e.g. tensorboard, tensorboard:log_dir=tb; `kdbench list` shows them); "
                          "repeatable; the runs and their ids do not change")
    run.add_argument("--run-id", action="append", metavar="ID",
                     help="train only this run of the grid (a t-/s- id from --dry-run); repeatable")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a recipe without running it")
    val.add_argument("recipe", type=Path)
    val.set_defaults(func=cmd_validate)

    lst = sub.add_parser("list", help="every plugin found, by kind")
    lst.set_defaults(func=cmd_list)

    lb = sub.add_parser("leaderboard", help="markdown and CSV tables from the runs of a folder")
    lb.add_argument("runs_dir", type=Path)
    lb.add_argument("-o", "--output", type=Path, default=Path("leaderboard"))
    lb.add_argument("--metric", choices=["final", "best"],
                    help="which epoch to report (default: final)")
    lb.add_argument("--literature", action="append", metavar="SOURCE",
                    help="also show this source's published numbers (CRD, DKD, DIST, LS, DOT), "
                         "whatever the records' recipe named; repeatable")
    lb.add_argument("--screenshot", action="store_true",
                    help="also save OUT/index.png, the page as headless Chromium draws it at "
                         "1366 px wide (needs chromium, chromium-driver and "
                         "pip install 'kdbench[screenshot]')")
    lb.set_defaults(func=cmd_leaderboard)
    return p


def _load(path: Path, check_device: bool = True):
    from kdbench.recipe import load_recipe
    from kdbench.registry import load_registry

    registry = load_registry()
    return registry, load_recipe(path, registry, check_device=check_device)


def cmd_validate(args) -> int:
    from kdbench.recipe import expand

    registry, loaded = _load(args.recipe)
    teachers, students = expand(loaded, registry)
    print(f"{args.recipe}: ok ({len(teachers)} teacher runs, {len(students)} student runs)")
    return 0


def cmd_run(args) -> int:
    from kdbench.api import UserError

    if args.threads is not None:
        if args.threads <= 0:
            raise UserError(f"--threads must be a positive number, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if (args.calibrate or args.throughput) and not args.dry_run:
        raise UserError("--calibrate and --throughput go with --dry-run")
    if args.throughput is not None and args.throughput <= 0:
        raise UserError(f"--throughput must be positive images/s, got {args.throughput}")
    if args.checkpoint_every is not None and args.checkpoint_every <= 0:
        raise UserError(f"--checkpoint-every must be a positive number of steps, got {args.checkpoint_every}")
    registry, loaded = _load(args.recipe, check_device=args.device is None)
    if args.tracker:
        from kdbench.trackers import enable

        enable(registry, args.tracker)
    if args.output:
        loaded.recipe = loaded.recipe.model_copy(update={"output": str(args.output)})
    if args.dry_run:
        from kdbench.launchers.inline import make_runner
        from kdbench.progress import make_progress

        runner = make_runner(args, loaded, registry, make_progress(force_plain=args.plain))
        _print_plan(runner)
        if args.calibrate or args.throughput:
            from kdbench.engine.estimate import estimate, format_estimate

            costs = estimate(runner, throughput=args.throughput, calibrate_steps=args.calibrate)
            source = (f"calibrated: {args.calibrate} timed steps per kind of run on {runner.device}"
                      if args.calibrate else f"given throughput {args.throughput:g} images/s")
            print(format_estimate(costs, source))
        return 0
    launcher = args.launcher or loaded.recipe.launcher
    if launcher != "local" and (args.devices or args.workers):
        raise UserError("--devices and --workers go with --launcher local")
    _check_output_folders(args, loaded)
    from kdbench.launchers import launch

    return launch(launcher, args, loaded, registry)


def _check_output_folders(args, loaded) -> None:
    """Before anything trains: the output folder is writable, and the teacher folder is a folder
    or can be made (an existing shared cache may be read-only when its teachers are all
    trained; a teacher to train there finds a read-only one at its lock, in one line too)."""
    from kdbench.store import check_writable

    key = "--output" if args.output else f"output in {loaded.path}"
    check_writable(loaded.output_dir, "output folder", f"choose a writable folder with {key}")
    teachers = loaded.teacher_dir
    if not teachers.is_dir():
        key = f"teacher_cache in {loaded.path}" if loaded.recipe.teacher_cache else key
        check_writable(teachers, "teacher folder", f"choose a writable folder with {key}")


def _print_plan(runner) -> None:
    plan = runner.plan()
    teachers_done = sum(done for _, done in plan["teachers"])
    students_done = sum(done for _, done in plan["students"])
    print(f"recipe {runner.loaded.path} on {runner.device}; output {runner.loaded.output_dir}")
    print(f"teachers: {len(plan['teachers'])} in the grid, {teachers_done} cached, "
          f"{len(plan['teachers_needed'])} to train")
    for spec, done in plan["teachers"]:
        print(f"  {'cached' if done else 'train '} {spec.id}  {spec.describe}"
              + ("" if done else _why_train(runner.store, spec)))
    print(f"students: {len(plan['students'])} in the grid, {students_done} done, "
          f"{len(plan['students']) - students_done} to train")
    for spec, done in plan["students"]:
        print(f"  {'done  ' if done else 'train '} {spec.id}  {spec.describe}"
              + (f"  [teacher {spec.teacher.id}]" if spec.teacher else "")
              + ("" if done else _why_train(runner.store, spec)))


def _why_train(store, spec) -> str:
    """Why a run that has files is trained (again); "" for one never started."""
    bad = store.problems(spec.kind, spec.id)
    if bad:
        return f"  (again, its bad files set aside first: {bad[0][1]})"
    rec = store.record(spec.kind, spec.id) or {}
    status = rec.get("status")
    if status == "done":  # a teacher whose weights file is gone
        return f"  (again: {store.weights_problem(spec.id, rec)})"
    if status == "interrupted":
        from kdbench.engine.checkpoint import Checkpointer

        has_ckpt = Checkpointer(store.run_dir(spec.kind, spec.id)).has_checkpoints()
        return "  (interrupted: " + ("resumes from its last checkpoint)" if has_ckpt else
                                     "no checkpoint left, starts over)")
    return {"failed": "  (failed before: trained again)",
            "diverged": "  (diverged before: trained again, --retry-diverged)"}.get(status or "", "")


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kdbench.registry import KINDS, load_registry

    registry = load_registry()
    console = Console(width=140 if not sys.stdout.isatty() else None)
    for kind, (_, label) in KINDS.items():
        table = Table(title=label.capitalize(), title_justify="left", show_lines=False)
        for col in ("name", "parameters (default)", "provided by", "help"):
            table.add_column(col, overflow="fold")
        for plugin in registry.all(kind):
            params = ", ".join(f"{f.alias or name}={_default(f)}"
                               for name, f in plugin.params.model_fields.items())
            table.add_row(plugin.name, params or "—", f"{plugin.dist} {plugin.version}", plugin.help)
        console.print(table)
    if registry.broken:
        table = Table(title="Plugins that failed to load", title_justify="left")
        for col in ("entry point", "distribution", "error"):
            table.add_column(col, overflow="fold")
        for b in registry.broken:
            table.add_row(b.entry_point, b.dist, b.error)
        console.print(table)
    return 0


def _default(field) -> str:
    from pydantic_core import PydanticUndefined

    if field.default is PydanticUndefined and field.default_factory is None:
        return "(required)"
    return repr(field.default_factory() if field.default_factory else field.default)


def cmd_leaderboard(args) -> int:
    from kdbench.leaderboard import write_leaderboard

    if args.screenshot:  # what it needs is checked before the tables are written
        from kdbench.leaderboard.screenshot import screenshot_tools

        screenshot_tools()
    written = write_leaderboard(args.runs_dir, args.output, metric=args.metric,
                                literature_sources=args.literature)
    for path in written:
        print(f"wrote {path}")
    if args.screenshot:
        from kdbench.leaderboard.screenshot import save_screenshot

        print(f"wrote {save_screenshot(args.output / 'index.html', args.output / 'index.png')}")
    return 0
