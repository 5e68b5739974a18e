"""The speed targets, measured directly: one CIFAR-100-sized epoch of WRN-40-2 -> WRN-16-2 KD at
batch 64, kdbench (eager and compiled) against the reference loop, in one run.

Targets (benchmarks/README.md, the project guide): one epoch of 50,000 images (100 classes,
32x32) of WRN-40-2 -> WRN-16-2 KD (0.1 CE + 0.9 KL, T = 4) at batch 64 in under 1.5 s on an H100,
and at least 5x the reference loop measured in the same run. Every row trains one full epoch of
``--n`` random uint8 images (default 50000; the last batch is the short one, 50000 % 64 = 16)
from the same initial weights with the same frozen, randomly initialised teacher:

* **reference**: ``step.ReferenceLoop``, RepDistiller's ``train_distill`` for KD: PIL
  ``DataLoader`` (``--workers``, default min(8, cores)), ``.cuda()`` per batch, fp32 (TF32
  convolutions on CUDA, PyTorch's default), contiguous nets and batches, ``loss.item()`` and
  top-1/top-5 every step, ``torch.optim.SGD``; one pass over its loader.
* **eager**: what a run does (``recipe.compile = false``): ``tasks.place_model`` (channels_last on
  CUDA), ``tasks.build_student_task`` (teacher cast once to bf16 after the sizing forward),
  ``DeviceData`` batches, ``loop.fit`` for one epoch (bf16 autocast, fused SGD on CUDA, metrics
  on the device, one host read per epoch).
* **compiled**: what a run does with ``recipe.compile = true``: ``place_model(compile=True)``,
  i.e. ``model.compile()`` (inductor, default mode) on both nets, teacher not cast (as
  ``RunTrainer`` does with compile), the same ``fit``.
* **reduce-overhead**: ``model.compile(mode="reduce-overhead")`` (inductor + CUDA graphs) on both
  nets, teacher not cast: NOT what the engine does; measured to see what CUDA graphs would give.

On the CPU (the stand-in of ``gpu_check.sh --device cpu``) inductor takes minutes to compile
here, so the compiled rows use ``--compile-backend`` (default there: ``aot_eager``, which runs
dynamo and AOT autograd, the graph breaks, guards and recompiles, without inductor's code
generation); the row's label says so. Every compiled row starts from ``torch._dynamo.reset()``.

Measurement per kdbench row: untimed warm-up first (``--warmup`` steps at the batch size, 3 at
the epoch's short last batch, 2 more at the batch size, and eval forwards at the evaluation's
batch shapes: cuDNN autotuning, allocations, compilation and CUDA-graph recording happen there;
its time is the "warm-up s" column), then ``fit`` for one epoch: **train s** from calling ``fit``
until it has read the epoch's metrics back (every step finished), **eval s** the evaluation on
``--n-test`` images that follows. The reference row warms up with ``--warmup`` steps and one at
the short batch shape, then times one pass over its loader. **x reference** = reference train s
/ row train s. **achieved TFLOP/s**: ``FlopCounterMode`` (matmul + convolution FLOPs only) of one
eager step at the batch size, per sample, times the epoch's samples, over train s. Graphs that
dynamo compiled during the timed epoch (should be 0) and dynamo's warnings (e.g. a recompile
limit hit, after which it runs eager) are in the log and the notes column, and so are the graphs
inductor compiled without CUDA graphs in the reduce-overhead row (``cudagraph_skips``: such a
row is not what it says; ``TORCH_LOGS=cudagraphs`` tells why).

``--json`` writes the rows (rewritten after each row, so a stage killed later keeps them); the
table goes to stdout at the end.

Quick CPU run (~1 minute):
    python benchmarks/epoch.py --device cpu --threads 1 --width-mult 0.125 --n 272 --n-test 128
Full run (one GPU):
    python benchmarks/epoch.py --device cuda --rows reference,eager,compiled,reduce-overhead
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time

import _common as C
import torch
from _tables import TARGET_EPOCH_S, TARGET_RATIO, epoch_table

ROWS = ("reference", "eager", "compiled", "reduce-overhead")


class TimedTask:
    """Delegates to the engine's StudentTask; ``fit`` calls ``eval_model()`` right after it read
    the epoch's metrics back (i.e. after every training step finished): the end of training."""

    def __init__(self, task):
        self.task = task
        self.train_end = None

    def __getattr__(self, name):
        return getattr(self.task, name)

    def eval_model(self):
        self.train_end = time.perf_counter()
        return self.task.eval_model()


class DynamoLog(logging.Handler):
    """Collects dynamo's warnings (recompile limits, fallbacks to eager)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage().splitlines()[0][:200])


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cudagraph_skips() -> int:
    """Graphs inductor compiled without CUDA graphs though asked to (mode reduce-overhead)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def count_step_flops(task, batch, device, precision) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from kdbench.engine.loop import autocast

    for m in task.modules():
        m.train()
    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            terms, _ = task.loss_terms(batch)
            loss = sum(terms.values())
        loss.backward()
    for m in task.modules():
        m.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def epoch_sizes(n: int, bs: int) -> list[int]:
    """Batch sizes of one epoch as ``DeviceData.train_batches`` yields them."""
    return [min(bs, n - s) for s in range(0, n, bs) if min(bs, n - s) >= 2]


def warm_up(task, train, test, device, bs, precision, steps, eval_bs):
    """Untimed steps (own optimizer) at every batch shape of the epoch, and eval forwards."""
    from kdbench.engine.loop import autocast, make_optimizer, train_step
    from kdbench.engine.reproducibility import data_generator

    opt, _ = make_optimizer(C.trained_params(task), C.schedule(bs), device)
    gen = data_generator(1, device)
    tail = len(train) % bs
    sizes = [bs] * steps + ([tail] * 3 if tail >= 2 else []) + [bs] * 2
    for size in sizes:
        train_step(task, next(train.train_batches(size, gen, task.views)), opt, device, precision)
    model = task.eval_model()
    model.eval()
    with torch.no_grad():
        for size in sorted({min(eval_bs, len(test)), len(test) % eval_bs} - {0}, reverse=True):
            for _ in range(3):  # CUDA graphs: warm-up run, recording, replay
                with autocast(device, precision):
                    model(test.normalize(test.images[:size]))
    model.train()
    for m in task.modules():
        m.zero_grad(set_to_none=True)
    C.sync(device)


def step_flops_per_sample(device, data, states, args) -> float:
    """Matmul + convolution FLOPs of one eager KD step at the batch size, per sample."""
    from kdbench.engine.reproducibility import data_generator

    t_name, s_name = C.pair_models(args.pair)
    train = C.device_data(C.image_data(data.images[:2 * args.batch_size],
                                       data.labels[:2 * args.batch_size]), device)
    nets = []
    for name, state in zip((t_name, s_name), states):
        nets.append(C.build_net(name, args.width_mult, 100, device))
        nets[-1].load_state_dict(state)
    task = C.student_task(nets[1], C.freeze(nets[0]), train, device, precision=args.precision)
    batch = next(train.train_batches(args.batch_size, data_generator(2, device), task.views))
    return count_step_flops(task, batch, device, args.precision) / batch.x.shape[0]


def kdbench_row(row, device, data, test_data, states, args) -> dict:
    from kdbench.engine.loop import fit
    from kdbench.engine.reproducibility import data_generator, seed_everything

    t_name, s_name = C.pair_models(args.pair)
    seed_everything(0, deterministic=False)  # as the runner: cudnn.benchmark on CUDA
    compiled = row != "eager"
    if compiled:
        torch._dynamo.reset()
    train = C.device_data(data, device)
    test = C.device_data(test_data, device)
    nets = []
    for name, state in zip((t_name, s_name), states):
        if row == "compiled" and args.compile_backend == "inductor":
            net = C.build_net(name, args.width_mult, 100, device, compile=True)  # the engine's call
        else:
            net = C.build_net(name, args.width_mult, 100, device)
            if row == "reduce-overhead" and args.compile_backend == "inductor":
                net.compile(mode="reduce-overhead")
            elif compiled:
                net.compile(backend=args.compile_backend)
        net.load_state_dict(state)
        nets.append(net)
    teacher, student = C.freeze(nets[0]), nets[1]
    task = C.student_task(student, teacher, train, device, precision=args.precision,
                          cast_teacher=not compiled)
    graphs0, skips0 = dynamo_graphs(), cudagraph_skips()
    C.sync(device)
    t0 = time.perf_counter()
    warm_up(task, train, test, device, args.batch_size, args.precision, args.warmup,
            args.eval_batch_size)
    warm_s = time.perf_counter() - t0
    graphs1 = dynamo_graphs()
    timed = TimedTask(task)
    C.sync(device)
    t0 = time.perf_counter()
    result = fit(timed, C.schedule(args.batch_size), train, test, device, args.precision,
                 data_generator(0, device), C.NoProgress(), args.eval_batch_size)
    t_end = time.perf_counter()
    graphs2 = dynamo_graphs()
    rec = result.epochs[0]
    out = {"row": row, "train_s": timed.train_end - t0, "eval_s": t_end - timed.train_end,
           "warmup_s": warm_s, "samples": sum(epoch_sizes(len(train), args.batch_size)),
           "steps": train.num_batches(args.batch_size), "loss": rec["train_loss"],
           "teacher_cast_once": bool(task.teacher_cast_once),
           "graphs_warmup": graphs1 - graphs0, "graphs_timed": graphs2 - graphs1,
           "cudagraph_skips": cudagraph_skips() - skips0,
           "layout": f"{C.net_layout(student)} nets, {C.batch_layout(train)} batches",
           "precision": C.resolve_precision(device, args.precision)}
    del task, timed, teacher, student, nets, train, test
    return out


def reference_row(device, images, labels, states, args) -> dict:
    from step import ReferenceLoop

    from kdbench.engine.reproducibility import seed_everything

    t_name, s_name = C.pair_models(args.pair)
    seed_everything(0, deterministic=False)
    teacher = C.build_net(t_name, args.width_mult, 100, device, "contiguous")
    teacher.load_state_dict(states[0])
    student = C.build_net(s_name, args.width_mult, 100, device, "contiguous")
    student.load_state_dict(states[1])
    loop = ReferenceLoop(C.freeze(teacher), student, images, labels, device, args.batch_size,
                         args.workers)
    C.sync(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loop.step()
    tail = len(labels) % args.batch_size
    if tail >= 1:  # the short last batch's shape (the reference keeps a batch of 1 too)
        x, y = next(loop.batches)
        loop.step_on(x[:tail], y[:tail])
    C.sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = loop.epoch()
    C.sync(device)
    train_s = time.perf_counter() - t0
    out = {"row": "reference", "train_s": train_s, "eval_s": None, "warmup_s": warm_s,
           "samples": len(labels), "steps": steps, "loss": loop.loss_meter / max(1, loop.count),
           "teacher_cast_once": False, "graphs_warmup": 0,
           "graphs_timed": 0, "layout": "contiguous nets, contiguous batches", "precision": "fp32"}
    del loop
    return out


def row_label(row: str, args) -> str:
    if row == "reference":
        return f"reference (PIL DataLoader, {args.workers} workers, fp32)"
    if row == "eager":
        return "kdbench eager (the engine)"
    if args.compile_backend != "inductor":
        return f"kdbench compiled, backend {args.compile_backend} (stand-in for {row})"
    if row == "compiled":
        return "kdbench compiled: model.compile() (the engine's compile = true)"
    return 'kdbench compiled: mode "reduce-overhead" (CUDA graphs; not the engine\'s)'


def is_target_run(args, device) -> bool:
    return device.type == "cuda" and args.width_mult == 1.0 and args.n == 50000 \
        and args.batch_size == 64 and args.pair == "wrn_40_2->wrn_16_2"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="auto = cuda when present, else cpu")
    ap.add_argument("--pair", default="wrn_40_2->wrn_16_2", help="teacher->student")
    ap.add_argument("--rows", default="reference,eager",
                    help=f"comma-separated, in order, of: {', '.join(ROWS)}")
    ap.add_argument("--n", type=int, default=50000, help="training images (CIFAR-100: 50000)")
    ap.add_argument("--n-test", type=int, default=10000, help="test images (CIFAR-100: 10000)")
    ap.add_argument("--batch-size", type=int, default=64, help="the target's batch: 64")
    ap.add_argument("--eval-batch-size", type=int, default=512, help="recipe default: 512")
    ap.add_argument("--width-mult", type=float, default=1.0,
                    help="width multiplier of both nets (1.0 = published; <1 for quick CPU runs)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="kdbench rows, as a recipe's: auto = bf16 autocast on CUDA, fp32 on the CPU")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps at the batch size")
    ap.add_argument("--workers", type=int, default=None,
                    help="reference DataLoader workers (default min(8, cores); RepDistiller: 8)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compiled rows (default: inductor on CUDA, "
                    "aot_eager on the CPU); not inductor: both compiled rows use it, labelled")
    ap.add_argument("--json", default=None, help="also write the rows here (after every row)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import os

    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}: use {', '.join(ROWS)}")
    C.parse_pairs(args.pair)
    device = torch.device(C.resolve_devices(args.device)[0])
    if args.compile_backend is None:
        args.compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    if device.type != "cuda" and args.compile_backend == "inductor" and "reduce-overhead" in rows:
        C.log("reduce-overhead: CUDA graphs need CUDA; on the CPU the mode only compiles")
    dynamo_log = DynamoLog()
    logging.getLogger("torch._dynamo").addHandler(dynamo_log)

    images, labels = C.synthetic_images(args.n, seed=0)
    data = C.image_data(images, labels)
    test_data = C.image_data(*C.synthetic_images(args.n_test, seed=1))
    t_name, s_name = C.pair_models(args.pair)
    torch.manual_seed(0)
    states = [C.build_net(n, args.width_mult, 100, "cpu").state_dict() for n in (t_name, s_name)]

    meta = {"pair": args.pair, "batch_size": args.batch_size, "n": args.n, "n_test": args.n_test,
            "width_mult": args.width_mult, "device": C.device_label(device),
            "machine": C.machine(), "compile_backend": args.compile_backend,
            "target_run": is_target_run(args, device), "target_epoch_s": TARGET_EPOCH_S,
            "target_ratio": TARGET_RATIO, "workers": args.workers}
    results = []
    try:
        meta["flops_per_sample"] = step_flops_per_sample(device, data, states, args)
    except Exception as exc:  # only the TFLOP/s column needs it
        C.log(f"FLOP count failed: {type(exc).__name__}: {exc}")

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": results}, f, indent=1)

    for row in rows:
        C.log(f"{args.pair} {row}: ...")
        dynamo_log.messages.clear()
        try:
            if row == "reference":
                r = reference_row(device, images, labels, states, args)
            else:
                r = kdbench_row(row, device, data, test_data, states, args)
        except Exception as exc:  # one row's failure must not lose the others
            import traceback

            traceback.print_exc()
            r = {"row": row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                 if str(exc) else type(exc).__name__}
        r["label"] = row_label(row, args)
        r["dynamo_warnings"] = list(dict.fromkeys(dynamo_log.messages))[:3]
        for w in r["dynamo_warnings"]:
            C.log(f"  dynamo warning: {w}")
        if "error" not in r:
            C.log(f"{args.pair} {row}: train {r['train_s']:.2f} s over {r['steps']} steps, "
                  f"eval {r['eval_s'] or 0:.2f} s, warm-up {r['warmup_s']:.1f} s, loss "
                  f"{r['loss']:.3f}, graphs compiled in warm-up {r['graphs_warmup']}, in the "
                  f"timed epoch {r['graphs_timed']}")
        results.append(r)
        save()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n*One epoch of {args.pair} KD (0.1 CE + 0.9 KL, T=4) at batch {args.batch_size}: "
          f"{args.n} random 3x32x32 images, 100 classes, width x{args.width_mult}, eval on "
          f"{args.n_test}; each row from the same weights, after its warm-up. kdbench rows: "
          f"loop.fit, precision {args.precision}. {C.device_label(device)}; {C.machine()}.*\n")
    print(epoch_table(results, meta))
    if not is_target_run(args, device):
        print("\nNot the target's setting (CUDA, width 1, 50000 images, batch 64, WRN-40-2 -> "
              "WRN-16-2): the target column does not apply.")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
