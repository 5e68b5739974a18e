"""Cost of one training step of every student method, relative to plain KD.

For each device and teacher -> student pair, a fresh Python process builds the data and the
teacher once, then, for every method, the student and the method set ``ce + <method>`` exactly
as a run does (the registry, ``tasks.build_model`` + ``place_model``: channels_last on CUDA,
``tasks.build_student_task``: sizing forward, then the teacher cast once to the autocast dtype;
``DeviceData`` with the registry's views, ``make_optimizer``, ``train_step``; each method gets its
own copy of the frozen teacher and its own student, optimizer and batch stream, identical
across methods). Plain KD (``ce + kd``) is always measured in the same process and is the 1.00 of the
ratios; ``ce`` (the student alone, no teacher forward) is listed for reference. A method with
an initialisation stage (``StudentMethod.init_stage()``: AB, FT, FSP) gets a second row,
``<method> [init stage]``: one step of that stage as the engine runs it
(``kdbench.engine.tasks.InitTask``, SGD over the stage's modules, at lr 1e-9: the random-weight
teacher's large last-stage maps make FT's reconstruction diverge within steps, and SGD does the
same work at any lr). AB's and FSP's main-schedule
rows are ``ce`` alone plus their (idle) modules: they distil only in their stage. Each optimizer
plugin gets a row ``kd [optimizer <name>]``: ``ce + kd`` trained with it (DOT: two backward
passes per step, one forward), beside the plain ``kd`` row on the schedule's SGD.

What is measured
* **step ms**: median wall time of one step as ``kdbench.engine.loop.fit`` runs it: drawing the
  augmented batch (and any extra view a method asks for, e.g. MLLD's strong view), the
  student's and teacher's forwards, the loss terms, backward and the SGD step; on CUDA the
  device is synchronised before and after each step. After ``--warmup`` untimed rounds the
  methods are timed round robin, one step each per round (``--steps`` rounds, start rotated), so
  that load changes on a shared machine hit every method alike.
* **peak MiB**: memory the method's training needs above what existed before it was built (the
  data, the teacher and the methods built before it), in steady state: the method is built and
  runs two warm-up steps (the first creates gradients and momentum buffers; on CUDA the first
  steps also run cuDNN's autotuning, ``cudnn.benchmark``, whose trial workspaces are not what
  training needs), then the peak is taken over two more steps, one method at a time before the
  timing. It includes student and method parameters and buffers, gradients, momentum buffers,
  the batch and its views, the activations of both nets and the chosen algorithms' workspaces.
  - CUDA: after the warm-up, ``torch.cuda.reset_peak_memory_stats()``; then
    ``torch.cuda.max_memory_allocated()`` over the two steps minus
    ``torch.cuda.memory_allocated()`` before the method was built (tensor memory; allocator
    caching and the CUDA context excluded).
  - CPU: the peak of the net tensor bytes allocated through PyTorch's CPU allocator since the
    method was built, from the allocation/free events of ``torch.profiler``
    (``profile_memory=True``), taken over the same two steps after the warm-up -- the CPU
    analogue of the CUDA number. Not included: oneDNN-internal scratch memory,
    Python objects, allocator slack (the process's RSS is not what is reported).
* **extra params**: trainable parameters the method adds to the optimizer (connectors,
  regressors, embeddings, ...) besides the student's; for an init-stage row, those its stage
  trains besides the student's. **extra buffers**: elements of the
  method's persistent state (e.g. CRD's two memory banks, which scale with the training set).

The data set is ``--num-train`` random uint8 images (default 50000, CIFAR-100's training set
size, because CRD's memory banks and negative sampling scale with it) of 32x32, 100 classes.
``--width-mult`` scales every net's width (1.0 = the published nets; MobileNetV2 gets the
papers' width 0.5 times this factor).

Example (a quick CPU run):
    python benchmarks/methods.py --device cpu --width-mult 0.5 --batch 32 --steps 3
Reduced CPU mode (every method, seconds; what tests/test_benchmarks.py runs):
    python benchmarks/methods.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PAIRS = {  # label -> (teacher, student)
    "WRN-40-2 -> WRN-16-2": ("wrn_40_2", "wrn_16_2"),
    "ResNet50 -> MobileNetV2": ("resnet50", "mobilenetv2"),
}
ONLY_DISTS = "kdbench"
INIT_SUFFIX = "[init stage]"  # the row of a method's initialisation stage
OPTIMIZER_ROW = "kd [optimizer {}]"  # ce + kd trained with an optimizer plugin
QUICK = dict(device="cpu", steps=1, warmup=0, batch=4, width_mult=0.125, num_train=64,
             pairs="WRN-40-2 -> WRN-16-2", threads=1)  # --quick: every method, seconds on a CPU


# ------------------------------------------------------------------------------------- child
MEASURE = "kdbench_methods_measure"  # profiler range of the measured steps


def _cpu_peak_bytes(prof) -> int:
    """Peak, over the ``MEASURE`` range, of the net CPU tensor bytes allocated since ``prof``
    started (PyTorch's CPU allocator reports every allocation and free to the profiler; frees
    of older blocks are not seen)."""
    events = list(prof.profiler.kineto_results.events())
    marks = [e for e in events if e.name() == MEASURE]
    start = min(e.start_ns() for e in marks) if marks else 0
    mem = sorted((e for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"),
                 key=lambda e: e.start_ns())
    run = peak = 0
    for e in mem:
        run += e.nbytes()
        if e.start_ns() >= start:
            peak = max(peak, run)
    return peak


def run_child(cfg: dict) -> dict:
    """Every method of ``cfg["methods"]`` on one (device, pair), in this (fresh) process."""
    os.environ.setdefault("KDBENCH_ONLY_DISTS", ONLY_DISTS)
    import copy
    import warnings

    import _common as C
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from kdbench.api import ImageData
    from kdbench.engine.loop import make_optimizer, train_step
    from kdbench.engine.tasks import InitTask
    from kdbench.engine.reproducibility import data_generator, seed_everything
    from kdbench.recipe import Schedule

    warnings.filterwarnings("ignore")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    registry = C.registry()

    g = torch.Generator().manual_seed(0)
    n, size = cfg["num_train"], cfg["image_size"]
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, cfg["num_classes"], (n,), generator=g)
    train = C.device_data(ImageData(images, labels, cfg["num_classes"], C.CIFAR100_MEAN,
                                    C.CIFAR100_STD), device)
    del images, labels
    seed_everything(0, deterministic=False)
    teacher0 = C.frozen_teacher(cfg["teacher"], cfg["width_mult"], train.num_classes, device)

    def build(method_name, teacher, init_stage=False, optimizer=None):
        """A run's student task up to fit: student, methods (builders), optimizer (the schedule's
        SGD, or the optimizer plugin named ``optimizer``); with ``init_stage``, the method's
        initialisation stage as the engine runs it instead."""
        seed_everything(0, deterministic=False)
        student = C.build_net(cfg["student"], cfg["width_mult"], train.num_classes, device)
        methods = []
        for name in (["ce"] if method_name == "ce" else ["ce", method_name]):
            plugin = registry.find("student_method", name)
            methods.append((name, 0.1 if name == "ce" else plugin.factory.default_weight, {}))
        task = C.student_task(student, teacher, train, device, methods, precision=cfg["precision"],
                              optimizer=(optimizer, {}) if optimizer else None)
        if init_stage:
            # lr 0: the random teacher's large last-stage maps make FT's reconstruction diverge
            # within a few steps at its lr 0.01; SGD does the same work at any lr.
            task, lr = InitTask(task.student, task.teacher, task.methods[-1][2].init_stage()), 1e-9
        else:
            lr = 0.05
        opt, _ = make_optimizer(C.trained_params(task), Schedule(epochs=1, batch_size=cfg["batch"], lr=lr),
                                device, getattr(task, "update_rule", None))
        for m in task.modules():
            m.train()
        return task, opt

    def batches(views):
        gen = data_generator(0, device)  # every method sees the same batches
        while True:
            yield from train.train_batches(cfg["batch"], gen, views)

    def step(task, optimizer, it):
        """One step as kdbench.engine.loop.fit runs it, batch drawing included."""
        loss, terms, _ = train_step(task, next(it), optimizer, device, cfg["precision"])
        return loss.detach(), terms

    rows = []  # (row, method, init stage, optimizer plugin)
    for name in cfg["methods"]:
        rows.append((name, name, False, None))
        if C.has_init_stage(registry, name):
            rows.append((f"{name} {INIT_SUFFIX}", name, True, None))
    rows += [(OPTIMIZER_ROW.format(opt), "kd", False, opt) for opt in cfg.get("optimizers", [])]

    results, live = {}, {}
    # Phase 1, one method at a time: build it, two warm-up steps (gradients, momentum buffers,
    # cuDNN autotuning), then the peak over two more steps, above what was there before.
    for name, method_name, init_stage, optimizer in rows:
        teacher = None if name == "ce" else copy.deepcopy(teacher0)  # OFD moves its BN stats
        try:
            if cuda:
                sync()
                base = torch.cuda.memory_allocated(device)
                task, opt = build(method_name, teacher, init_stage, optimizer)
                it = batches(task.views)
                for _ in range(2):
                    step(task, opt, it)
                sync()
                torch.cuda.reset_peak_memory_stats(device)
                for _ in range(2):
                    loss, terms = step(task, opt, it)
                sync()
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    task, opt = build(method_name, teacher, init_stage, optimizer)
                    it = batches(task.views)
                    for _ in range(2):
                        step(task, opt, it)
                    with record_function(MEASURE):
                        for _ in range(2):
                            loss, terms = step(task, opt, it)
                peak = _cpu_peak_bytes(prof)
            if not torch.isfinite(loss).item():
                raise RuntimeError(f"loss not finite: { {k: float(v) for k, v in terms.items()} }")
        except Exception as exc:  # one broken method must not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            continue
        student_ids = {id(p) for p in task.student.parameters()}
        methods = task.modules()[1:] if not init_stage else [m for m in task.modules() if m is not task.student]
        results[name] = {
            "peak_bytes": peak, "teacher_cast_once": bool(getattr(task, "teacher_cast_once", False)),
            "extra_params": sum(p.numel() for m in methods for p in m.parameters()
                                if p.requires_grad and id(p) not in student_ids),
            "extra_buffers": sum(b.numel() for m in methods for b in m.buffers()),
            "step_s_all": [],
        }
        live[name] = (task, opt, it)

    # Phase 2, timing: round robin over the methods (start rotated every round), so that load
    # changes on a shared machine hit every method alike; medians per method.
    names = list(live)
    for r in range(cfg["warmup"] + cfg["steps"]):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            task, opt, it = live[name]
            sync()
            t0 = time.perf_counter()
            step(task, opt, it)
            sync()
            if r >= cfg["warmup"]:
                results[name]["step_s_all"].append(time.perf_counter() - t0)
    for name in names:
        results[name]["step_s"] = statistics.median(results[name]["step_s_all"])
    return {"results": results, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}


# ------------------------------------------------------------------------------------ parent
def _measure(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(cfg)],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        errs = [ln for ln in lines if "Error" in ln or "error" in ln.split(":")[0]]
        return {"error": (errs or lines or [f"exit status {proc.returncode}"])[-1][:200]}
    return json.loads(lines[-1])


def _available_methods() -> list[str]:
    os.environ.setdefault("KDBENCH_ONLY_DISTS", ONLY_DISTS)
    from kdbench.registry import load_registry

    return list(load_registry().names("student_method"))


def _available_optimizers() -> list[str]:
    os.environ.setdefault("KDBENCH_ONLY_DISTS", ONLY_DISTS)
    from kdbench.registry import load_registry

    return list(load_registry().names("optimizer"))


def _fmt_int(n: int) -> str:
    return f"{n:,}" if n else "0"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all = cpu, and cuda when available")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed rounds before the timed ones (after the two memory-phase steps)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width-mult", type=float, default=1.0,
                    help="width multiplier of every net (1.0 = published)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated student methods (default: all registered); "
                    "kd is always measured (the baseline)")
    ap.add_argument("--optimizers", default=None,
                    help="comma-separated optimizer plugins, each a row of ce + kd trained with it "
                    "(default: all registered; '' for none)")
    ap.add_argument("--pairs", default=",".join(PAIRS),
                    help=f"comma-separated subset of: {', '.join(PAIRS)}")
    ap.add_argument("--num-train", type=int, default=50000,
                    help="training-set size (CRD's memory banks and sampler scale with it)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="as the recipe's: auto = bf16 autocast on CUDA, fp32 on the CPU")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the raw results to this file")
    ap.add_argument("--quick", action="store_true",
                    help="reduced CPU mode (overrides the options above): "
                    + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child is not None:
        print(json.dumps(run_child(json.loads(args._child))))
        return 0
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)

    if args.steps < 1 or args.warmup < 0 or args.batch < 2:
        ap.error("need --steps >= 1, --warmup >= 0, --batch >= 2")
    import torch

    devices = {"cpu": ["cpu"], "cuda": ["cuda"],
               "all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}[args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    known = _available_methods()
    wanted = known if args.methods is None else [m.strip() for m in args.methods.split(",") if m]
    unknown = [m for m in wanted if m not in known]
    if unknown:
        ap.error(f"unknown methods {unknown} (known: {', '.join(known)})")
    known_opt = _available_optimizers()
    optimizers = known_opt if args.optimizers is None else [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if [o for o in optimizers if o not in known_opt]:
        ap.error(f"unknown optimizers {[o for o in optimizers if o not in known_opt]} (known: {', '.join(known_opt)})")
    methods = list(dict.fromkeys(["kd", *wanted]))
    if "ce" in methods:  # the student alone first, then kd, then the rest
        methods = ["ce", *[m for m in methods if m != "ce"]]
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    bad = [p for p in pairs if p not in PAIRS]
    if bad:
        ap.error(f"unknown pairs {bad}")

    results, meta = [], {}
    t_start = time.perf_counter()
    for device in devices:
        for pair in pairs:
            teacher, student = PAIRS[pair]
            cfg = dict(device=device, teacher=teacher, student=student, methods=methods,
                       optimizers=optimizers,
                       steps=args.steps, warmup=args.warmup, batch=args.batch,
                       width_mult=args.width_mult, num_train=args.num_train, image_size=32,
                       num_classes=100, precision=args.precision, threads=args.threads)
            out = _measure(cfg)
            rows = out.get("results") or {m: {"error": out.get("error", "?")} for m in methods}
            meta[device] = out
            base = rows.get("kd", {})
            for method in rows:  # the child's order: each method, then its init stage's row
                r = rows[method]
                results.append(dict(device=device, pair=pair, method=method, **r,
                                    time_ratio=(r["step_s"] / base["step_s"]
                                                if "step_s" in r and "step_s" in base else None),
                                    mem_ratio=(r["peak_bytes"] / base["peak_bytes"]
                                               if "peak_bytes" in r and base.get("peak_bytes")
                                               else None)))
            print(f"[{time.perf_counter() - t_start:5.0f}s] {device} {pair} done",
                  file=sys.stderr, flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)

    print(f"\nOne training step, ce + method, batch {args.batch}, 32x32, 100 classes, "
          f"{args.num_train} training samples, width x{args.width_mult}, precision "
          f"{args.precision}; median of {args.steps} steps after {args.warmup} warm-up; "
          "ratios to kd in the same run.\n")
    print("| device | pair | method | step ms | x KD | peak MiB | x KD | extra params "
          "| extra buffers |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = meta.get(r["device"], {})
        dev = (f"cpu ({m['threads']} threads)" if r["device"] == "cpu" and "threads" in m
               else m.get("device_name", r["device"]))
        if "error" in r:
            print(f"| {dev} | {r['pair']} | {r['method']} | error: {r['error']} | | | | | |")
            continue
        tr = f"{r['time_ratio']:.2f}" if r["time_ratio"] is not None else "-"
        mr = f"{r['mem_ratio']:.2f}" if r["mem_ratio"] is not None else "-"
        print(f"| {dev} | {r['pair']} | {r['method']} | {1e3 * r['step_s']:.1f} | {tr} "
              f"| {r['peak_bytes'] / 2**20:.0f} | {mr} | {_fmt_int(r['extra_params'])} "
              f"| {_fmt_int(r['extra_buffers'])} |")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
