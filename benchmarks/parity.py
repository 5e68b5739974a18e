"""Loss and gradient parity of every student method and teacher objective across devices/precisions.

For each teacher -> student pair, every registered student method (with its default
parameters, in the engine's ``StudentTask``; teacher frozen) and every registered teacher
objective (in the engine's ``TeacherTask``; plus margin_intra with every sample passing the gate
so that its pipeline and in-batch contrastive paths really compute something) computes its loss
terms on ONE batch and backpropagates them, in two configurations:

* ``--device cuda``: reference = CPU fp32, candidate = CUDA fp32 with TF32 off (matmuls and
  cuDNN convolutions in IEEE fp32). This is the CPU-vs-GPU check.
* ``--device cpu``: reference = CPU fp64, candidate = CPU fp32. There is no second device, so
  this checks that every plugin's loss is numerically sound in fp32 (the same kind of rounding
  difference a GPU introduces) and that the harness runs; it is NOT a CPU-vs-GPU check.

Same weights, same inputs: every model, method and objective is built once on the CPU in fp32
from seed 0 and its state_dict is loaded into the instance built for each configuration (built
as the engine builds it, on the configuration's device); the batch (normalised crop + flip view,
the ``second`` and ``strong`` views, labels, dataset indices, epoch 30 of 90 so ReviewKD's
warm-up factor is 1) is made on the CPU and cast/copied. CRD draws random negatives on its
device; the harness draws them once on the CPU and hands the same ones to both configurations.
The labels of the synthetic data use only ``--label-classes`` (default 4) of the 100 classes, so
that a batch has same-class samples (the intra-class objectives need them).

Check (stated tolerance): every loss term c of the candidate against r of the reference:
``|c - r| <= atol + rtol * |r|`` (default rtol 1e-4, atol 1e-6); and the gradient over every
trained parameter (student + method modules, or teacher + objective modules):
``||g_c - g_r|| / ||g_r|| <= grad_rtol`` (default 2e-2) — or, in ``--device cuda`` mode, at
most 3 times the CPU's own fp32 rounding error of that gradient, measured by a third run in CPU
fp64 (column "cpu fp32 vs fp64 grad err"; ``--no-fp64`` skips it). The gradient tolerance is
loose on purpose: at random initialisation the first layers of a deep teacher get gradients
whose fp32 rounding error against fp64 on the CPU is already large (whole-gradient relative
error: WRN-40-2 2.5e-3, ResNet-50 8.6e-3 at width 0.25 and ~1.4e-2 at width 1, batch 16); loss
terms agree to ~1e-6 relative. The table lists the largest
relative term error and the gradient error of each plugin; the exit status is 1 if any check
fails. In ``--device cpu`` mode a plugin that cannot run in fp64 at all (CRD computes its
memory-bank scores in fp32 by design) is reported as skipped after its fp32 run succeeded.

    python benchmarks/parity.py --device cpu --width-mult 0.25          # ~1 minute
    python benchmarks/parity.py --device cuda --pairs wrn_40_2->wrn_16_2,resnet50->mobilenetv2
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import _common as C
import torch

TEACHER_VARIANTS = {  # label -> (objective, params); the registry's objectives are added too
    "margin_intra (all pass, P=2)": ("margin_intra", {"delta": -1.0, "pipeline_size": 2}),
    "margin_intra (all pass, in-batch)": ("margin_intra", {"delta": -1.0, "pipeline_size": 0}),
}


def ieee_fp32():
    """TF32 off for matmuls and cuDNN (new API when present; never mix it with the legacy)."""
    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
        cudnn.conv.fp32_precision = "ieee"
        cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def make_batch(args):
    """One CPU batch (float32) and the small training set it comes from."""
    from kdbench.api import Batch
    from kdbench.data.loader import VIEW_MAKERS, DeviceData

    images, _ = C.synthetic_images(args.n, seed=0)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, args.label_classes, (args.n,), generator=g)
    data = DeviceData(C.image_data(images, labels), torch.device("cpu"))
    index = torch.randperm(args.n, generator=g)[:args.batch]
    raw = data.images[index]
    from kdbench.data.augment import random_crop_flip

    batch = Batch(x=data.normalize(random_crop_flip(raw, g)), y=data.labels[index], index=index,
                  views={v: data.normalize(VIEW_MAKERS[v](raw, g)) for v in ("second", "strong")},
                  epoch=30, epochs=90, step=30 * (args.n // args.batch))
    return data, batch


def batch_to(batch, device, dtype):
    from kdbench.api import Batch

    return Batch(x=batch.x.to(device, dtype), y=batch.y.to(device), index=batch.index.to(device),
                 views={k: v.to(device, dtype) for k, v in batch.views.items()},
                 epoch=batch.epoch, epochs=batch.epochs, step=batch.step)


def flat_grad(modules):
    gs = []
    seen = set()
    for m in modules:
        for p in m.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            gs.append((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      .double().cpu())
    return torch.cat(gs) if gs else torch.zeros(0, dtype=torch.float64)


class Pair:
    """The CPU fp32 reference weights of one pair, and builders for any (device, dtype)."""

    def __init__(self, label, args, data):
        self.t_name, self.s_name = C.pair_models(label)
        self.args, self.data = args, data
        torch.manual_seed(0)
        self.teacher_state = C.build_net(self.t_name, args.width_mult, 100, "cpu").state_dict()
        self.student_state = C.build_net(self.s_name, args.width_mult, 100, "cpu").state_dict()

    def nets(self, device, dtype, teacher_trains=False):
        teacher = C.build_net(self.t_name, self.args.width_mult, 100, "cpu")
        teacher.load_state_dict(self.teacher_state)
        teacher = teacher.to(device, dtype)
        if not teacher_trains:
            teacher.eval()
            teacher.requires_grad_(False)
        student = C.build_net(self.s_name, self.args.width_mult, 100, "cpu")
        student.load_state_dict(self.student_state)
        return teacher, student.to(device, dtype)

    def dummy(self, model, device, dtype):
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(self.data.normalize(self.data.images[:2]).to(device, dtype))
        model.train(was)
        return out

    def method_setup(self, student, teacher, device, dtype):
        from kdbench.api import MethodSetup

        return MethodSetup(student=student, teacher=teacher,
                           student_out=self.dummy(student, device, dtype),
                           teacher_out=self.dummy(teacher, device, dtype),
                           num_classes=100, num_train_samples=len(self.data),
                           train_labels=self.data.labels.to(device), image_size=32,
                           device=torch.device(device))

    def objective_setup(self, model, device, dtype):
        from kdbench.api import ObjectiveSetup

        return ObjectiveSetup(model=model, model_out=self.dummy(model, device, dtype),
                              num_classes=100, num_train_samples=len(self.data), image_size=32,
                              device=torch.device(device))


def run_student(pair, name, batch, device, dtype, ref_state, negatives):
    """Loss terms and gradient of ``name`` on one batch in (device, dtype)."""
    from kdbench.engine.runner import StudentTask

    plugin = C.registry().find("student_method", name)
    teacher, student = pair.nets(device, dtype)
    torch.manual_seed(1)
    method = plugin.factory(plugin.params.model_validate({}),
                            pair.method_setup(student, teacher, device, dtype))
    method.load_state_dict(ref_state)
    method = method.to(device, dtype)
    if negatives is not None:  # CRD: the same random negatives on every device
        neg = negatives.to(device)
        method.sample_negatives = lambda idx, generator=None: neg
    return terms_and_gradient(StudentTask(student, teacher, [(name, 1.0, method)]), batch, device, dtype)


def run_teacher(pair, name, params, batch, device, dtype, ref_state):
    from kdbench.engine.runner import TeacherTask

    plugin = C.registry().find("teacher_objective", name)
    teacher, _ = pair.nets(device, dtype, teacher_trains=True)
    teacher.train()
    torch.manual_seed(1)
    objective = plugin.factory(plugin.params.model_validate(params),
                               pair.objective_setup(teacher, device, dtype))
    objective.load_state_dict(ref_state)
    objective = objective.to(device, dtype)
    return terms_and_gradient(TeacherTask(teacher, objective), batch, device, dtype)


def terms_and_gradient(task, batch, device, dtype):
    """The task's loss terms on ``batch`` (train mode) and the gradient of their sum."""
    for m in task.modules():
        m.train()
    terms, _ = task.loss_terms(batch_to(batch, device, dtype))
    sum(terms.values()).backward()
    return ({k: float(v.detach().double().cpu()) for k, v in terms.items()},
            flat_grad(task.modules()))


def reference_states(pair, kind, name, params):
    """state_dict of the plugin built on the CPU in fp32 from seed 1 (and CRD's negatives)."""
    teacher, student = pair.nets("cpu", torch.float32, teacher_trains=(kind == "teacher"))
    torch.manual_seed(1)
    if kind == "student":
        plugin = C.registry().find("student_method", name)
        module = plugin.factory(plugin.params.model_validate(params),
                                pair.method_setup(student, teacher, "cpu", torch.float32))
    else:
        plugin = C.registry().find("teacher_objective", name)
        module = plugin.factory(plugin.params.model_validate(params),
                                pair.objective_setup(teacher, "cpu", torch.float32))
    negatives = None
    if hasattr(module, "sample_negatives"):
        negatives = module.sample_negatives(pair.batch.index,
                                            generator=torch.Generator().manual_seed(5))
    return copy.deepcopy(module.state_dict()), negatives


def rel_err(a, b):
    """||a - b|| / ||b|| of two flat gradients (||a|| if b is zero)."""
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else a.norm().item()


def compare(ref, cand, args, ref64=None):
    """Terms: |c - r| <= atol + rtol |r|. Gradient: rel. error <= grad_rtol, or (when an fp64
    run of the reference device exists) <= 3x the reference's own fp32 rounding error."""
    (rt, rg), (ct, cg) = ref, cand
    worst, ok = 0.0, True
    if set(rt) != set(ct):
        return {"ok": False, "term_err": float("nan"), "grad_err": float("nan"),
                "noise": float("nan"), "note": f"different terms {sorted(rt)} vs {sorted(ct)}"}
    for k in rt:
        err = abs(ct[k] - rt[k])
        ok &= err <= args.atol + args.rtol * abs(rt[k])
        worst = max(worst, err / max(abs(rt[k]), 1e-30)) if err else worst
    gerr = rel_err(cg, rg)
    noise = rel_err(rg, ref64[1]) if ref64 is not None else float("nan")
    ok &= gerr <= max(args.grad_rtol, 3 * noise if ref64 is not None else 0.0)
    return {"ok": bool(ok), "term_err": worst, "grad_err": gerr, "noise": noise, "note": ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="cuda: CPU fp32 vs CUDA fp32; cpu: CPU fp64 vs CPU fp32")
    ap.add_argument("--pairs", default="wrn_40_2->wrn_16_2",
                    help="comma-separated teacher->student")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=256, help="training-set size (CRD's banks)")
    ap.add_argument("--label-classes", type=int, default=4)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--grad-rtol", type=float, default=2e-2,
                    help="relative L2 error of the whole gradient (see the docstring for why "
                    "it is looser than rtol)")
    ap.add_argument("--no-fp64", action="store_true",
                    help="cuda mode: skip the CPU fp64 runs that calibrate the gradient check")
    ap.add_argument("--_dry-cuda-mode", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None, help="comma-separated plugin names (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_devices(args.device)[0]
    ieee_fp32()
    if args._dry_cuda_mode:  # test the cuda-mode code path without a GPU: CPU vs CPU fp32
        device = "cuda"
        ref_cfg, cand_cfg = ("cpu", torch.float32), ("cpu", torch.float32)
    elif device == "cuda":
        ref_cfg, cand_cfg = ("cpu", torch.float32), ("cuda", torch.float32)
    else:
        ref_cfg, cand_cfg = ("cpu", torch.float64), ("cpu", torch.float32)
        C.log("parity --device cpu: no second device; comparing CPU fp64 (reference) with "
              "CPU fp32 — a numerical-soundness check, not CPU-vs-GPU")
    data, batch = make_batch(args)
    reg = C.registry()
    only = None if args.only is None else {s.strip() for s in args.only.split(",")}
    plugins = [("student", n, {}, n) for n in reg.names("student_method")]
    plugins += [("teacher", n, {}, n) for n in reg.names("teacher_objective")]
    plugins += [("teacher", n, p, label) for label, (n, p) in TEACHER_VARIANTS.items()
                if n in reg.names("teacher_objective")]
    if only:
        plugins = [p for p in plugins if p[1] in only]

    rows, failures, skips = [], 0, 0
    for label in C.parse_pairs(args.pairs):
        pair = Pair(label, args, data)
        pair.batch = batch
        for kind, name, params, shown in plugins:
            t0 = time.perf_counter()
            try:
                state, negatives = reference_states(pair, kind, name, params)

                def run(cfg):
                    if kind == "student":
                        return run_student(pair, name, batch, *cfg, state, negatives)
                    return run_teacher(pair, name, params, batch, *cfg, state)

                cand = run(cand_cfg)
                try:
                    ref = run(ref_cfg)
                except Exception as exc:
                    if ref_cfg[1] != torch.float64:
                        raise
                    # The engine never runs fp64: a plugin that computes in fp32 internally
                    # (CRD's banks) cannot be referenced in fp64. Its fp32 run worked.
                    ref, skipped = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
                if ref is None:
                    res = {"ok": True, "skipped": True, "term_err": float("nan"),
                           "grad_err": float("nan"), "noise": float("nan"),
                           "note": f"fp64 reference impossible ({skipped})"}
                    terms = ", ".join(f"{k}={v:.5g}" for k, v in cand[0].items()) + " (fp32)"
                else:
                    ref64 = None
                    if ref_cfg[1] != torch.float64 and not args.no_fp64:
                        try:  # the reference device's own fp32 rounding error, for the grads
                            ref64 = run((ref_cfg[0], torch.float64))
                        except Exception:
                            pass  # e.g. CRD: fixed gradient tolerance only
                    res = compare(ref, cand, args, ref64)
                    terms = ", ".join(f"{k}={v:.5g}" for k, v in ref[0].items())
            except Exception as exc:  # a plugin that cannot run in a configuration fails
                res = {"ok": False, "term_err": float("nan"), "grad_err": float("nan"),
                       "noise": float("nan"),
                       "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
                terms = ""
            failures += not res["ok"]
            skips += bool(res.get("skipped"))
            verdict = ("skipped" if res.get("skipped") else "ok") if res["ok"] else "FAIL"
            C.log(f"{label} {kind} {shown}: {verdict} term {res['term_err']:.2e} "
                  f"grad {res['grad_err']:.2e} ({time.perf_counter() - t0:.1f}s) {res['note']}")
            rows.append([label, f"{kind}: {shown}", terms or res["note"],
                         f"{res['term_err']:.1e}", f"{res['grad_err']:.1e}",
                         *([f"{res['noise']:.1e}"] if device == "cuda" else []),
                         {"ok": "ok", "skipped": f"skipped: {res['note']}",
                          "FAIL": f"**FAIL** {res['note']}".strip()}[verdict]])

    ref_s = f"{ref_cfg[0]} {str(ref_cfg[1]).replace('torch.', '')}"
    cand_s = f"{cand_cfg[0]} {str(cand_cfg[1]).replace('torch.', '')}"
    print(f"\n*Parity of loss terms and gradients on one batch of {args.batch} (width "
          f"x{args.width_mult}): {cand_s} against {ref_s}"
          f"{' (TF32 off)' if device == 'cuda' else ''}; pass if every term "
          f"|c-r| <= {args.atol:g} + {args.rtol:g}|r| and ||g_c-g_r||/||g_r|| <= "
          f"{args.grad_rtol:g}"
          f"{' or <= 3x the CPU fp32-vs-fp64 gradient error' if device == 'cuda' else ''}. "
          f"{C.machine()}.*\n")
    noise_col = ["cpu fp32 vs fp64 grad err"] if device == "cuda" else []
    print(C.md_table(["pair", "plugin", f"terms ({ref_s})", "max rel. term err",
                      "grad rel. err", *noise_col, "result"], rows,
                     right={3, 4, 5} if noise_col else {3, 4}))
    print(f"\n{len(rows) - failures - skips}/{len(rows)} passed, {skips} skipped, "
          f"{failures} failed.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
