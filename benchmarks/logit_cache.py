"""What the teacher logit cache saves: KD students sharing one frozen teacher, trained through
``kdbench.engine.loop.fit`` with the live teacher and with the cache, in one run.

For one teacher -> student pair, ``--students`` KD students (0.1 CE + 0.9 KL, T = 4; seeds
0, 1, ...) of one frozen, randomly initialised teacher are trained for ``--epochs`` epochs on
``--n`` random uint8 3x32x32 images (100 classes), first with the teacher run at every step
("live"), then with the teacher logit cache (:mod:`kdbench.engine.logit_cache`) that the students
share in turn, attached and released by the engine's ``LogitCacheKeeper`` exactly as
``RunTrainer`` does ("cache"); each student's two runs follow each other, so drifting load hits
both alike. Every student's task is built by ``tasks.build_student_task`` (sizing forward first,
then the teacher's one-time cast to the autocast dtype: bf16 on CUDA, or with ``--precision
bf16`` on the CPU). The table gives, per student, the training time of both (``fit`` calls,
evaluation on a small test split included), the teacher forwards the cache still computed
(entries computed / entries served), the time ratio, and whether the two timed runs ended with
the same weights.

Warm-up (untimed): one short student each way on ``4 x --batch-size + (--n mod --batch-size)``
images, so that the timed runs meet no new batch shape (the epoch's short last batch included)
and pay no cuDNN autotuning or first allocation.

Bit-identity: the timed runs use the engine's settings (``cudnn.benchmark`` on CUDA, which may
pick different convolution algorithms run to run, so two *live* runs can already differ there).
The cache's exactness is therefore checked separately (``--identity-students`` students x
``--identity-epochs`` epochs, sharing one fresh cache) with ``cudnn.benchmark`` off and
``cudnn.deterministic`` on: per student, a live run, a second live run and a cached run; the
cache is exact if cached == live, and the check is only conclusive where live == live (other
non-deterministic CUDA kernels, e.g. atomics in a backward, can differ run to run).
(``torch.use_deterministic_algorithms`` is not used for it: per PyTorch's documentation it raises
on CUDA in ``nll_loss`` and in ``AdaptiveAvgPool2d``'s backward, both in every KD step here. One
KD step under it — what the recipe option ``deterministic = true`` does — is tried and its outcome
printed, so the first GPU run says whether that option works there.)

Below the tables, the expected share of teacher forwards saved on the paper's CIFAR-100 grid
(nothing is timed there): with ``E`` epochs and ``k`` students drawing views of one teacher,
an image's 162 views are computed 162 (1 - (1 - 1/162)^(kE)) times instead of kE.

Quick CPU run (~3 minutes on 2 cores; 30 epochs x 3 students = 90 draws per image):
    python benchmarks/logit_cache.py --device cpu --threads 2 --width-mult 0.25 --n 512 \\
        --n-test 128 --epochs 30
GPU:
    python benchmarks/logit_cache.py --device cuda --n 50000 --epochs 3 --students 2
"""
from __future__ import annotations

import argparse
import sys
import time

import _common as C
import torch

VIEWS = 162


def train_students(args, device, train, test, teacher, students: int, epochs: int,
                   modes=("live", "cache")) -> list[dict]:
    """Each student in every mode of ``modes`` in turn ("cache": the keeper's shared table):
    one dict per student, mode -> {seconds, weights, computed, served}."""
    from kdbench.engine.logit_cache import LogitCacheKeeper
    from kdbench.engine.loop import fit
    from kdbench.engine.reproducibility import data_generator, weights_sha256

    _, s_name = C.pair_models(args.pair)
    keeper = LogitCacheKeeper(device, args.precision)  # as RunTrainer holds it over a grid
    out = []
    for seed in range(students):
        runs = {}
        for mode in modes:
            torch.manual_seed(seed)
            student = C.build_net(s_name, args.width_mult, 100, device)
            task = C.student_task(student, teacher, train, device, precision=args.precision)
            report = None
            if mode == "cache":
                report = keeper.attach("teacher", args.batch_size, task, train)
            C.sync(device)
            t0 = time.perf_counter()
            try:
                fit(task, C.schedule(args.batch_size, epochs=epochs), train, test, device,
                    args.precision, data_generator(seed, device), C.NoProgress(), args.eval_batch_size)
            finally:
                keeper.release()
            C.sync(device)
            stats = report() if report is not None else {}
            if report is not None and not stats.get("used"):
                raise RuntimeError(f"the logit cache was not used: {stats.get('why_not')}")
            runs[mode] = {"seconds": time.perf_counter() - t0,
                          "weights": weights_sha256(student.state_dict()),
                          "computed": stats.get("entries_computed", 0),
                          "served": stats.get("entries_served", 0),
                          "cast": bool(task.teacher_cast_once)}
            C.log(f"student {seed} {mode:6s}: {runs[mode]['seconds']:.2f} s")
        out.append(runs)
    return out


def deterministic_probe(args, device, train, teacher) -> str:
    """One KD step under the engine's ``deterministic = true`` (``seed_everything(seed, True)``:
    ``torch.use_deterministic_algorithms(True)``): does it run on this device? The settings are
    restored after."""
    from kdbench.engine.loop import make_optimizer, train_step
    from kdbench.engine.reproducibility import data_generator, seed_everything

    _, s_name = C.pair_models(args.pair)
    try:
        seed_everything(0, deterministic=True)
        student = C.build_net(s_name, args.width_mult, 100, device)
        task = C.student_task(student, teacher, train, device, precision=args.precision)
        opt, _ = make_optimizer(C.trained_params(task), C.schedule(args.batch_size), device)
        batch = next(train.train_batches(args.batch_size, data_generator(0, device), task.views))
        loss, _, _ = train_step(task, batch, opt, device, args.precision)
        C.sync(device)
        return f"runs (loss {float(loss.detach()):.3f})"
    except Exception as exc:
        return f"**raises** {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        seed_everything(0, deterministic=False)


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
    ap.add_argument("--identity-students", type=int, default=2,
                    help="students of the bit-identity check (0: skip it)")
    ap.add_argument("--identity-epochs", type=int, default=1)
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

    from kdbench.engine.reproducibility import seed_everything

    seed_everything(0, deterministic=False)  # as the runner: cudnn.benchmark on CUDA
    data = C.image_data(*C.synthetic_images(args.n, seed=0))
    train = C.device_data(data, device)
    test = C.device_data(C.image_data(*C.synthetic_images(args.n_test, seed=1)), device)
    t_name, _ = C.pair_models(args.pair)
    torch.manual_seed(1234)
    teacher = C.frozen_teacher(t_name, args.width_mult, 100, device)
    # Warm-up (untimed): one short student each way, on every batch shape of the timed epochs.
    tail = args.n % args.batch_size
    warm_n = 4 * args.batch_size + (tail if tail >= 2 else 0)
    small = C.device_data(C.image_data(data.images[:warm_n], data.labels[:warm_n]), device)
    train_students(args, device, small, test, teacher, 1, 1)
    results = train_students(args, device, train, test, teacher, args.students, args.epochs)

    identity = []
    if args.identity_students:
        cudnn = torch.backends.cudnn
        saved = cudnn.benchmark, cudnn.deterministic
        cudnn.benchmark, cudnn.deterministic = False, True
        try:
            C.log("bit-identity check: cudnn.benchmark off, cudnn.deterministic on")
            identity = train_students(args, device, train, test, teacher, args.identity_students,
                                      args.identity_epochs, modes=("live", "live2", "cache"))
        finally:
            cudnn.benchmark, cudnn.deterministic = saved
    probe = deterministic_probe(args, device, train, teacher) if args.identity_students else None

    cast = results[0]["live"]["cast"]
    print(f"\n*{args.students} KD students of one frozen {t_name} teacher ({args.pair}, width "
          f"x{args.width_mult}, precision {args.precision}"
          f"{', teacher cast once' if cast else ''}), {args.epochs} epochs of {args.n} random "
          f"3x32x32 images, batch {args.batch_size}; live teacher, then one logit cache shared by "
          f"the students in turn (each student live, then cached), the engine's settings "
          f"(cudnn.benchmark on CUDA). {C.device_label(device)}; {C.machine()}.*\n")
    rows = []
    for i, r in enumerate(results):
        a, b = r["live"], r["cache"]
        rows.append([f"student {i}", f"{a['seconds']:.2f}", f"{b['seconds']:.2f}",
                     f"{b['computed']:,} / {b['served']:,}", f"{a['seconds'] / b['seconds']:.2f}x",
                     "yes" if a["weights"] == b["weights"] else "no"])
    live, cached = [r["live"] for r in results], [r["cache"] for r in results]
    total_live, total_cache = sum(r["seconds"] for r in live), sum(r["seconds"] for r in cached)
    computed, served = sum(r["computed"] for r in cached), sum(r["served"] for r in cached)
    rows.append(["all", f"{total_live:.2f}", f"{total_cache:.2f}", f"{computed:,} / {served:,}",
                 f"**{total_live / total_cache:.2f}x**",
                 "yes" if all(r["live"]["weights"] == r["cache"]["weights"] for r in results) else "no"])
    print(C.md_table(["run", "live s", "cache s", "teacher forwards (computed / served)",
                      "live / cache", "same weights (timed runs)"], rows, right={1, 2, 3, 4}))
    if identity:
        print(f"\nBit-identity of the cache ({args.identity_students} students x "
              f"{args.identity_epochs} epoch(s), one fresh shared cache, cudnn.benchmark off, "
              "cudnn.deterministic on):\n")
        irows = []
        for i, r in enumerate(identity):
            same_live = r["live"]["weights"] == r["live2"]["weights"]
            exact = r["live"]["weights"] == r["cache"]["weights"]
            verdict = ("**exact**" if exact and same_live else
                       "inconclusive (two live runs differ)" if not same_live else "**NOT exact**")
            irows.append([f"student {i}", "yes" if same_live else "no", "yes" if exact else "no",
                          f"{r['cache']['computed']:,} / {r['cache']['served']:,}", verdict])
        print(C.md_table(["run", "live == live", "cache == live", "teacher forwards (computed / "
                          "served)", "cache"], irows, right={3}))
    if probe is not None:
        print(f"\nA KD step under the recipe option deterministic = true "
              f"(torch.use_deterministic_algorithms(True)) on {C.device_label(device)}: {probe}.")
    print()
    print("\n".join(grid_lines(args)))
    not_exact = any(r["live"]["weights"] == r["live2"]["weights"] != r["cache"]["weights"]
                    for r in identity)
    return 1 if not_exact else 0


if __name__ == "__main__":
    sys.exit(main())
