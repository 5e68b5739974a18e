"""What the teacher logit cache saves: KD students sharing one frozen teacher, trained through
``kdbench.engine.loop.fit`` with the live teacher and with the cache, in one run.

For one teacher -> student pair, ``--students`` KD students (0.1 CE + 0.9 KL, T = 4; seeds
0, 1, ...) of one frozen, randomly initialised teacher are trained for ``--epochs`` epochs on
``--n`` random uint8 3x32x32 images (100 classes), first with the teacher run at every step
("live"), and with one :class:`kdbench.engine.teacher_cache.TeacherLogitCache` shared by the
students in turn, as ``GridRunner`` shares it between the students of a teacher ("cache"); each
student's two runs follow each other, so drifting load hits both alike. The
table gives, per student, the training time of both (sum of ``fit`` calls, evaluation on a
small test split included), the teacher forwards the cache still computed (entries computed /
entries served), the time ratio, and whether the student's final weights are bit-identical.

Below the table, the expected share of teacher forwards saved on the paper's CIFAR-100 grid
(nothing is timed there): with ``E`` epochs and ``k`` students drawing views of one teacher,
an image's 162 views are computed 162 (1 - (1 - 1/162)^(kE)) times instead of kE.

Quick CPU run (~3 minutes on 2 cores; 30 epochs x 3 students = 90 draws per image):
    python benchmarks/teacher_cache.py --device cpu --threads 2 --width-mult 0.25 --n 512 \
        --n-test 128 --epochs 30
GPU:
    python benchmarks/teacher_cache.py --device cuda --n 50000 --epochs 3 --students 3
"""
from __future__ import annotations

import argparse
import sys
import time

import _common as C
import torch

VIEWS = 162


def train_students(args, device, train, test, teacher) -> list[tuple[dict, dict]]:
    """Each student with the live teacher, then with the shared cache (alternating, so that
    drifting machine load hits both alike): [(live, cached)] per student."""
    from kdbench.engine.loop import autocast, autocast_dtype, fit
    from kdbench.engine.runner import cast_teacher_once, data_generator, weights_sha256
    from kdbench.engine.teacher_cache import TeacherLogitCache

    _, s_name = C.pair_models(args.pair)
    cast_teacher_once(teacher, train, device, args.precision)  # as the runner does
    dtype = autocast_dtype(device, args.precision) or torch.float32
    cache = TeacherLogitCache(train, 100, dtype, args.batch_size, lambda: autocast(device, args.precision))
    cache.teacher = teacher
    out = []
    for seed in range(args.students):
        pair = []
        for use_cache in (False, True):
            torch.manual_seed(seed)
            student = C.build_net(s_name, args.width_mult, 100, device)
            task = C.kd_task(teacher, student, train, device)
            before = cache.stats()
            if use_cache:
                task.use_logit_cache(cache)
            C.sync(device)
            t0 = time.perf_counter()
            fit(task, C.schedule(args.batch_size, epochs=args.epochs), train, test, device,
                args.precision, data_generator(seed, device), C.NoProgress(), args.eval_batch_size)
            C.sync(device)
            after = cache.stats()
            pair.append({"seconds": time.perf_counter() - t0,
                         "weights": weights_sha256(student.state_dict()),
                         "computed": after["entries_computed"] - before["entries_computed"],
                         "served": after["entries_served"] - before["entries_served"]})
            C.log(f"student {seed} {'cache' if use_cache else 'live '}: {pair[-1]['seconds']:.2f} s")
        out.append(tuple(pair))
    return out


def expected_share_computed(draws: int) -> float:
    """Fraction of ``draws`` uniformly drawn views of an image that are new (162 views)."""
    return VIEWS * (1 - (1 - 1 / VIEWS) ** draws) / draws


def grid_lines(args) -> list[str]:
    """Teacher forwards saved on Table 1 (CIFAR-100) by the cache, per the recipe's layout."""
    e = args.grid_epochs
    lines = [f"Expected share of teacher forwards the cache saves, {e}-epoch students "
             f"(162 views per image, uniform draws):", ""]
    lines.append(C.md_table(["students sharing a teacher", "teacher forwards per image", "computed",
                             "saved"],
                            [[k, k * e, f"{k * e * expected_share_computed(k * e):.1f}",
                              f"{100 * (1 - expected_share_computed(k * e)):.0f}%"]
                             for k in (1, 2, 5, 10)], right={1, 2, 3}))
    lines += ["", "recipes/cifar100_homogeneous.toml has two logit-only rows per pair (KD with the "
              "CE teacher, Ours with the margin teacher) and one teacher per seed, so each teacher "
              "has one cacheable student (k = 1); with teacher_seed = 0 the five seeds of a row share "
              "one teacher (k = 5). The other rows (feature methods, MLLD's strong view, Ours+RKD) "
              "run the teacher live."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--pair", default="wrn_40_2->wrn_16_2", help="teacher->student")
    ap.add_argument("--n", type=int, default=50000, help="training images")
    ap.add_argument("--n-test", type=int, default=512, help="test images (evaluation each epoch)")
    ap.add_argument("--students", type=int, default=3, help="KD students sharing the teacher")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--eval-batch-size", type=int, default=512)
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--grid-epochs", type=int, default=90, help="epochs of the grid estimate")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.parse_pairs(args.pair)
    device = torch.device(C.resolve_devices(args.device)[0])

    from kdbench.data.loader import DeviceData
    from kdbench.engine.runner import seed_everything

    seed_everything(0, deterministic=False)
    train = DeviceData(C.image_data(*C.synthetic_images(args.n, seed=0)), device)
    test = DeviceData(C.image_data(*C.synthetic_images(args.n_test, seed=1)), device)
    t_name, _ = C.pair_models(args.pair)
    torch.manual_seed(1234)
    teacher = C.frozen_teacher(t_name, args.width_mult, 100, device)
    # Warm-up (untimed): one short student each way, so neither side pays first-call costs.
    warm = argparse.Namespace(**{**vars(args), "students": 1, "epochs": 1})
    small = DeviceData(C.image_data(*C.synthetic_images(4 * args.batch_size, seed=2)), device)
    train_students(warm, device, small, test, teacher)
    results = train_students(args, device, train, test, teacher)

    print(f"\n*{args.students} KD students of one frozen {t_name} teacher ({args.pair}, width "
          f"x{args.width_mult}, precision {args.precision}), {args.epochs} epochs of {args.n} "
          f"random 3x32x32 images, batch {args.batch_size}; live teacher, then one logit cache "
          f"shared by the students in turn (each student live, then cached). {C.device_label(device)}; {C.machine()}.*\n")
    rows = []
    for i, (a, b) in enumerate(results):
        rows.append([f"student {i}", f"{a['seconds']:.2f}", f"{b['seconds']:.2f}",
                     f"{b['computed']:,} / {b['served']:,}", f"{a['seconds'] / b['seconds']:.2f}x",
                     "yes" if a["weights"] == b["weights"] else "no"])
    live, cached = [a for a, _ in results], [b for _, b in results]
    total_live, total_cache = sum(r["seconds"] for r in live), sum(r["seconds"] for r in cached)
    computed, served = sum(r["computed"] for r in cached), sum(r["served"] for r in cached)
    rows.append(["all", f"{total_live:.2f}", f"{total_cache:.2f}", f"{computed:,} / {served:,}",
                 f"**{total_live / total_cache:.2f}x**",
                 "yes" if all(a["weights"] == b["weights"] for a, b in results) else "no"])
    print(C.md_table(["run", "live s", "cache s", "teacher forwards (computed / served)",
                      "live / cache", "bit-identical weights"], rows, right={1, 2, 3, 4}))
    print()
    print("\n".join(grid_lines(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
