"""One full KD epoch of CIFAR-100-shaped data through kdbench's loop for every pair of the paper:
time, FLOPs, achieved TFLOP/s, and what the paper's Table 1 (CIFAR-100) would cost.

For each teacher -> student pair (default: the paper's six), with a frozen randomly initialised
teacher and KD (0.1 CE + 0.9 KL, T = 4, the registry's ``ce`` and ``kd`` methods in the engine's
``StudentTask``), the script calls ``kdbench.engine.loop.fit`` itself for one epoch over
``--n`` random uint8 3x32x32 images with 100 classes (default 50000, CIFAR-100's training set)
and evaluates on ``--n-test`` images (default 10000), exactly as a recipe run's epoch. Before
it, ``--warmup`` untimed steps (plus one at the epoch's last, smaller batch size and one eval
forward) take cuDNN autotuning and first allocations out of the timing.

* **train s**: from calling ``fit`` until the epoch's metrics were read back to the host (fit's
  one synchronisation per epoch; optimizer set-up, the permutation and every step included).
  **eval s**: the evaluation on the test split that follows.
* **GFLOP/step**: ``torch.utils.flop_counter.FlopCounterMode`` around one step at the epoch's
  batch size: teacher forward + student forward and backward (the optimizer adds no matmul or
  convolution FLOPs). It counts matmuls and convolutions only (2 FLOPs per multiply-add);
  BatchNorm, activations, pooling and the losses are not counted. **TFLOP/epoch** = FLOP per
  sample x samples of the epoch; **achieved TFLOP/s** = TFLOP/epoch / train s. With
  ``--peak-tflops`` (the device's dense peak for the precision used, e.g. ~989 for bf16 on an
  H100 SXM / H200) the table adds the fraction of peak (MFU) and the gap factor peak / achieved.

The Table-1 estimate below the table uses the measured epoch (train + eval, scaled linearly to
50000 training and 10000 test images) of the three homogeneous pairs; its assumptions are
printed with it (``--rows``, ``--seeds``, ``--epochs``, ``--teacher-seeds``).

Without a GPU, ``--assume-tflops X`` times nothing: it counts the FLOPs of the published nets on
the CPU (a step at batch ``--flop-batch``, scaled per sample) and fills the table and the
Table-1 estimate at an assumed achieved X TFLOP/s.

Quick CPU run (~2-3 minutes on 2 shared cores):
    python benchmarks/epoch.py --device cpu --threads 1 --width-mult 0.125 --n 512 --n-test 256
Full run (one GPU; add --peak-tflops for the gap to the hardware limit):
    python benchmarks/epoch.py --device cuda --peak-tflops 989
FLOP counts of the published nets and the cost at an assumed rate (no GPU needed, ~1 minute):
    python benchmarks/epoch.py --assume-tflops 100 --peak-tflops 989
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import _common as C
import torch

TABLE1_PAIRS = ("resnet50->resnet34", "wrn_40_2->wrn_16_2", "vgg13->vgg8")


class TimedTask:
    """Delegates to the engine's StudentTask; ``fit`` calls ``eval_model()`` right after it read
    the epoch's metrics back (i.e. after every training step finished), so that is the end of the
    training phase."""

    def __init__(self, task):
        self.task, self.views = task, task.views
        self.train_end = None

    def modules(self):
        return self.task.modules()

    def loss_terms(self, batch):
        return self.task.loss_terms(batch)

    def eval_model(self):
        self.train_end = time.perf_counter()
        return self.task.eval_model()

    def epoch_stats(self):
        return self.task.epoch_stats()


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


def teacher_forward_flops(teacher, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        teacher(x)
    return counter.get_total_flops()


def warm_up(task, train, test, device, bs, precision, steps, eval_bs):
    """Untimed steps (own optimizer) at the epoch's batch sizes, and eval forwards."""
    from kdbench.engine.loop import autocast, make_optimizer, train_step
    from kdbench.engine.runner import data_generator

    params = [p for m in task.modules() for p in m.parameters() if p.requires_grad]
    opt, _ = make_optimizer(params, C.schedule(bs), device)
    gen = data_generator(1, device)
    sizes = [bs] * steps
    tail = len(train) % bs
    if tail >= 2:
        sizes.append(tail)
    for size in sizes:
        train_step(task, next(train.train_batches(size, gen, task.views)), opt, device, precision)
    model = task.eval_model()
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        for size in {min(eval_bs, len(test)), len(test) % eval_bs} - {0}:
            model(test.normalize(test.images[:size]))
    model.train()
    C.sync(device)


def run_pair(device_name, pair, train_data, test_data, args) -> dict:
    from kdbench.data.loader import DeviceData
    from kdbench.engine.loop import fit
    from kdbench.engine.runner import data_generator, seed_everything

    device = torch.device(device_name)
    t_name, s_name = C.pair_models(pair)
    seed_everything(0, deterministic=False)  # as the runner: cudnn.benchmark on CUDA
    train = DeviceData(train_data, device)
    test = DeviceData(test_data, device)
    teacher = C.frozen_teacher(t_name, args.width_mult, 100, device)
    student = C.build_net(s_name, args.width_mult, 100, device)
    task = C.kd_task(teacher, student, train, device)
    bs = args.batch_size

    # FLOPs of one step at the epoch's batch size (and of the teacher's forward alone)
    gen = data_generator(2, device)
    batch = next(train.train_batches(bs, gen, task.views))
    step_flops = count_step_flops(task, batch, device, args.precision)
    t_fwd_flops = teacher_forward_flops(teacher, batch.x)
    per_sample = step_flops / batch.x.shape[0]
    samples = sum(min(bs, len(train) - s) for s in range(0, len(train), bs)
                  if min(bs, len(train) - s) >= 2)
    epoch_flops = per_sample * samples

    warm_up(task, train, test, device, bs, args.precision, args.warmup, args.eval_batch_size)
    timed = TimedTask(task)
    C.sync(device)
    t0 = time.perf_counter()
    result = fit(timed, C.schedule(bs), train, test, device, args.precision,
                 data_generator(0, device), C.NoProgress(), args.eval_batch_size)
    t_end = time.perf_counter()
    train_s, eval_s = timed.train_end - t0, t_end - timed.train_end
    rec = result.epochs[0]
    C.log(f"{device_name} {pair}: train {train_s:.2f} s, eval {eval_s:.2f} s, "
          f"loss {rec['train_loss']:.3f}, {step_flops / 1e9:.2f} GFLOP/step")
    out = {"device": C.device_label(device), "pair": pair, "bs": bs, "steps": train.num_batches(bs),
           "samples": samples, "n_test": len(test), "train_s": train_s, "eval_s": eval_s,
           "step_flops": step_flops, "epoch_flops": epoch_flops,
           "tflops": epoch_flops / train_s / 1e12, "teacher_fwd_per_sample":
           t_fwd_flops / batch.x.shape[0], "per_sample": per_sample}
    del task, teacher, student, train, test, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def estimate_pair(pair, train_data, args) -> dict:
    """--assume-tflops: no timing; FLOPs of a step counted on the CPU at a batch of
    ``--flop-batch`` (matmul/conv FLOPs are linear in the batch), times at the assumed rate."""
    from kdbench.data.loader import DeviceData
    from kdbench.engine.runner import data_generator

    device = torch.device("cpu")
    t_name, s_name = C.pair_models(pair)
    torch.manual_seed(0)
    small = C.image_data(train_data.images[:max(64, args.flop_batch)],
                         train_data.labels[:max(64, args.flop_batch)])
    train = DeviceData(small, device)
    teacher = C.frozen_teacher(t_name, args.width_mult, 100, device)
    student = C.build_net(s_name, args.width_mult, 100, device)
    task = C.kd_task(teacher, student, train, device)
    batch = next(train.train_batches(args.flop_batch, data_generator(2, device), task.views))
    b = batch.x.shape[0]
    per_sample = count_step_flops(task, batch, device, "fp32") / b
    t_fwd = teacher_forward_flops(teacher, batch.x) / b
    bs, n = args.batch_size, args.n
    samples = sum(min(bs, n - s) for s in range(0, n, bs) if min(bs, n - s) >= 2)
    rate = args.assume_tflops * 1e12
    f_student = (per_sample - t_fwd) / 3
    C.log(f"{pair}: {per_sample / 1e9:.2f} GFLOP per sample and step (counted at batch {b})")
    return {"device": f"estimate at {args.assume_tflops:g} TFLOP/s", "pair": pair, "bs": bs,
            "steps": -(-n // bs), "samples": samples, "n_test": args.n_test,
            "train_s": per_sample * samples / rate, "eval_s": f_student * args.n_test / rate,
            "step_flops": per_sample * bs, "epoch_flops": per_sample * samples,
            "tflops": args.assume_tflops, "teacher_fwd_per_sample": t_fwd,
            "per_sample": per_sample}


def table1_estimate(results, args) -> list[str]:
    """GPU-hours of Table 1's CIFAR-100 column from the measured epochs."""
    by_pair = {r["pair"]: r for r in results}
    have = [p for p in TABLE1_PAIRS if p in by_pair]
    if not have:
        return ["(Table-1 estimate skipped: none of its pairs was measured: "
                f"{', '.join(TABLE1_PAIRS)})"]
    lines = []
    total_s = student_s = teacher_s = 0.0
    parts = []
    for p in have:
        r = by_pair[p]
        epoch = r["train_s"] * 50000 / r["samples"] + r["eval_s"] * 10000 / r["n_test"]
        s = args.rows * args.seeds * args.epochs * epoch
        # Teacher training at the KD epoch's achieved FLOP/s: per sample, CE = fwd + bwd
        # (3 forwards); margin_intra <= 3 + 1 (second view, forward only) + 6 (re-encoding both
        # views of every sample at a 100% pass rate) = 10 forwards.
        rate = r["epoch_flops"] / r["train_s"]
        f = r["teacher_fwd_per_sample"]
        f_student = (r["per_sample"] - f) / 3  # step = teacher fwd + student fwd + bwd (2 fwd)
        t_eval = r["eval_s"] * 10000 / r["n_test"] * f / f_student  # eval scales with fwd FLOPs
        t_epoch = (3 * f + 10 * f) * 50000 / rate + 2 * t_eval
        t = args.teacher_seeds * args.epochs * t_epoch
        student_s += s
        teacher_s += t
        total_s += s + t
        parts.append(f"{p}: {epoch:.1f} s/epoch -> students {s / 3600:.1f} h, teachers "
                     f"{t / 3600:.1f} h")
    dev = results[0]["device"]
    unit = "CPU-hours (this CPU)" if dev.startswith("cpu") else "GPU-hours"
    where = (f"at an assumed {args.assume_tflops:g} TFLOP/s" if args.assume_tflops
             else f"from epochs measured on {dev}")
    lines.append(f"**Table 1, CIFAR-100 column, estimated {where} at width x{args.width_mult}: "
                 f"{total_s / 3600:,.1f} {unit}** (students {student_s / 3600:,.1f}, teachers "
                 f"{teacher_s / 3600:,.1f}; one run at a time, no overlap).")
    lines.append("; ".join(parts) + ".")
    lines.append(
        f"Assumptions: {len(have)} pairs x {args.rows} student rows (KD, FitNet, RKD, CRD, OFD, "
        f"ReviewKD, VID, MLLD, Ours, Ours+RKD; the vanilla-student row not counted) x "
        f"{args.seeds} seeds x {args.epochs} epochs, each epoch costing the KD epoch above "
        "(train at batch "
        f"{args.batch_size} + eval of 10000 images; other methods differ: see "
        "benchmarks/methods.py, MLLD alone runs two views); teachers: 2 objectives per pair "
        f"(ce for the baselines, margin_intra for Ours) x {args.teacher_seeds} seed(s) x "
        f"{args.epochs} epochs, ce = 3 teacher forwards per sample, margin_intra <= 10 "
        "(second view + re-encoding at a 100% pass rate), run at the FLOP/s the KD epoch of "
        "that pair achieved, plus an eval scaled from the student's by forward FLOPs; "
        f"epochs scaled linearly from {results[0]['samples']} train / "
        f"{results[0]['n_test']} test images to 50000 / 10000.")
    if len(have) < len(TABLE1_PAIRS):
        lines.append(f"PARTIAL: only {len(have)} of the {len(TABLE1_PAIRS)} Table-1 pairs "
                     f"({', '.join(TABLE1_PAIRS)}) were measured.")
    if args.width_mult != 1.0:
        lines.append(f"Width x{args.width_mult} is not the published nets: this estimate does "
                     "not describe the paper's cost.")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="auto = cuda when present, else cpu")
    ap.add_argument("--pairs", default=",".join(C.PAPER_PAIRS),
                    help="comma-separated teacher->student (default: the paper's six)")
    ap.add_argument("--n", type=int, default=50000, help="training images (CIFAR-100: 50000)")
    ap.add_argument("--n-test", type=int, default=10000, help="test images (CIFAR-100: 10000)")
    ap.add_argument("--batch-size", type=int, default=128, help="paper's student batch: 128")
    ap.add_argument("--eval-batch-size", type=int, default=512, help="recipe default: 512")
    ap.add_argument("--width-mult", type=float, default=1.0,
                    help="width multiplier of both nets (1.0 = published; <1 for quick CPU runs)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="as a recipe's: auto = bf16 autocast on CUDA, fp32 on the CPU")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the epoch")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device's dense peak TFLOP/s for the precision used (adds MFU and gap)")
    ap.add_argument("--assume-tflops", type=float, default=None,
                    help="no timing: count FLOPs on the CPU (batch --flop-batch) and estimate "
                    "the epoch and Table 1 at this achieved TFLOP/s (works without a GPU)")
    ap.add_argument("--flop-batch", type=int, default=2, help="batch of --assume-tflops counts")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--rows", type=int, default=10, help="Table-1 student rows per pair")
    ap.add_argument("--seeds", type=int, default=5, help="Table-1 seeds per student row")
    ap.add_argument("--epochs", type=int, default=90, help="Table-1 epochs (students, teachers)")
    ap.add_argument("--teacher-seeds", type=int, default=5,
                    help="teachers trained per objective and pair (5: one per seed; 1: a "
                    "recipe's teacher_seed)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = C.parse_pairs(args.pairs)
    device = "cpu" if args.assume_tflops else C.resolve_devices(args.device)[0]
    train_data = C.image_data(*C.synthetic_images(args.n, seed=0))
    test_data = None if args.assume_tflops else C.image_data(
        *C.synthetic_images(args.n_test, seed=1))

    if args.assume_tflops:
        results = [estimate_pair(p, train_data, args) for p in pairs]
        print(f"\n*NOT MEASURED: one KD epoch (0.1 CE + 0.9 KL, T=4) of {args.n} 3x32x32 "
              f"images (batch {args.batch_size}, eval on {args.n_test}, width "
              f"x{args.width_mult}) estimated from FlopCounterMode counts (matmul + conv only, "
              f"one step at batch {args.flop_batch}, scaled per sample) at an assumed "
              f"{args.assume_tflops:g} TFLOP/s. {C.machine()}.*\n")
    else:
        results = [run_pair(device, p, train_data, test_data, args) for p in pairs]
        print(f"\n*One KD epoch (0.1 CE + 0.9 KL, T=4) through kdbench.engine.loop.fit: "
              f"{args.n} random 3x32x32 images, 100 classes, batch {args.batch_size}, eval on "
              f"{args.n_test}, width x{args.width_mult}, precision {args.precision}. FLOPs: "
              f"FlopCounterMode (matmul + conv only) on one step. {C.machine()}.*\n")
    headers = ["device", "pair", "steps", "train s", "eval s", "images/s", "GFLOP/step",
               "TFLOP/epoch", "achieved TFLOP/s"]
    if args.peak_tflops:
        headers += [f"% of {args.peak_tflops:g} TFLOP/s", "gap (peak/achieved)"]
    rows = []
    for r in results:
        row = [r["device"], r["pair"], r["steps"], f"{r['train_s']:.2f}", f"{r['eval_s']:.2f}",
               f"{r['samples'] / r['train_s']:,.0f}", f"{r['step_flops'] / 1e9:,.2f}",
               f"{r['epoch_flops'] / 1e12:,.3f}", f"{r['tflops']:.3g}"]
        if args.peak_tflops:
            row += [f"{100 * r['tflops'] / args.peak_tflops:.1f}%",
                    f"{args.peak_tflops / r['tflops']:,.1f}x"]
        rows.append(row)
    print(C.md_table(headers, rows))
    print()
    print("\n".join(table1_estimate(results, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
