"""Images/s of kdbench's batched augmentation against a torchvision DataLoader with PIL transforms.

Both paths produce the same thing from the same CIFAR-shaped uint8 data (``--n`` random images
3x32x32, default 50000 = CIFAR's training set): shuffled batches of ``--batch-size`` normalised
float32 images, ``RandomCrop(32, padding=4)`` (zero fill) + ``RandomHorizontalFlip(0.5)``,
on the measured device.

* **kdbench**: ``DeviceData.train_batches`` — the split as one uint8 tensor on the device, a
  permutation per epoch, and per batch one gather, ``kdbench.data.augment.random_crop_flip`` and
  the ``Normalizer`` (batched tensor ops, no per-sample Python). CPU: torch's default threads.
* **torchvision loader**: a ``Dataset`` holding the images as an (N, 32, 32, 3) uint8 numpy
  array (as ``torchvision.datasets.CIFAR100`` does), ``PIL.Image.fromarray`` per sample and
  ``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean,
  std)])``, in a ``DataLoader(shuffle=True, num_workers=--workers, persistent_workers=True)``;
  on CUDA with ``pin_memory=True`` and ``.to(device, non_blocking=True)`` of every batch.

Measurement: one untimed warm-up round per path (worker start-up, allocator), then ``--rounds``
rounds; each round times ``--round-images`` images of each path, alternating which path goes
first. Before a timed loader round, the batches its workers prefetched while the other path ran
(``workers x prefetch_factor``) are taken untimed, so the loader is timed at its steady rate;
before a timed kdbench round the script waits until the loader's workers have refilled their
queue, so they do not compete for the CPU. CUDA is synchronised at the end of every timed round.
Reported: median images/s of each path and the median over rounds of the per-round ratio
(``x loader``). ``--threads 2,1`` measures the kdbench CPU path at 2 and at 1 torch thread as two
rows of the same rounds (on a shared, loaded CPU one thread can be faster: every parallel region
waits for its slowest thread).

Quick CPU run (about a minute):
    python benchmarks/augment.py --device cpu --n 10000 --rounds 5 --threads 2,1
Full run (CPU, and CUDA when present):
    python benchmarks/augment.py --device all
"""
from __future__ import annotations

import argparse
import sys
import time

import _common as C
import torch


def forever(make_iter):
    while True:
        yield from make_iter()


def measure(device_name: str, images, labels, args) -> dict:
    from kdbench.engine.reproducibility import data_generator

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    default_threads = torch.get_num_threads()
    bs = args.batch_size
    per_round = max(1, args.round_images // bs)  # batches per timed round

    # kdbench: device-resident data, batched augmentation
    data = C.device_data(C.image_data(images, labels), device)
    gen = data_generator(0, device)
    kd_iter = forever(lambda: data.train_batches(bs, gen))

    def kdbench_round(nb):
        n = 0
        last = None
        for _ in range(nb):
            b = next(kd_iter)
            n += b.x.shape[0]
            last = b.x
        C.sync(device)
        assert last.dtype == torch.float32 and last.device.type == device.type
        return n

    # torchvision: PIL transforms in DataLoader workers
    loader = torch.utils.data.DataLoader(
        C.PILDataset(images, labels, C.pil_transform()), batch_size=bs, shuffle=True,
        num_workers=args.workers, persistent_workers=args.workers > 0, pin_memory=cuda,
        prefetch_factor=2 if args.workers > 0 else None)
    prefetched = 2 * args.workers
    tv_iter = forever(lambda: iter(loader))

    def loader_round(nb):
        n = 0
        for _ in range(nb):
            x, y = next(tv_iter)
            if cuda:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n += x.shape[0]
        C.sync(device)
        return n

    def timed(fn, nb):
        t0 = time.perf_counter()
        n = fn(nb)
        return n / (time.perf_counter() - t0)

    # kdbench variants: one per CPU thread count asked for (CUDA: one)
    threads = [t or default_threads for t in args.threads] if not cuda else [None]
    threads = list(dict.fromkeys(threads))

    def kdbench_at(t):
        def run(nb):
            if t is not None:
                torch.set_num_threads(t)
            try:
                return kdbench_round(nb)
            finally:
                torch.set_num_threads(default_threads)
        return run

    paths = {("kdbench", t): kdbench_at(t) for t in threads}
    paths[("loader", None)] = loader_round
    keys = list(paths)

    # warm-up: worker start-up, first allocations
    loader_round(prefetched + 2)
    for key in keys[:-1]:
        paths[key](4)
    rates = {k: [] for k in keys}
    ratios = {k: [] for k in keys}
    loader_rate = None
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate who goes first
        got = {}
        for key in order:
            if key[0] == "loader":
                loader_round(prefetched)  # the queue filled while the other path ran
                got[key] = loader_rate = timed(loader_round, per_round)
            else:
                if loader_rate:  # let the workers finish refilling their queue first
                    time.sleep(0.05 + 1.5 * prefetched * bs / loader_rate)
                got[key] = timed(paths[key], per_round)
        for k, v in got.items():
            rates[k].append(v)
            ratios[k].append(v / got[("loader", None)])
        C.log(f"{device_name} round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k[0]}{'' if k[1] is None else f' ({k[1]} thr)'} {v:,.0f} img/s"
            for k, v in got.items()))
    del tv_iter, loader
    return {"device": device_name, "label": C.device_label(device), "rates": rates,
            "ratio": {k: C.median(v) for k, v in ratios.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all = cpu, and cuda when present")
    ap.add_argument("--n", type=int, default=50000, help="images (default: CIFAR's train set)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per path (median)")
    ap.add_argument("--round-images", type=int, default=8192, help="images per timed round")
    ap.add_argument("--threads", default="0",
                    help="comma-separated torch CPU thread counts for the kdbench path, each "
                    "measured as its own row in the same rounds (0: torch's default, "
                    f"{torch.get_num_threads()} here)")
    args = ap.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]

    devices = C.resolve_devices(args.device)
    images, labels = C.synthetic_images(args.n)
    results = [measure(d, images, labels, args) for d in devices]

    bs, per = args.batch_size, max(1, args.round_images // args.batch_size) * args.batch_size
    print(f"\n*Batched device augmentation vs torchvision DataLoader + PIL ({args.workers} "
          f"workers): {args.n} random uint8 3x32x32 images, batch {bs}, crop(pad 4) + flip + "
          f"normalise; median of {args.rounds} alternating rounds of {per} images. "
          f"{C.machine()}.*\n")
    rows = []
    for r in results:
        for (path, t), xs in r["rates"].items():
            if path == "loader":
                name = f"torchvision DataLoader + PIL transforms, {args.workers} workers"
                dev = "cpu" if r["device"] == "cpu" else r["label"]
                ratio = "1.0x"
            else:
                name = "kdbench DeviceData.train_batches (random_crop_flip + Normalizer)"
                dev = r["label"] if t is None else f"cpu ({t} thread{'s' if t > 1 else ''})"
                ratio = f"**{r['ratio'][(path, t)]:.1f}x**"
            rows.append([dev, name, f"{C.median(xs):,.0f}", f"{min(xs):,.0f}–{max(xs):,.0f}",
                         ratio])
    print(C.md_table(["device", "path", "images/s (median)", "range", "x loader"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
