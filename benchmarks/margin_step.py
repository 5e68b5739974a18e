"""Cost of one margin-teacher step with the pipeline's second view queued (what the engine does
since issue 15) against the same step with the second view also forwarded (what it did before),
and a CE teacher's step, measured in one run.

* **ce** — the CE teacher: one forward of view 0.
* **margin, second view queued** — ``margin_intra`` in pipeline mode as a run builds it
  (``tasks.build_teacher_task``): the engine forwards view 0 only (the objective's
  ``forward_views`` is empty); the second view's images go into the per-class queue; flushed
  groups are re-encoded (BatchNorm on running statistics).
* **margin, second view forwarded** — the same task with ``task.forward_views = ("second",)``:
  the engine also runs the teacher on the second view every step and throws the output away,
  exactly the step before issue 15 (the re-encoding is the same in both; its BatchNorm mode does
  not change the cost).

Two gates: ``delta = -1`` (every sample passes: the pipeline flushes as often as it can, the
worst case, as late in training) and ``delta = 0.5`` (the default; a random-weight teacher passes
no sample, so nothing flushes: the forwards alone, as early in training). Everything is built by
the engine (``build_model`` + ``place_model``, ``DeviceData`` with the registry's views,
``make_optimizer``, ``train_step``); the rows are timed round robin, one step each per round, so
that load changes on a shared machine hit every row alike; median ms per step over ``--steps``
rounds after ``--warmup``; ratio to "second view forwarded" of the same gate.

Measured on the shared 2-core CPU machine (load 6-10; VGG13 ×0.5 as recipes/fashion_mnist_cpu.toml,
batch 64, 10 classes, one thread, 8 warm-up and 8 timed rounds, 8 minutes): CE 3262 ms;
margin δ = -1 (every sample passes, 58 flushed groups): 9566 ms forwarded, 8712 queued (× 0.91);
margin δ = 0.5 (nothing passes): 4336 ms forwarded, 3173 queued (× 0.73, = the CE step).
(Measured at commit 8feff2c, when the re-encoding still used the running statistics; since
then each BatchNorm layer also saves view 0's mean and variance every step, a small extra.)
    python benchmarks/margin_step.py --device cpu --threads 1 --width-mult 0.5 --batch 64 --steps 8 --warmup 8
GPU:
    python benchmarks/margin_step.py --device cuda --teacher wrn_40_2 --batch 256 --steps 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as C
import torch


def build_rows(args, device, train):
    rows = []
    for delta in args.deltas:
        for label, forwarded in (("second view forwarded (before)", True), ("second view queued", False)):
            torch.manual_seed(0)
            model = C.build_net(args.teacher, args.width_mult, args.num_classes, device)
            task = C.teacher_task(model, ("margin_intra", {"delta": delta, "pipeline_size": args.pipeline_size}),
                                  train, device)
            if forwarded:
                task.forward_views = ("second",)
            rows.append((f"margin δ={delta:g}, {label}", delta, task))
    torch.manual_seed(0)
    model = C.build_net(args.teacher, args.width_mult, args.num_classes, device)
    rows.insert(0, ("ce", None, C.teacher_task(model, ("ce", {}), train, device)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--teacher", default="vgg13")
    p.add_argument("--width-mult", type=float, default=0.5)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--n", type=int, default=2048, help="random training images (32x32)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pipeline-size", type=int, default=16)
    p.add_argument("--deltas", type=float, nargs="+", default=[-1.0, 0.5])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from kdbench.engine.loop import make_optimizer, train_step
    from kdbench.recipe import Schedule

    device = torch.device(args.device)
    images, labels = C.synthetic_images(args.n, args.num_classes)
    train = C.device_data(C.image_data(images, labels, args.num_classes), device)
    rows = build_rows(args, device, train)
    sched = Schedule(epochs=1, batch_size=args.batch, lr=0.05, milestones=[])
    state = []
    for label, _, task in rows:
        opt, _ = make_optimizer(C.trained_params(task), sched, device)
        gen = torch.Generator(device=device).manual_seed(1)  # the same batches for every row
        state.append({"label": label, "task": task, "opt": opt, "gen": gen, "times": [],
                      "batches": iter(train.train_batches(args.batch, gen, task.views, 0, 1, 0))})

    def next_batch(s):
        try:
            return next(s["batches"])
        except StopIteration:
            s["batches"] = iter(train.train_batches(args.batch, s["gen"], s["task"].views, 0, 1, 0))
            return next(s["batches"])

    for r in range(args.warmup + args.steps):
        order = state[r % len(state):] + state[:r % len(state)]
        for s in order:
            batch = next_batch(s)
            C.sync(device)
            t0 = time.perf_counter()
            train_step(s["task"], batch, s["opt"], device, "fp32")
            C.sync(device)
            if r >= args.warmup:
                s["times"].append(1000 * (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.warmup + args.steps}", file=sys.stderr)
    med = {s["label"]: statistics.median(s["times"]) for s in state}
    print(f"Margin teacher step, {args.teacher} ×{args.width_mult:g}, batch {args.batch}, "
          f"{args.num_classes} classes, P = {args.pipeline_size}, {C.device_label(device)}, "
          f"median of {args.steps} rounds ({C.machine()})\n")
    print("| step | ms/step | × before (same δ) | pass rate / groups flushed (all steps) |")
    print("|---|---:|---:|---|")
    for s in state:
        label = s["label"]
        before = next((med[k] for k in med if k.startswith(label.split(",")[0] + ",") and "forwarded" in k), None)
        ratio = f"{med[label] / before:.2f}" if before and label.startswith("margin") else ""
        stats = s["task"].epoch_stats()
        extra = (f"{stats['gate_pass_frac']:.2f} / {stats['flushes']:.0f}" if "gate_pass_frac" in stats else "")
        print(f"| {label} | {med[label]:.1f} | {ratio} | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
