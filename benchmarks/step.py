"""Per-step time and images/s of a KD training step: kdbench's loop against a plain reference loop.

KD = 0.1 · CE + 0.9 · KL(T = 4), SGD(lr 0.05, momentum 0.9, wd 5e-4), for each teacher -> student
pair and batch size, on the same device, with the same models (the reference's student starts
from a copy of kdbench's), the same frozen teacher (eval mode, no gradient) and the same
synthetic CIFAR-100-shaped data (``--n`` random uint8 3x32x32 images, 100 classes).

* **kdbench**: the engine's own pieces as ``loop.fit`` uses them — ``DeviceData.train_batches``
  (device-resident uint8 data, batched crop + flip + normalise), the KD ``StudentTask`` built by
  ``tasks.build_student_task`` (the registry's ``ce`` and ``kd``; the frozen teacher cast once to
  the autocast dtype after the sizing forward, as a run does), ``loop.make_optimizer`` (fused SGD
  on CUDA, foreach on the CPU), ``loop.train_step`` (autocast: precision ``auto`` = bf16 on CUDA,
  fp32 on the CPU) and ``loop.accumulate`` (metrics on the device, no host read per step);
  ``seed_everything`` sets ``cudnn.benchmark`` as the runner does.
* **Layouts are explicit per row**: ``--rows`` lists ``precision/layout`` items. ``engine`` is
  what a run does (``tasks.place_model`` + ``DeviceData``: channels_last nets and batches on
  CUDA, contiguous on the CPU); ``channels_last`` and ``contiguous`` build both nets and every
  batch in that memory format. The table's "loop" column names the layout each row actually ran
  (read back from the weights and a batch), so no row is labelled with a layout it did not use.
* **reference**: the way RepDistiller's ``train_student.py`` trains: a ``torch.utils.data
  .DataLoader(shuffle=True, num_workers=--workers, pin_memory on CUDA)`` over a ``Dataset`` of
  HWC uint8 numpy images with PIL transforms (``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``), ``.cuda()`` of every batch, fp32,
  contiguous nets and batches, the teacher under ``torch.no_grad()``, ``DistillKL``
  (``kl_div(..., 'sum') · T² / B``), top-1/top-5 on the device and ``loss.item()`` every step,
  ``torch.optim.SGD`` with its defaults. The loader's workers are persistent here (RepDistiller
  restarts them every epoch). On CUDA its "fp32" convolutions use TF32 (PyTorch's default for
  cuDNN), as RepDistiller would today.

Measurement: ``--rounds`` rounds; in each, every loop runs ``--warmup`` untimed steps (which also
takes the batches the reference's workers prefetched meanwhile), then ``--steps`` timed steps
between two device synchronisations; the order of the loops alternates between rounds. Reported:
median ms per step, images/s, and the median over rounds of the per-round ratio
kdbench images/s / reference images/s. Every loop has its own copy of the teacher (the cast is
in place) and of the student, from the same initial weights.

Quick CPU run (~2 minutes on 2 shared cores):
    python benchmarks/step.py --device cpu --threads 1 --width-mult 0.25 --n 2048 --steps 3 --rounds 3 --warmup 2
Full run (one GPU): the engine's path, the same with contiguous nets and batches, and fp32:
    python benchmarks/step.py --device cuda --rows auto/engine,auto/contiguous,fp32/engine
"""
from __future__ import annotations

import argparse
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

    def __init__(self, teacher, student, train, device, bs, precision):
        from kdbench.engine.loop import make_optimizer, new_accum
        from kdbench.engine.reproducibility import data_generator

        self.device, self.precision = device, precision
        self.task = C.student_task(student, teacher, train, device, precision=precision)
        self.optimizer, _ = make_optimizer(C.trained_params(self.task), C.schedule(bs), device)
        for m in self.task.modules():
            m.train()
        gen = data_generator(0, device)
        self.batches = forever(lambda: train.train_batches(bs, gen, self.task.views))
        self.acc = new_accum(device)
        self.n_steps = 0

    def step(self):
        from kdbench.engine.loop import accumulate, train_step

        batch = next(self.batches)
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
        self.step_on(*next(self.batches))

    def epoch(self) -> int:
        """One pass over the loader (its workers persist; RepDistiller restarts them): steps."""
        n = 0
        for x, y in self.loader:
            self.step_on(x, y)
            n += 1
        return n

    def step_on(self, x, y):
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


def parse_rows(text: str) -> list[tuple[str, str]]:
    rows = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        precision, _, layout = item.partition("/")
        layout = layout or "engine"
        if precision not in ("auto", "fp32", "bf16") or layout not in C.LAYOUTS:
            raise SystemExit(f"--rows: {item!r} is not precision/layout (precision auto|fp32|bf16, "
                             f"layout {'|'.join(C.LAYOUTS)})")
        rows.append((precision, layout))
    return rows


def run_config(device_name, pair, bs, images, labels, args) -> dict:
    from kdbench.engine.reproducibility import seed_everything

    device = torch.device(device_name)
    t_name, s_name = C.pair_models(pair)
    seed_everything(0, deterministic=False)  # as the runner: cudnn.benchmark on CUDA
    data = C.image_data(images, labels)
    t_state = C.build_net(t_name, args.width_mult, 100, "cpu").state_dict()
    s_state = C.build_net(s_name, args.width_mult, 100, "cpu").state_dict()

    def nets(layout):
        """Teacher (frozen) and student with the shared initial weights, in ``layout``."""
        teacher = C.build_net(t_name, args.width_mult, 100, device, layout)
        teacher.load_state_dict(t_state)
        student = C.build_net(s_name, args.width_mult, 100, device, layout)
        student.load_state_dict(s_state)
        return C.freeze(teacher), student

    loops, datas = {}, {"engine": C.device_data(data, device)}
    engine = (C.net_layout(nets("engine")[1]), C.batch_layout(datas["engine"]))  # what a run uses
    for precision, layout in args.rows:
        if layout not in datas:
            datas[layout] = C.device_data(data, device, layout)
        train = datas[layout]
        teacher, student = nets(layout)
        loop = KdbenchLoop(teacher, student, train, device, bs, precision)
        lay_nets, lay_batch = C.net_layout(student), C.batch_layout(train)
        shown = (f"{lay_nets} nets + batches" if lay_nets == lay_batch
                 else f"{lay_nets} nets, {lay_batch} batches")
        name = (f"kdbench {C.resolve_precision(device, precision)}, {shown}"
                f"{' (engine)' if (lay_nets, lay_batch) == engine else ''}"
                f"{', teacher cast once' if loop.task.teacher_cast_once else ''}")
        if name in loops:
            raise SystemExit(f"--rows: two rows are the same configuration ({name})")
        loops[name] = loop
    teacher, student = nets("contiguous")
    loops["reference fp32, contiguous"] = ReferenceLoop(teacher, student, images, labels, device,
                                                        bs, args.workers)
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
            ratios[k].append(got["reference fp32, contiguous"] / v)  # images/s ratio
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
    ap.add_argument("--rows", default="auto/engine",
                    help="comma-separated kdbench rows, each precision/layout: precision auto "
                    "(bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16; layout engine (what "
                    "a run does: channels_last on CUDA, contiguous on the CPU), channels_last or "
                    "contiguous (nets and batches)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)
    args.rows = parse_rows(args.rows)
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
