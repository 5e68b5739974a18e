"""Loss and gradient parity of every student method and teacher objective: the device's training
path against a CPU reference, per method, on one batch.

For each teacher -> student pair, every registered student method (default parameters, weight 1,
in the engine's ``StudentTask`` from ``tasks.build_student_task``; teacher frozen) and every
registered teacher objective (``TeacherTask`` from ``tasks.build_teacher_task``; plus
margin_intra with every sample passing the gate, with the per-class pipeline P=2 and in-batch,
so that its contrastive paths really compute) takes ONE training step — a method with an
initialisation stage (AB, FT, FSP) also one step of that stage, as the engine runs it
(``tasks.InitTask``: row ``<method> [init stage]``); AB's and FSP's main rows are skipped, as
those methods have no main-schedule term —
``loop.train_step`` (autocast, forward, loss terms, backward, the optimizer of
``loop.make_optimizer``: fused SGD on CUDA, foreach on the CPU), in a reference and a candidate
configuration. Compared: every loss term, the gradient of the student (of the teacher, for a
teacher objective) and the SGD update of every trained parameter (student or teacher + the
method's or objective's own modules).

Checks (``--checks``):

* ``engine`` — the path the engine trains with: candidate = ``--device`` at ``--precision``
  (``auto``: bf16 autocast on CUDA) with the engine's layout (``tasks.place_model`` and
  ``DeviceData``: channels_last nets and batches on CUDA), the frozen teacher cast once to bf16
  (``build_student_task``), PyTorch's default TF32 settings and the engine's optimizer (fused SGD
  on CUDA); reference = CPU fp32, contiguous, no autocast. Tolerances sized for bf16 (below).
  On the CPU, ``--precision bf16`` runs the same path with CPU bf16 autocast: the stand-in that
  finds a dtype or layout crash before a GPU is lent.
* ``fp32`` — candidate = ``--device`` in fp32 (TF32 off for matmuls and cuDNN), engine layout
  and optimizer; reference = CPU fp32. The kernels' parity without bf16 rounding. Tolerances:
  terms ``|c - r| <= 1e-6 + 1e-4 |r|``, gradients and updates relative L2 error <= 2e-2 (deep
  teachers at random init have ~1% fp32 gradient error in their first layers: see ``fp64``).
  On the CPU this would compare the CPU with itself and is not offered.
* ``fp64`` — CPU only: candidate = CPU fp32, reference = CPU fp64 (a check of every plugin's
  fp32 numerics and of the harness; CRD computes its memory-bank scores in fp32 by design and
  cannot run in fp64: reported as skipped after its fp32 run).

Default: ``engine,fp32`` on CUDA; on the CPU ``engine`` with ``--precision bf16``, else ``fp64``.

Tolerances of the ``engine`` check, and why. Under autocast every convolution and linear output
is rounded to bf16 (8 significant bits, unit roundoff 2^-9 = 0.2%) and the next layer computes
from it; the plugins up-cast to fp32 inside their losses, so the loss arithmetic itself adds
little, but its inputs (the nets' logits and features) already differ from fp32 by ~0.5-3%
(through 16 to 50 layers), and so do the gradients flowing back through bf16 activations. So:
terms ``|c - r| <= 0.02 |r| + 0.002 * max(1, |loss|)`` (the absolute part covers terms near 0,
e.g. a KL between two near-uniform softmaxes), student gradient and update relative L2 error
<= 0.15. Two methods get more, honestly: MLLD's batch- and class-level terms use median masks
over bf16 outputs (a sample whose confidence sits next to the median flips side between bf16
and fp32, moving its whole contribution) and RKD's distance and angle terms normalise by a mean
pairwise distance of bf16 features (its relative error is that of a difference of close
numbers): terms 0.06 relative, gradient and update 0.30. These tolerances catch what breaks on a
GPU — a wrong dtype, layout or cast, a NaN, a missing up-cast (errors of 10-100%), not a
percent. The values measured on the CPU (CPU bf16 autocast vs CPU fp32, README) are well inside.

Same weights, same inputs: nets are built once on the CPU in fp32 from seed 0 and their
state_dicts loaded into every configuration's instance (built by the engine's builders on that
configuration's device); each method's or objective's modules are built from seed 1 by the
reference's builder and their state_dict loaded into the candidate's; the batch (normalised crop
+ flip view, the ``second`` and ``strong`` views, labels, dataset indices, epoch 30 of 90 so
ReviewKD's warm-up factor is 1) is made on the CPU and copied in each configuration's batch
layout; CRD's random negatives are drawn once on the CPU and handed to every configuration.
The labels of the synthetic data use only ``--label-classes`` (default 4) of the 100 classes, so
that a batch has same-class samples (the intra-class objectives need them). ``--fp64-noise`` (CUDA
fp32 check) also measures the CPU's own fp32-vs-fp64 gradient error and accepts up to 3x it.
Exit status 1 if any check fails.

    python benchmarks/parity.py --device cpu --width-mult 0.25                    # fp64 vs fp32
    python benchmarks/parity.py --device cpu --precision bf16 --width-mult 0.25   # engine, CPU
    python benchmarks/parity.py --device cuda --pairs wrn_40_2->wrn_16_2          # engine + fp32
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import sys
import time

import _common as C
import torch

TEACHER_VARIANTS = {  # label -> (objective, params); the registry's objectives are added too
    "margin_intra (all pass, P=2)": ("margin_intra", {"delta": -1.0, "pipeline_size": 2}),
    "margin_intra (all pass, in-batch)": ("margin_intra", {"delta": -1.0, "pipeline_size": 0}),
}
# (term rtol, term atol as a fraction of max(1, |loss|), classifier-gradient relative L2 error,
#  whole-gradient and update relative L2 error); the docstring says why.
TOLERANCES = {
    "fp32": (1e-4, 1e-6, 1e-3, 2e-2),
    "fp64": (1e-4, 1e-6, 1e-3, 2e-2),
    "engine": (2e-2, 2e-3, 5e-2, 0.8),
}
ENGINE_LOOSER = {"mlld": (6e-2, 5e-3, 0.15, 0.8), "rkd": (6e-2, 5e-3, 0.15, 0.8)}


@contextlib.contextmanager
def fp32_math(ieee: bool):
    """TF32 off for matmuls and cuDNN while ``ieee`` (new API when present, never mixed with the
    legacy one); otherwise PyTorch's settings as they are (the engine's). Restored after."""
    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
        objs = [(cudnn.conv, "fp32_precision"), (cudnn.rnn, "fp32_precision"),
                (torch.backends.cuda.matmul, "fp32_precision")]
        value = "ieee"
    else:
        objs = [(cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
        value = False
    saved = [getattr(o, a) for o, a in objs]
    try:
        if ieee:
            for o, a in objs:
                setattr(o, a, value)
        yield
    finally:
        for (o, a), v in zip(objs, saved):
            setattr(o, a, v)


class Config:
    """One configuration: device, dtype of nets and inputs, the autocast precision, the data."""

    def __init__(self, name, device, dtype, precision, args, images, labels):
        self.name, self.device, self.dtype, self.precision = name, torch.device(device), dtype, precision
        self.ieee = name == "fp32 candidate"
        self.data = C.device_data(C.image_data(images, labels), self.device)
        self.layout = C.batch_layout(self.data)

    def describe(self) -> str:
        if self.dtype == torch.float64:
            return f"{self.device.type} fp64"
        p = C.resolve_precision(self.device, self.precision)
        amp = "bf16 autocast" if p == "bf16" else "fp32"
        tf32 = ", TF32 off" if self.ieee and self.device.type == "cuda" else ""
        return f"{self.device.type} {amp}, {self.layout}{tf32}"

    def batch(self, batch):
        from kdbench.api import Batch

        def move(x):
            x = x.to(self.device, self.dtype)
            return x.contiguous(memory_format=C.memory_format(self.layout)) \
                if self.layout in ("channels_last", "contiguous") else x

        return Batch(x=move(batch.x), y=batch.y.to(self.device), index=batch.index.to(self.device),
                     views={k: move(v) for k, v in batch.views.items()},
                     epoch=batch.epoch, epochs=batch.epochs, step=batch.step)


def make_batch(args):
    """One CPU batch (float32) and the small training set (images, labels) it comes from."""
    from kdbench.api import Batch
    from kdbench.data.augment import random_crop_flip

    images, _ = C.synthetic_images(args.n, seed=0)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, args.label_classes, (args.n,), generator=g)
    data = C.device_data(C.image_data(images, labels), "cpu")
    makers = C.registry().view_makers()
    index = torch.randperm(args.n, generator=g)[:args.batch]
    raw = data.images[index]
    batch = Batch(x=data.normalize(random_crop_flip(raw, g)), y=data.labels[index], index=index,
                  views={v: data.normalize(makers[v](raw, g)) for v in ("second", "strong")},
                  epoch=30, epochs=90, step=30 * (args.n // args.batch))
    return images, labels, batch


def flat(tensors):
    out = [t.detach().reshape(-1).double().cpu() for t in tensors]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class Pair:
    """The CPU fp32 weights of one pair's nets, and the nets for any configuration."""

    def __init__(self, label, args):
        self.t_name, self.s_name = C.pair_models(label)
        self.args = args
        torch.manual_seed(0)
        self.teacher_state = C.build_net(self.t_name, args.width_mult, 100, "cpu").state_dict()
        self.student_state = C.build_net(self.s_name, args.width_mult, 100, "cpu").state_dict()

    def net(self, name, state, cfg):
        model = C.build_net(name, self.args.width_mult, 100, cfg.device)  # the engine's layout
        model.load_state_dict(state)
        return model.to(cfg.dtype) if cfg.dtype != torch.float32 else model


def build_task(pair, kind, name, params, cfg, ref_state=None, negatives=None):
    """The engine's task for one plugin in ``cfg`` (module weights from ``ref_state``)."""
    torch.manual_seed(1)
    if kind in ("student", "student-init"):
        teacher = C.freeze(pair.net(pair.t_name, pair.teacher_state, cfg))
        student = pair.net(pair.s_name, pair.student_state, cfg)
        task = C.student_task(student, teacher, cfg.data, cfg.device, methods=[(name, 1.0, params)],
                              precision=cfg.precision)
        module = task.methods[0][2]
        model = student
        if kind == "student-init":  # the method's initialisation stage, as the engine runs it
            from kdbench.engine.tasks import InitTask

            task = InitTask(student, teacher, module.init_stage())
    else:
        model = pair.net(pair.t_name, pair.teacher_state, cfg)
        task = C.teacher_task(model, (name, params), cfg.data, cfg.device)
        module = task.objective
    if cfg.dtype != torch.float32:
        module.to(cfg.dtype)
    if ref_state is not None:
        module.load_state_dict(ref_state)
    if negatives is not None:  # CRD: the same random negatives in every configuration
        neg = negatives.to(cfg.device)
        module.sample_negatives = lambda idx, generator=None: neg
    return task, model, module


class NothingToCompare(Exception):
    """The plugin's step has nothing of its own to compare (its row is skipped, and says why)."""


def main_terms(task, batch) -> bool:
    """Whether a student task's main-schedule step has any loss term (probed without gradient,
    on a task built only for this)."""
    with torch.no_grad():
        terms, _ = task.loss_terms(batch)
    return bool(terms)


def classifier(model):
    """The model's last ``nn.Linear`` (its classifier)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def one_step(task, model, batch, cfg):
    """``loop.train_step`` with the engine's optimizer: terms, the model's gradient, its
    classifier's gradient, the update of every trained parameter, whether the teacher was cast."""
    from kdbench.engine.loop import make_optimizer, train_step

    for m in task.modules():
        m.train()
    params = C.trained_params(task)
    optimizer, _ = make_optimizer(params, C.schedule(batch.x.shape[0]), cfg.device)
    before = [p.detach().clone() for p in params]
    with fp32_math(cfg.ieee):
        _, terms, _ = train_step(task, cfg.batch(batch), optimizer, cfg.device, cfg.precision)
    def grads(module):
        return flat([p.grad if p.grad is not None else torch.zeros_like(p)
                     for p in module.parameters() if p.requires_grad])

    head = classifier(model)
    return ({k: float(v.detach().double().cpu()) for k, v in terms.items()}, grads(model),
            grads(head) if head is not None else flat([]),
            flat([p.detach() - b for p, b in zip(params, before)]),
            getattr(task, "teacher_cast_once", False))


def rel_err(a, b):
    """||a - b|| / ||b|| of two flat vectors (||a|| if b is zero)."""
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else a.norm().item()


NAN = float("nan")


class Stopped(BaseException):
    """SIGTERM (a stage's time limit): stop checking, print the table of what was checked."""


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum}")


def failed(note: str, cast=False, ok=False, skipped=False) -> dict:
    return {"ok": ok, "skipped": skipped, "terms": {}, "grad": NAN, "head": NAN, "update": NAN,
            "note": note, "cast": cast}


def error_note(exc: Exception, n: int = 120) -> str:
    text = str(exc).splitlines()[0][:n] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def tolerance(check: str, name: str, engine_precision: str):
    if check == "engine":
        return ENGINE_LOOSER.get(name, TOLERANCES["engine"]) if engine_precision == "bf16" \
            else TOLERANCES["fp32"]
    return TOLERANCES[check]


def compare(ref, cand, tol, noise=None):
    """Every term: |c - r| <= atol * max(1, |loss|) + rtol |r|; classifier gradient: relative L2
    error <= htol; whole gradient and update: relative L2 error <= gtol (or 3x ``noise``, the
    reference's own fp32 rounding error, if given)."""
    (rt, rg, rh, ru, _), (ct, cg, ch, cu, cast) = ref, cand
    rtol, atol, htol, gtol = tol
    if set(rt) != set(ct):
        return failed(f"different terms {sorted(rt)} vs {sorted(ct)}", cast)
    scale = max(1.0, abs(sum(rt.values())))
    ok, terms = True, {}
    for k in rt:
        err = abs(ct[k] - rt[k])
        ok &= err <= atol * scale + rtol * abs(rt[k]) and err == err
        terms[k] = err / max(abs(rt[k]), 1e-30) if err else 0.0
    gerr, herr, uerr = rel_err(cg, rg), rel_err(ch, rh), rel_err(cu, ru)
    limit = max(gtol, 3 * noise) if noise is not None else gtol
    ok &= gerr <= limit and uerr <= limit and herr <= htol
    return {"ok": bool(ok), "skipped": False, "terms": terms, "grad": gerr, "head": herr,
            "update": uerr, "note": "", "cast": cast}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--checks", default=None,
                    help="comma-separated: engine, fp32 (CUDA), fp64 (CPU); default: engine,fp32 "
                    "on CUDA, engine with --precision bf16 on the CPU, else fp64")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="the engine check's precision, as a recipe's (auto: bf16 on CUDA)")
    ap.add_argument("--pairs", default="wrn_40_2->wrn_16_2",
                    help="comma-separated teacher->student")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=256, help="training-set size (CRD's banks)")
    ap.add_argument("--label-classes", type=int, default=4)
    ap.add_argument("--fp64-noise", action="store_true",
                    help="fp32 check: also run CPU fp64 and accept 3x the CPU's own fp32 error")
    ap.add_argument("--only", default=None, help="comma-separated plugin names (default: all)")
    ap.add_argument("--cpu-fp32-dry-run", action="store_true",
                    help="allow the fp32 check on the CPU (CPU against itself: errors 0), so that "
                    "the CPU stand-in of gpu_check.sh runs the CUDA checks' code paths")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_devices(args.device)[0]
    engine_precision = C.resolve_precision(device, args.precision)
    if args.checks is None:
        checks = (["engine", "fp32"] if device == "cuda" else
                  ["engine"] if engine_precision == "bf16" else ["fp64"])
    else:
        checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    for c in checks:
        if c not in TOLERANCES or (c == "fp32" and device != "cuda" and not args.cpu_fp32_dry_run) \
                or (c == "fp64" and device != "cpu"):
            ap.error(f"--checks {c}: use engine, fp32 (CUDA only) or fp64 (CPU only)")
    if "engine" in checks and engine_precision != "bf16":
        C.log(f"engine check at fp32 on {device} (--precision {args.precision}): fp32 tolerances")
    images, labels, batch = make_batch(args)
    cfgs = {"ref": Config("reference", "cpu", torch.float32, "fp32", args, images, labels)}
    if "engine" in checks:
        cfgs["engine"] = Config("engine candidate", device, torch.float32, args.precision, args,
                                images, labels)
    if "fp32" in checks:
        cfgs["fp32"] = Config("fp32 candidate", device, torch.float32, "fp32", args, images, labels)
    if "fp64" in checks or args.fp64_noise:
        cfgs["ref64"] = Config("fp64", "cpu", torch.float64, "fp32", args, images, labels)
    if "fp64" in checks:  # CPU fp32 is the candidate, fp64 the reference
        cfgs["fp64"] = cfgs["ref"]

    reg = C.registry()
    only = None if args.only is None else {s.strip() for s in args.only.split(",")}
    plugins = [("student", n, {}, n) for n in reg.names("student_method")]
    plugins += [("student-init", n, {}, f"{n} [init stage]") for n in reg.names("student_method")
                if C.has_init_stage(reg, n)]
    plugins += [("teacher", n, {}, n) for n in reg.names("teacher_objective")]
    plugins += [("teacher", n, p, label) for label, (n, p) in TEACHER_VARIANTS.items()
                if n in reg.names("teacher_objective")]
    if only:
        plugins = [p for p in plugins if p[1] in only]

    rows, failures, skips, t_start = [], 0, 0, time.perf_counter()
    worst = {c: {"term": 0.0, "head": 0.0, "grad": 0.0, "update": 0.0} for c in checks}
    stopped = None
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for label in C.parse_pairs(args.pairs):
            pair = Pair(label, args)
            for kind, name, params, shown in plugins:
                t0 = time.perf_counter()
                results: dict[str, dict] = {}
                terms_shown = ""
                try:
                    task, model, module = build_task(pair, kind, name, params, cfgs["ref"])
                    if kind == "student" and C.has_init_stage(reg, name) and not main_terms(task, cfgs["ref"].batch(batch)):
                        results = {c: failed("no main-schedule term (it trains in its init stage: "
                                             "see that row)", ok=True, skipped=True) for c in checks}
                        raise NothingToCompare
                    state = copy.deepcopy(module.state_dict())
                    negatives = None
                    if hasattr(module, "sample_negatives"):  # CRD: draw once, hand to every config
                        negatives = module.sample_negatives(batch.index,
                                                            generator=torch.Generator().manual_seed(5))
                        module.sample_negatives = lambda idx, generator=None, neg=negatives: neg
                    ref = one_step(task, model, batch, cfgs["ref"])
                    terms_shown = ", ".join(f"{k}={v:.5g}" for k, v in ref[0].items())
                    del task, model, module
                except NothingToCompare:
                    pass
                except Exception as exc:  # the reference itself failed: every check fails
                    results = {c: failed(f"reference failed: {error_note(exc)}") for c in checks}
                if not results:
                    ref64 = None
                    if "ref64" in cfgs:
                        try:
                            ref64 = one_step(*build_task(pair, kind, name, params, cfgs["ref64"], state,
                                                         negatives)[:2], batch, cfgs["ref64"])
                        except Exception as exc:  # CRD: no fp64 by design
                            ref64 = error_note(exc, 90)
                    for check in checks:
                        tol = tolerance(check, name, engine_precision)
                        try:
                            if check == "fp64":
                                results[check] = (failed(f"no fp64 reference ({ref64})", ok=True, skipped=True)
                                                  if isinstance(ref64, str) else compare(ref64, ref, tol))
                                continue
                            cfg = cfgs[check]
                            cand = one_step(*build_task(pair, kind, name, params, cfg, state,
                                                        negatives)[:2], batch, cfg)
                            noise = None
                            if check == "fp32" and ref64 is not None and not isinstance(ref64, str):
                                noise = rel_err(ref[1], ref64[1])
                            results[check] = compare(ref, cand, tol, noise)
                        except Exception as exc:
                            results[check] = failed(error_note(exc))
                for check, res in results.items():
                    failures += not res["ok"]
                    skips += bool(res["skipped"])
                    verdict = ("skipped" if res["skipped"] else "ok") if res["ok"] else "FAIL"
                    term_errs = ", ".join(f"{k} {v:.1e}" for k, v in res["terms"].items()) or "–"
                    if res["ok"] and not res["skipped"]:
                        w = worst[check]
                        w["term"] = max([w["term"], *res["terms"].values()])
                        for k in ("head", "grad", "update"):
                            w[k] = max(w[k], res[k])
                    tol = tolerance(check, name, engine_precision)
                    C.log(f"{label} {kind} {shown} [{check}]: {verdict} terms {term_errs}, classifier "
                          f"grad {res['head']:.2e}, grad {res['grad']:.2e}, update {res['update']:.2e} "
                          f"({time.perf_counter() - t0:.1f}s) {res['note']}")
                    rows.append([label, f"{kind}: {shown}", check, terms_shown or res["note"], term_errs,
                                 f"{res['head']:.1e}", f"{res['grad']:.1e}", f"{res['update']:.1e}",
                                 f"{tol[0]:g} / {tol[2]:g} / {tol[3]:g}",
                                 {"ok": "ok", "skipped": f"skipped: {res['note']}",
                                  "FAIL": f"**FAIL** {res['note']}".strip()}[verdict]
                                 + (" (teacher cast once)" if res["cast"] else "")])
    except Stopped as exc:  # a time limit (gpu_check.sh): the table of what was checked
        stopped = str(exc)
        failures += 1
    finally:
        signal.signal(signal.SIGTERM, previous)

    pairs_shown = "; ".join(
        f"{c}: {(cfgs['ref'] if c == 'fp64' else cfgs[c]).describe()} vs "
        f"{(cfgs['ref64'] if c == 'fp64' else cfgs['ref']).describe()}" for c in checks)
    print(f"\n*Parity of one training step (loop.train_step, the engine's optimizer) on one batch "
          f"of {args.batch} (width x{args.width_mult}), per plugin; candidate vs reference: "
          f"{pairs_shown}. Relative errors of each loss term, of the student's (teacher's) "
          "gradient, of its classifier's gradient and of the SGD update of all trained "
          "parameters; pass if every term |c-r| <= atol max(1,|loss|) + rtol |r|, the classifier "
          "gradient's error <= its tolerance and the gradient's and update's <= theirs (column "
          "'tol': term rtol / classifier / gradient and update; the script's docstring says why). "
          f"{C.machine()}.*\n")
    print(C.md_table(["pair", "plugin", "check", "terms (cpu fp32)", "rel. term err",
                      "classifier grad rel. err", "student grad rel. err", "update rel. err",
                      "tol", "result"], rows, right={5, 6, 7}))
    print()
    for c in checks:
        w = worst[c]
        print(f"- {c}: largest passing errors: term {w['term']:.1e}, classifier gradient "
              f"{w['head']:.1e}, gradient {w['grad']:.1e}, update {w['update']:.1e}")
    if stopped:
        print(f"\n**PARTIAL**: {stopped} after {len(rows)} checks (counted as one failure).")
    print(f"\n{len(rows) - failures - skips + bool(stopped)}/{len(rows)} passed, {skips} skipped, "
          f"{failures} failed ({time.perf_counter() - t_start:.0f} s).")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
