"""Per-step time and images/s of a KD training step: kdbench's loop against a plain reference loop.

KD = 0.1 · CE + 0.9 · KL(T = 4), SGD(lr 0.05, momentum 0.9, wd 5e-4), for each teacher -> student
pair and batch size, on the same device, with the same models (the reference's student starts
from a copy of kdbench's), the same frozen teacher (eval mode, no gradient) and the same
synthetic CIFAR-100-shaped data (``--n`` random uint8 3x32x32 images, 100 classes).

* **kdbench**: the engine's own pieces as ``GridRunner`` / ``loop.fit`` use them —
  ``DeviceData.train_batches`` (device-resident uint8 data, batched crop + flip + normalise),
  ``runner.StudentTask`` with the registry's ``ce`` and ``kd`` methods, ``loop.make_optimizer``
  (fused SGD on CUDA, foreach on the CPU), ``loop.autocast`` (precision ``auto`` = bf16 autocast
  on CUDA, fp32 on the CPU), and fit's per-step metric accumulation on the device (no host read
  per step); ``seed_everything`` sets ``cudnn.benchmark`` as the runner does.
* **reference**: the way RepDistiller's ``train_student.py`` trains: a ``torch.utils.data
  .DataLoader(shuffle=True, num_workers=--workers, pin_memory on CUDA)`` over a ``Dataset`` of
  HWC uint8 numpy images with PIL transforms (``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``), ``.cuda()`` of every batch, fp32,
  the teacher under ``torch.no_grad()``, ``DistillKL`` (``kl_div(..., 'sum') · T² / B``),
  top-1/top-5 on the device and ``loss.item()`` every step, ``torch.optim.SGD`` with its defaults.
  The loader's workers are persistent here (RepDistiller restarts them every epoch).

Measurement: ``--rounds`` rounds; in each, every loop runs ``--warmup`` untimed steps (which also
takes the batches the reference's workers prefetched meanwhile), then ``--steps`` timed steps
between two device synchronisations; the order of the loops alternates between rounds. Reported:
median ms per step, images/s, and the median over rounds of the per-round ratio
kdbench images/s / reference images/s. ``--precision auto,fp32`` also times kdbench in fp32 (a
separate student copy): on CUDA that separates the bf16 gain from the data path's.
``--channels-last`` adds kdbench with both nets and the batches in channels_last memory format,
as the engine runs on CUDA (DeviceData and GridRunner._build). On CUDA the reference's
"fp32" convolutions use TF32 (PyTorch's default for cuDNN), as RepDistiller would today.

Quick CPU run (~2 minutes on 2 shared cores):
    python benchmarks/step.py --device cpu --threads 1 --width-mult 0.125 --n 2048 --steps 3 --rounds 3 --warmup 2
Full run (one GPU):
    python benchmarks/step.py --device cuda --precision auto,fp32 --channels-last
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import _common as C
import torch
import torch.nn.functional as F

DEFAULT_PAIRS = "wrn_40_2->wrn_16_2,resnet50->resnet34"


def forever(make_iter):
    while True:
        yield from make_iter()


class KdbenchLoop:
    """``loop.fit``'s step loop (checkpointing and the stop-signal poll, both off by default,
    left out): ``train_step`` and ``accumulate`` over ``DeviceData.train_batches``."""

    def __init__(self, teacher, student, train, device, bs, precision, channels_last=False):
        from kdbench.engine.loop import make_optimizer, new_accum
        from kdbench.engine.runner import data_generator

        self.device, self.precision = device, precision
        self.task = C.kd_task(teacher, student, train, device)
        params = [p for m in self.task.modules() for p in m.parameters() if p.requires_grad]
        self.optimizer, _ = make_optimizer(params, C.schedule(bs), device)
        for m in self.task.modules():
            m.train()
        gen = data_generator(0, device)
        self.batches = forever(lambda: train.train_batches(bs, gen, self.task.views))
        self.channels_last = channels_last
        self.acc = new_accum(device)
        self.n_steps = 0

    def step(self):
        from kdbench.engine.loop import accumulate, train_step

        batch = next(self.batches)
        if self.channels_last:  # a no-op on CUDA, where the engine's batches are channels_last
            cl = torch.channels_last
            batch.x = batch.x.contiguous(memory_format=cl)
            batch.views = {k: v.contiguous(memory_format=cl) for k, v in batch.views.items()}
        loss, terms, logits = train_step(self.task, batch, self.optimizer, self.device, self.precision)
        self.n_steps += 1
        accumulate(self.acc, loss, terms, logits, batch.y, self.n_steps)


def distill_kl(y_s, y_t, T=4.0):
    """RepDistiller's DistillKL."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T ** 2) / y_s.shape[0]


def accuracy(output, target, topk=(1, 5)):
    """RepDistiller's accuracy(): on the device, no host read."""
    with torch.no_grad():
        maxk, batch_size = max(topk), target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size)
                for k in topk]


class ReferenceLoop:
    """RepDistiller's train_distill step for KD, over a PIL DataLoader."""

    def __init__(self, teacher, student, images, labels, device, bs, workers):
        self.teacher, self.student, self.device = teacher, student, device
        self.cuda = device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            C.PILDataset(images, labels, C.pil_transform()), batch_size=bs, shuffle=True,
            num_workers=workers, pin_memory=self.cuda, persistent_workers=workers > 0)
        self.loader = loader
        self.batches = forever(lambda: iter(loader))
        self.optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9,
                                         weight_decay=5e-4)
        self.student.train()
        self.teacher.eval()
        self.loss_meter, self.top1_meter, self.count = 0.0, 0.0, 0

    def step(self):
        x, y = next(self.batches)
        x = x.float()
        if self.cuda:
            x, y = x.cuda(self.device), y.cuda(self.device)
        logit_s = self.student(x).logits
        with torch.no_grad():
            logit_t = self.teacher(x).logits
        loss = 0.1 * F.cross_entropy(logit_s, y) + 0.9 * distill_kl(logit_s, logit_t)
        acc1, acc5 = accuracy(logit_s, y)
        n = x.size(0)
        self.loss_meter += loss.item() * n  # AverageMeter.update(loss.item(), n)
        self.top1_meter = self.top1_meter + acc1[0] * n
        self.count += n
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def run_config(device_name, pair, bs, images, labels, args) -> dict:
    from kdbench.data.loader import DeviceData
    from kdbench.engine.runner import seed_everything

    device = torch.device(device_name)
    t_name, s_name = C.pair_models(pair)
    seed_everything(0, deterministic=False)  # as the runner: cudnn.benchmark on CUDA
    train = DeviceData(C.image_data(images, labels), device)
    teacher = C.frozen_teacher(t_name, args.width_mult, 100, device)
    student = C.build_net(s_name, args.width_mult, 100, device)
    init = copy.deepcopy(student.state_dict())
    precisions = []
    for p in args.precision:
        resolved = "bf16" if (p == "auto" and device.type == "cuda") else (
            "fp32" if p == "auto" else p)
        if resolved not in [r for _, r in precisions]:
            precisions.append((p, resolved))
    loops = {}
    for i, (p, resolved) in enumerate(precisions):
        s = student if i == 0 else copy.deepcopy(student)
        s.load_state_dict(init)
        loops[f"kdbench {resolved}"] = KdbenchLoop(teacher, s, train, device, bs, p)
    if args.channels_last and device.type != "cuda":
        C.log("--channels-last: CUDA only (on this CPU, torch 2.14 corrupts the heap in the "
              "channels_last backward of nets with 2-channel layers, i.e. width x0.125)")
    elif args.channels_last:
        cl = torch.channels_last
        s = copy.deepcopy(student)
        s.load_state_dict(init)
        p, resolved = precisions[0]
        loops[f"kdbench {resolved} + channels_last nets"] = KdbenchLoop(
            copy.deepcopy(teacher).to(memory_format=cl), s.to(memory_format=cl), train, device,
            bs, p, channels_last=True)
    ref_student = copy.deepcopy(student)
    ref_student.load_state_dict(init)
    loops["reference fp32"] = ReferenceLoop(teacher, ref_student, images, labels, device, bs,
                                            args.workers)
    names = list(loops)
    times = {k: [] for k in names}
    ratios = {k: [] for k in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        got = {}
        for name in order:
            loop = loops[name]
            for _ in range(args.warmup):
                loop.step()
            C.sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loop.step()
            C.sync(device)
            got[name] = (time.perf_counter() - t0) / args.steps
        for k, v in got.items():
            times[k].append(v)
            ratios[k].append(got["reference fp32"] / v)  # images/s ratio to the reference
        C.log(f"{device_name} {pair} b{bs} round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {1e3 * v:.1f} ms" for k, v in got.items()))
    for loop in loops.values():
        if not torch.isfinite(loop.acc["loss"].cpu() if isinstance(loop, KdbenchLoop)
                               else torch.tensor(loop.loss_meter)).item():
            raise RuntimeError(f"{pair} b{bs}: loss is not finite")
    del loops
    return {"device": C.device_label(device), "pair": pair, "bs": bs, "times": times,
            "ratios": {k: C.median(v) for k, v in ratios.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "all", "auto"], default="auto",
                    help="auto = cuda when present, else cpu; all = cpu and cuda")
    ap.add_argument("--pairs", default=DEFAULT_PAIRS,
                    help=f"comma-separated teacher->student (default {DEFAULT_PAIRS}); any pair "
                    f"of zoo models, e.g. {', '.join(C.PAPER_PAIRS)}")
    ap.add_argument("--batch-sizes", default="64,128")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per loop and round")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed steps before each timed block (default: 2 + 2 x workers, "
                    "so the reference's prefetched batches are used up)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    ap.add_argument("--width-mult", type=float, default=1.0,
                    help="width multiplier of both nets (1.0 = published; <1 for quick CPU runs)")
    ap.add_argument("--n", type=int, default=50000, help="training images (CIFAR: 50000)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="reference DataLoader workers (default min(8, cores); RepDistiller: 8)")
    ap.add_argument("--precision", default="auto",
                    help="comma-separated kdbench precisions: auto (bf16 autocast on CUDA, fp32 "
                    "on the CPU), fp32, bf16; each is a row")
    ap.add_argument("--channels-last", action="store_true",
                    help="also time kdbench with both nets and the batches in channels_last "
                    "memory format, as the engine runs them on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warmup:
        args.warmup = 2 + 2 * args.workers
    pairs = C.parse_pairs(args.pairs)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    devices = C.resolve_devices(args.device)
    images, labels = C.synthetic_images(args.n)

    results = []
    for device in devices:
        for pair in pairs:
            for bs in batch_sizes:
                results.append(run_config(device, pair, bs, images, labels, args))

    print(f"\n*KD step (0.1 CE + 0.9 KL, T=4), kdbench loop vs reference loop (RepDistiller-"
          f"style, {args.workers} DataLoader workers), same device/models/data in one run: "
          f"{args.n} random 3x32x32 images, 100 classes, width x{args.width_mult}; median of "
          f"{args.rounds} alternating rounds of {args.steps} steps (after {args.warmup} "
          f"untimed). {C.machine()}.*\n")
    rows = []
    for r in results:
        for name, ts in r["times"].items():
            med = C.median(ts)
            ratio = r["ratios"][name]
            rows.append([r["device"], r["pair"], r["bs"], name, f"{1e3 * med:.1f}",
                         f"{1e3 * min(ts):.1f}–{1e3 * max(ts):.1f}", f"{r['bs'] / med:,.0f}",
                         "1.00" if name.startswith("reference") else f"**{ratio:.2f}**"])
    print(C.md_table(["device", "pair", "batch", "loop", "ms/step (median)", "range",
                      "images/s", "kdbench/ref (images/s)"], rows, right={2, 4, 5, 6, 7}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
