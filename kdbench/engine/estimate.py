"""Cost before running: device-hours of the runs a grid still has to do.

Two sources for the speed, both stated in the output:

* ``--calibrate N``: time N training steps (after one warm-up) of every distinct kind of run
  on the device in use — the real tasks, built as training builds them, on the real data; a
  student is timed with an untrained teacher of the same architecture (same cost);
* ``--throughput IMG_PER_S``: a figure the user measured (images per second of one training).

The estimate counts training steps (epochs × batches) and ignores evaluation and start-up.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from kdbench.engine.loop import make_optimizer, train_step
from kdbench.recipe import RunSpec, Schedule


@dataclass
class RunCost:
    spec: RunSpec
    steps: int
    images: int
    seconds: float


def cost_key(spec: RunSpec) -> str:
    """Runs with equal keys cost the same per step (same nets, methods and batch size)."""
    s = spec.spec
    if spec.kind == "teacher":
        key = {"model": s["model"], "objective": s["objective"], "batch": s["schedule"]["batch_size"]}
    else:
        key = {"model": s["model"], "methods": s["methods"], "batch": s["schedule"]["batch_size"],
               "teacher": spec.teacher.spec["model"] if spec.teacher else None}
        if "optimizer" in s:  # DOT's two backward passes cost more than one
            key["optimizer"] = s["optimizer"]
    return f"{spec.kind}:{json.dumps(key, sort_keys=True)}"


def _time_steps(runner, spec: RunSpec, steps: int) -> float:
    """Median seconds per training step of ``spec``'s task on the runner's device."""
    trainer = runner.trainer
    train, _ = trainer.data()
    if spec.kind == "teacher":
        task = trainer.teacher_task(spec)
    else:
        teacher = None
        if spec.teacher is not None:
            teacher = trainer.build_for(spec.teacher).eval().requires_grad_(False)
        task = trainer.student_task(spec, teacher)
    schedule = Schedule(**spec.spec["schedule"])
    params = [p for m in task.modules() for p in m.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(params, schedule, runner.device, getattr(task, "update_rule", None))
    generator = torch.Generator(device=runner.device).manual_seed(0)
    times = []
    batches = train.train_batches(schedule.batch_size, generator, task.views)
    for i in range(steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            batches = train.train_batches(schedule.batch_size, generator, task.views)
            batch = next(batches)
        t0 = time.perf_counter()
        train_step(task, batch, optimizer, runner.device, runner.recipe.precision)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        if i > 0:  # the first step pays for allocation and autotuning
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def estimate(runner, throughput: float | None = None, calibrate_steps: int = 0) -> list[RunCost]:
    plan = runner.plan()
    todo = plan["teachers_needed"] + [s for s, done in plan["students"] if not done]
    todo = [s for s in todo if "schedule" in s.spec]  # published teachers train nothing
    train, _ = runner.data()
    step_time: dict[str, float] = {}
    costs = []
    for spec in todo:
        sched = spec.spec["schedule"]
        steps = sched["epochs"] * train.num_batches(sched["batch_size"])
        images = sched["epochs"] * len(train)
        if calibrate_steps:
            key = cost_key(spec)
            if key not in step_time:
                step_time[key] = _time_steps(runner, spec, calibrate_steps)
            seconds = steps * step_time[key]
        else:
            seconds = images / throughput
        costs.append(RunCost(spec, steps, images, seconds))
    return costs


def format_estimate(costs: list[RunCost], source: str) -> str:
    teachers = sum(c.seconds for c in costs if c.spec.kind == "teacher")
    students = sum(c.seconds for c in costs if c.spec.kind == "student")
    def hours(seconds: float) -> str:
        return f"{seconds / 3600:.3g} device-hours ({seconds:.0f} s)"

    lines = [f"estimate ({source}; training steps only):",
             f"  teachers: {sum(c.spec.kind == 'teacher' for c in costs)} runs, {hours(teachers)}",
             f"  students: {sum(c.spec.kind == 'student' for c in costs)} runs, {hours(students)}",
             f"  total: {hours(teachers + students)}"]
    return "\n".join(lines)
