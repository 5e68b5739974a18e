"""The frozen teacher's forward in a KD step, three ways, measured in one run.

* **no_grad** — what the engine does: ``torch.no_grad()`` under the run's autocast, weights as
  stored (fp32), so autocast casts every conv/linear weight to bf16 at every forward.
* **no_grad, cast once** — the same after ``kdbench.engine.tasks.cast_teacher_once`` (conv and
  linear weights cast to the autocast dtype once; bit-identical outputs), what
  ``build_student_task`` does to a run's teacher after the sizing forward. Only where autocast
  is on (CUDA by default, ``--precision bf16`` on the CPU).
* **inference_mode + clone** — ``torch.inference_mode()``, then every output tensor cloned
  outside it: methods save teacher tensors for their backward (e.g. an MSE target), which
  inference tensors do not allow, so the engine would need that copy.

Per pair (teacher of the pair, random weights, eval mode, built and placed by the engine:
channels_last on CUDA) and batch size: median ms per forward
(including, for the last row, the clones) over ``--rounds`` rounds of ``--iters`` forwards, the
rounds alternating between the variants; ratio to **no_grad** in the same run.

Quick CPU run (~1 minute):
    python benchmarks/teacher_forward.py --device cpu --threads 1 --width-mult 0.25 --batch-sizes 64
GPU:
    python benchmarks/teacher_forward.py --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time

import _common as C
import torch


def variants(teacher, t_name, width_mult, train, device, precision):
    from kdbench.engine.loop import autocast, autocast_dtype
    from kdbench.engine.tasks import cast_teacher_once

    def no_grad(x):
        with torch.no_grad(), autocast(device, precision):
            return teacher(x)

    def inference_clone(x):
        with torch.inference_mode(), autocast(device, precision):
            out = teacher(x)
        return type(out)(out.logits.clone(), [f.clone() for f in out.feats],
                         [f.clone() for f in out.preact_feats], out.pooled.clone())

    out = {"no_grad": no_grad, "inference_mode + clone": inference_clone}
    if autocast_dtype(device, precision) is not None:
        cast_copy = C.frozen_teacher(t_name, width_mult, 100, device)
        cast_copy.load_state_dict(teacher.state_dict())
        assert cast_teacher_once(cast_copy, train, device, precision)

        def cast_once(x):
            with torch.no_grad(), autocast(device, precision):
                return cast_copy(x)
        out["no_grad, cast once"] = cast_once
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--pairs", default="wrn_40_2->wrn_16_2,resnet50->resnet34")
    ap.add_argument("--batch-sizes", default="64,128")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(C.resolve_devices(args.device)[0])
    from kdbench.engine.reproducibility import seed_everything

    seed_everything(0, deterministic=False)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    train = C.device_data(C.image_data(*C.synthetic_images(max(sizes), seed=0)), device)
    rows = []
    for pair in C.parse_pairs(args.pairs):
        t_name, _ = C.pair_models(pair)
        teacher = C.frozen_teacher(t_name, args.width_mult, 100, device)
        ways = variants(teacher, t_name, args.width_mult, train, device, args.precision)
        for bs in sizes:
            x = train.normalize(train.images[:bs])
            times = {name: [] for name in ways}
            for name, fn in ways.items():  # warm-up (cuDNN autotuning, allocations)
                for _ in range(3):
                    fn(x)
            C.sync(device)
            for _ in range(args.rounds):
                for name, fn in ways.items():
                    C.sync(device)
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        fn(x)
                    C.sync(device)
                    times[name].append((time.perf_counter() - t0) / args.iters * 1e3)
            base = C.median(times["no_grad"])
            for name in ways:
                ms = C.median(times[name])
                rows.append([C.device_label(device), f"{t_name} (batch {bs})", name, f"{ms:.3f}",
                             f"{ms / base:.2f}x"])
            C.log(f"{pair} batch {bs}: " + ", ".join(f"{n} {C.median(t):.3f} ms" for n, t in times.items()))
    print(f"\n*Frozen teacher forward (eval mode, random weights, width x{args.width_mult}, "
          f"precision {args.precision}): median of {args.rounds} rounds x {args.iters} forwards. "
          f"{C.machine()}.*\n")
    print(C.md_table(["device", "teacher", "forward", "ms/forward", "x no_grad"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
