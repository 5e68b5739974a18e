"""GPU-hours of the paper's Table 1 (CIFAR-100 column) from measured per-row epoch times.

The grid is the recipe's own (``--recipe``, default ``recipes/cifar100_homogeneous.toml``):
``kdbench.recipe.expand`` gives every run (3 pairs x 11 rows x 5 seeds students, 3 pairs x 2
teacher objectives x 5 seeds teachers), with each run's models, method weights, teacher objective
and schedule. Runs that cost the same (``kdbench.engine.estimate``'s cost key: models, methods or
objective, batch size, teacher model; e.g. KD and Ours, five seeds of a row) are measured once:
every Teacher row (CE and margin objectives), Student, KD, FitNet, RKD, CRD, OFD, ReviewKD, VID,
MLLD, Ours and Ours+RKD of each pair.

Each row's task is built by the engine's ``RunTrainer`` exactly as a run builds it
(``teacher_task``: ``build_teacher_task``; ``student_task``: ``build_student_task`` with the teacher
cast once; ``build_for``: ``place_model``, channels_last on CUDA, compiled if the recipe says so),
on synthetic data of CIFAR-100's shape (``--n`` 50000 train and ``--n-test`` 10000 test uint8
3x32x32 images, 100 classes) instead of the recipe's files. A teacher row is the teacher
objective's real training step (forward of every view, the objective, backward, SGD), not a FLOP
estimate. Per row: ``--warmup`` untimed steps, then ``--steps`` timed steps in one block between
two device syncs (batches drawn by ``DeviceData.train_batches``, ``loop.train_step`` +
``loop.accumulate`` as in ``fit``), and one timed evaluation of ``--n-test`` images (fit evaluates
every evaluated epoch: the recipe's ``eval_every``) after an untimed one. Scaled: run = epochs x
batches per epoch x step time + evaluated epochs x eval; row = runs x run. Not counted:
checkpoint writes (one per epoch), the teacher's final diagnostics pass, process start-up, a
method's initialisation stage (none in this recipe; a row that has one says so).

The margin teacher's cost depends on how many samples pass its gate (rho > delta): at random
initialisation none do, so its measured step is a lower bound; a second, "all pass" measurement
(delta = -1: every sample is cached and re-encoded, one extra forward + backward of 2 views)
bounds it from above. The total uses the upper bound and states the lower one.

Number of steps: ``--steps`` (default 200, about half an epoch at the students' batch 128) per
row; with ``--budget-s`` the rows left share what remains of the budget, so a slow row shortens
the later ones (never below ``--min-steps``) instead of overrunning; the table shows each row's
steps. The rows are measured in the recipe's order (ResNet50 -> ResNet34 first, most of the
cost) and ``--json`` is rewritten after every row, so a run stopped early keeps what it measured.

Quick CPU run (the stand-in; tiny nets, batches capped, numbers meaningless):
    python benchmarks/table1.py --device cpu --width-mult 0.125 --n 272 --n-test 64 \\
        --max-batch 16 --steps 2 --warmup 1
Full run (one GPU):
    python benchmarks/table1.py --device cuda --json table1.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import _common as C
import torch
from _tables import table1_table

ROOT = Path(__file__).resolve().parent.parent


def load_grid(args):
    from kdbench.recipe import expand, load_recipe

    reg = C.registry()
    loaded = load_recipe(args.recipe, reg, check_device=False, check_files=False)  # no dataset files needed
    updates = {}
    if args.precision is not None:
        updates["precision"] = args.precision
    if args.compile is not None:
        updates["compile"] = args.compile
    if updates:
        loaded.recipe = loaded.recipe.model_copy(update=updates)
    teachers, students = expand(loaded, reg)
    return loaded, teachers, students


def scaled_spec(spec, args):
    """``spec`` with the models' widths x ``--width-mult`` and the batch capped at
    ``--max-batch`` (stand-in runs only; the defaults leave it as the recipe has it)."""
    if args.width_mult == 1.0 and not args.max_batch:
        return spec
    new = json.loads(json.dumps(spec.spec))
    params = dict(spec.params)
    if args.width_mult != 1.0:
        p = params["model"]
        if hasattr(p, "width_mult"):
            params["model"] = p.model_copy(update={"width_mult": p.width_mult * args.width_mult})
            new["model"]["params"]["width_mult"] = params["model"].width_mult
    if args.max_batch and "schedule" in new:
        new["schedule"]["batch_size"] = min(new["schedule"]["batch_size"], args.max_batch)
    teacher = scaled_spec(spec.teacher, args) if spec.teacher is not None else None
    return dataclasses.replace(spec, spec=new, params=params, teacher=teacher)


def row_label(specs) -> tuple[str, str]:
    """(pair, row) of a group of same-cost runs: every row of the grid it stands for."""
    m = specs[0].meta
    if specs[0].kind == "teacher":
        return m.pair, f"Teacher ({m.objective})"
    rows = dict.fromkeys(s.meta.method_set + (f" [{s.meta.objective} teacher]" if s.meta.objective
                                              else "") for s in specs)
    return m.pair, " = ".join(rows)


class Measurer:
    def __init__(self, loaded, device, train, test, args):
        from kdbench.engine.trainer import RunTrainer

        self.device, self.args, self.train, self.test = device, args, train, test
        self.precision = loaded.recipe.precision
        from kdbench.engine import trainer as T

        # Synthetic CIFAR-100-shaped data instead of the recipe's files: every builder of the
        # trainer uses it.
        self.evaluation = T.Evaluation(every=loaded.recipe.eval_every)
        self.trainer = RunTrainer(loaded, C.registry(), device, None, C.NoProgress(), lambda: None,
                                  lambda *a, **k: {}, data=T.GridData(train, test, self.evaluation))
        self.eval_s: dict[str, float] = {}

    def task(self, spec, objective=None):
        if spec.kind == "teacher":
            if objective is None:
                return self.trainer.teacher_task(spec)
            from kdbench.engine.tasks import build_teacher_task

            return build_teacher_task(C.registry(), objective, self.trainer.build_for(spec),
                                      self.train, self.device)
        teacher = None
        if spec.teacher is not None:  # an untrained teacher of the same architecture: same cost
            teacher = C.freeze(self.trainer.build_for(spec.teacher))
        return self.trainer.student_task(spec, teacher)

    def evaluate(self, model, key: str) -> float:
        from kdbench.engine.loop import evaluate

        if key not in self.eval_s:
            bs = self.trainer.recipe.eval_batch_size
            evaluate(model, self.test, bs, self.device, self.precision)  # untimed: autotuning
            C.sync(self.device)
            t0 = time.perf_counter()
            evaluate(model, self.test, bs, self.device, self.precision)
            C.sync(self.device)
            self.eval_s[key] = time.perf_counter() - t0
        return self.eval_s[key]

    def measure(self, spec, steps: int, objective=None) -> dict:
        from kdbench.engine.loop import accumulate, make_optimizer, new_accum, train_step
        from kdbench.engine.reproducibility import data_generator, seed_everything
        from kdbench.recipe import Schedule

        seed_everything(spec.spec["seed"], self.trainer.recipe.deterministic)
        task = self.task(spec, objective)
        schedule = Schedule(**spec.spec["schedule"])
        bs = schedule.batch_size
        optimizer, _ = make_optimizer(C.trained_params(task), schedule, self.device)
        gen = data_generator(spec.spec["seed"], self.device)

        def batches():
            while True:
                yield from self.train.train_batches(bs, gen, task.views)

        it = batches()
        for m in task.modules():
            m.train()
        C.sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.args.warmup):
            train_step(task, next(it), optimizer, self.device, self.precision)
        C.sync(self.device)
        warm_step = (time.perf_counter() - t0) / max(1, self.args.warmup)
        acc = new_accum(self.device)
        C.sync(self.device)
        t0 = time.perf_counter()
        for i in range(steps):
            batch = next(it)
            loss, terms, logits = train_step(task, batch, optimizer, self.device, self.precision)
            accumulate(acc, loss, terms, logits, batch.y, i + 1)
        bad = int(acc["first_bad"])  # the one host read (syncs)
        C.sync(self.device)
        step_s = (time.perf_counter() - t0) / steps
        eval_model = task.eval_model()
        eval_s = self.evaluate(eval_model, json.dumps(spec.spec["model"], sort_keys=True))
        epochs = schedule.epochs
        stages = [name for name, _, m in getattr(task, "methods", [])
                  if getattr(m, "init_stage", lambda: None)() is not None]
        out = {"bs": bs, "steps": steps, "step_s": step_s, "warm_step_s": warm_step,
               "eval_s": eval_s, "finite": bad < 0,
               "batches": self.train.num_batches(bs),
               "evals": sum(self.evaluation.due(e, epochs) for e in range(epochs)),
               "init_stages_not_counted": stages,
               "teacher_cast_once": bool(getattr(task, "teacher_cast_once", False))}
        del task, optimizer, it, eval_model
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cifar100_homogeneous.toml"))
    ap.add_argument("--n", type=int, default=50000, help="training images (CIFAR-100: 50000)")
    ap.add_argument("--n-test", type=int, default=10000, help="test images (CIFAR-100: 10000)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per row (at most)")
    ap.add_argument("--min-steps", type=int, default=50, help="timed steps per row (at least)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per row")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time for all rows: later rows get fewer steps if earlier ones ran long")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                    help="override the recipe's precision (default: the recipe's)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="override the recipe's compile (default: the recipe's)")
    ap.add_argument("--width-mult", type=float, default=1.0,
                    help="multiply every net's width (stand-in runs; 1.0 = the recipe's nets)")
    ap.add_argument("--max-batch", type=int, default=0,
                    help="cap every batch size (stand-in runs; 0 = the recipe's)")
    ap.add_argument("--no-upper-bound", action="store_true",
                    help="skip the margin teacher's all-pass measurement")
    ap.add_argument("--json", default=None, help="also write the rows here (after every row)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(C.resolve_devices(args.device)[0])
    t_start = time.perf_counter()

    from kdbench.engine.estimate import cost_key

    loaded, teachers, students = load_grid(args)
    recipe = loaded.recipe
    groups: dict[str, list] = {}
    for spec in teachers + students:
        groups.setdefault(cost_key(spec), []).append(spec)
    # Recipe order: by pair, teachers first, then the rows.
    keys = sorted(groups, key=lambda k: (groups[k][0].meta.pair_index, groups[k][0].kind != "teacher",
                                         getattr(groups[k][0].meta, "objective_index", 0)
                                         if groups[k][0].kind == "teacher"
                                         else groups[k][0].meta.method_set_index))
    train = C.device_data(C.image_data(*C.synthetic_images(args.n, seed=0)), device)
    test = C.device_data(C.image_data(*C.synthetic_images(args.n_test, seed=1)), device)
    measurer = Measurer(loaded, device, train, test, args)

    plan = []  # (key, spec, objective override, label suffix)
    for key in keys:
        spec = groups[key][0]
        plan.append((key, spec, None, ""))
        if (spec.kind == "teacher" and spec.spec["objective"]["name"] == "margin_intra"
                and not args.no_upper_bound):
            name, params = spec.objective_term()
            params = params.model_dump(by_alias=True) if hasattr(params, "model_dump") else dict(params)
            plan.append((key, spec, (name, {**params, "delta": -1.0}), " all pass (upper bound)"))

    meta = {"recipe": str(args.recipe), "device": C.device_label(device), "machine": C.machine(),
            "precision": recipe.precision, "compile": recipe.compile, "n": args.n,
            "n_test": args.n_test, "width_mult": args.width_mult, "max_batch": args.max_batch,
            "runs": {"teachers": len(teachers), "students": len(students)},
            "rows_planned": len(plan)}
    rows = []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)

    save()
    for i, (key, spec, objective, suffix) in enumerate(plan):
        steps = args.steps
        done = [r for r in rows if "error" not in r]
        if args.budget_s is not None and done:
            # What is left of the budget, shared by the rows left; the last measured row's
            # step time and fixed cost (build, warm-up, eval) as the estimate of the next.
            left = args.budget_s - (time.perf_counter() - t_start)
            per_row = left / (len(plan) - i)
            last = done[-1]
            overhead = max(0.0, last["wall_s"] - last["steps"] * last["step_s"])
            steps = int(max(args.min_steps, min(args.steps, (per_row - overhead) / last["step_s"])))
        run = scaled_spec(spec, args)
        pair, label = row_label(groups[key])
        label += suffix
        runs = len(groups[key])
        t0 = time.perf_counter()
        try:
            r = measurer.measure(run, steps, objective)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        r.update(pair=pair, row=label, kind=spec.kind, runs=runs if not suffix else 0,
                 runs_of_row=runs, epochs=spec.spec["schedule"]["epochs"], key=key,
                 upper_bound=bool(suffix), wall_s=time.perf_counter() - t0)
        if "error" not in r:
            r["epoch_s"] = r["batches"] * r["step_s"] + r["eval_s"]
            r["run_s"] = r["epochs"] * r["batches"] * r["step_s"] + r["evals"] * r["eval_s"]
            r["row_h"] = runs * r["run_s"] / 3600
            C.log(f"[{time.perf_counter() - t_start:5.0f}s] {pair} {label}: "
                  f"{1e3 * r['step_s']:.2f} ms/step over {r['steps']} steps (batch {r['bs']}), "
                  f"eval {r['eval_s']:.2f} s, {r['epoch_s']:.1f} s/epoch, {runs} runs -> "
                  f"{r['row_h']:.2f} h{'' if r['finite'] else ' (LOSS NOT FINITE)'}")
        else:
            C.log(f"{pair} {label}: {r['error']}")
        rows.append(r)
        save()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(table1_table(rows, meta))
    return 0 if all("error" not in r and r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
