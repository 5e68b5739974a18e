"""A validated recipe -> the grid of runs: pairs × method sets × teacher objectives × seeds.

Each :class:`RunSpec` has two parts: ``spec``, everything that determines the result (hashed
into the run id, with every plugin's parameters filled in with their defaults, so a changed
default changes the id and a cached result is never reused for another computation), and
``meta``, typed labels for humans and the leaderboard (:class:`TeacherMeta`,
:class:`StudentMeta`), written into the record as a dict. The plugins' validated parameter
objects travel with the spec (``params``), so the engine builds every plugin from the object the
recipe check produced, never from a re-validated dict.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, Any, Literal

from kdbench.api import Params
from kdbench.registry import Registry

if TYPE_CHECKING:
    from kdbench.recipe import LoadedRecipe
    from kdbench.recipe.schema import MethodTerm, ModelRef

SPEC_VERSION = 1  # bump when a change to training semantics must invalidate cached results


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TeacherMeta:
    """What a teacher run is, in the recipe's words."""

    group: str  # the recipe's name: the leaderboard's table
    dataset: str
    pair: str  # label of the first pair that uses this teacher
    pair_index: int  # its position in the recipe (column order)
    model: str
    objective: str  # the objective's label
    objective_index: int  # its position in the recipe (row order)
    ref_teacher: str | None  # the teacher's name in the reference table
    reference_row: bool  # these are the reference table's teachers (objective's ref_teacher)
    reference: dict | None


@dataclass(frozen=True)
class StudentMeta:
    """What a student run is, in the recipe's words."""

    group: str
    dataset: str
    pair: str
    pair_index: int  # column order
    method_set: str
    method_set_index: int  # row order
    objective: str | None  # label of its teacher's objective (None: no teacher)
    objective_index: int  # order of rows of one method set with several objectives (-1: none)
    teacher_reference_row: bool  # its teacher objective is the reference table's teacher row
    baseline: str | None  # the method set the leaderboard compares every row with
    teacher_model: str
    student_model: str
    ref_method: str | None
    ref_teacher: str | None
    ref_student: str | None
    reference: dict | None


@dataclass
class RunSpec:
    """One training run. ``spec`` determines the result (hashed into ``id``); ``meta`` only
    labels it; ``params`` holds the validated parameter objects of its plugins (``model``,
    ``objective``, ``methods``: one per method, in order)."""

    kind: Literal["teacher", "student"]
    spec: dict[str, Any]
    meta: TeacherMeta | StudentMeta
    teacher: "RunSpec | None" = None
    params: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    id: str = field(init=False)

    def __post_init__(self):
        self.id = f"{self.kind[0]}-{_hash(self.spec)}"

    def meta_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.meta)

    def method_terms(self) -> list[tuple[str, float, Params | dict]]:
        """(name, weight, parameters) of each method, for :func:`build_student_task`."""
        given = self.params.get("methods") or [m["params"] for m in self.spec["methods"]]
        return [(m["name"], m["weight"], p) for m, p in zip(self.spec["methods"], given)]

    def optimizer_term(self) -> tuple[str, Params | dict] | None:
        """(name, parameters) of the student's optimizer plugin; None: the schedule's SGD."""
        opt = self.spec.get("optimizer")
        if opt is None:
            return None
        return opt["name"], self.params.get("optimizer") or opt["params"]

    def objective_term(self) -> tuple[str, Params | dict]:
        obj = self.spec["objective"]
        return obj["name"], self.params.get("objective") or obj["params"]

    @property
    def describe(self) -> str:
        m = self.meta
        if self.kind == "teacher" and "checkpoint" in self.spec:
            return f"teacher {m.model} from {self.spec['checkpoint']['path']}"
        if self.kind == "teacher":
            return f"teacher {m.model} [{m.objective}] seed {self.spec['seed']}"
        return f"student {m.pair} [{m.method_set}] seed {self.spec['seed']}"


def resolved(params: Params) -> dict:
    """A plugin's parameters with its defaults filled in, as they enter the run id."""
    return params.model_dump(mode="json", by_alias=True)


def _revision(registry, kind: str, name: str) -> dict:
    """A plugin's nonzero ``revision`` for its run spec (absent at 0: ids stay as they were)."""
    revision = getattr(registry.find(kind, name).factory, "revision", 0)
    return {"revision": revision} if revision else {}


def expand(loaded: "LoadedRecipe", registry: Registry) -> tuple[list[RunSpec], list[RunSpec]]:
    """Recipe -> (teacher runs, student runs); pairs × method sets × teacher objectives × seeds.
    A teacher used by several method sets is one run."""
    r = loaded.recipe
    validated = loaded.plugin_params(registry)

    def model(ref: "ModelRef", path: tuple) -> tuple[dict, Params]:
        params = validated[path]
        return {"name": registry.canonical_name("model", ref.name), "params": resolved(params)}, params

    dataset = {"name": registry.canonical_name("dataset", r.dataset.name),
               "params": resolved(validated[("dataset",)]),
               "subset_per_class": r.dataset.subset_per_class,
               "test_subset_per_class": r.dataset.test_subset_per_class}
    if r.dataset.val_per_class is not None:  # only then: ids of recipes without one stay the same
        dataset["val_per_class"] = r.dataset.val_per_class
    common = {"v": SPEC_VERSION, "dataset": dataset, "precision": r.precision,
              "deterministic": r.deterministic}
    ref = r.reference.model_dump() if r.reference else None
    labels = {"group": r.name or loaded.path.stem, "dataset": r.dataset.label or r.dataset.name}
    teachers: dict[str, RunSpec] = {}
    students: list[RunSpec] = []
    for (p, pair), (m, ms) in product(enumerate(r.pairs), enumerate(r.method_sets)):
        t_model, t_params = model(pair.teacher, ("pairs", p, "teacher"))
        s_model, s_params = model(pair.student, ("pairs", p, "student"))
        # A pair's own method parameters (its method_params) stand in for the set's.
        terms = [validated.get(("pairs", p, "method_sets", m, "methods", j), validated[("method_sets", m, "methods", j)])
                 for j in range(len(ms.methods))]
        student_schedule = r.student_schedule_of(pair).model_dump()
        needs_teacher = any(registry.find("student_method", t.name).factory.needs_teacher
                            for t in ms.methods)
        objectives = [(o, obj) for o, obj in enumerate(r.teacher_objectives)
                      if ms.teachers is None or obj.display in ms.teachers] if needs_teacher else [(-1, None)]
        for (o, obj), seed in product(objectives, r.seeds):
            teacher = None
            if obj is not None:
                tseed = r.teacher_seed if r.teacher_seed is not None else seed
                obj_params = validated[("teacher_objectives", o)]
                if obj.checkpoint:  # a published teacher: its file, not training, decides it
                    tspec = {**common, "model": t_model, "checkpoint": _file_identity(obj.checkpoint)}
                else:
                    tspec = {**common, "model": t_model,
                             "objective": {"name": registry.canonical_name("teacher_objective", obj.name),
                                           "params": resolved(obj_params),
                                           **_revision(registry, "teacher_objective", obj.name)},
                             "schedule": r.teacher_schedule.model_dump(), "seed": tseed}
                teacher = RunSpec("teacher", tspec, TeacherMeta(
                    **labels, pair=pair.display, pair_index=p,
                    model=pair.teacher.label or pair.teacher.name, objective=obj.display,
                    objective_index=o, ref_teacher=pair.ref_teacher, reference_row=obj.ref_teacher,
                    reference=ref), params={"model": t_params, "objective": obj_params})
                teacher = teachers.setdefault(teacher.id, teacher)
            sspec = {**common, "model": s_model, "teacher": teacher.id if teacher else None,
                     "methods": [{"name": registry.canonical_name("student_method", t.name),
                                  "weight": _weight(t, registry),
                                  "params": resolved(tp),
                                  **_revision(registry, "student_method", t.name)}
                                 for t, tp in zip(ms.methods, terms)],
                     "schedule": student_schedule, "seed": seed}
            opt_params = validated.get(("method_sets", m, "optimizer"))
            if ms.optimizer is not None:  # only then: sets on the schedule's SGD keep their ids
                sspec["optimizer"] = {"name": registry.canonical_name("optimizer", ms.optimizer.name),
                                      "params": resolved(opt_params),
                                      **_revision(registry, "optimizer", ms.optimizer.name)}
            students.append(RunSpec("student", sspec, StudentMeta(
                **labels, pair=pair.display, pair_index=p, method_set=ms.display,
                method_set_index=m, objective=obj.display if obj else None, objective_index=o,
                teacher_reference_row=bool(obj and obj.ref_teacher),
                baseline=r.leaderboard.baseline if r.leaderboard else None,
                teacher_model=pair.teacher.label or pair.teacher.name,
                student_model=pair.student.label or pair.student.name, ref_method=ms.ref_method,
                ref_teacher=pair.ref_teacher, ref_student=pair.ref_student, reference=ref),
                teacher=teacher, params={"model": s_params, "methods": terms, "optimizer": opt_params}))
    return list(teachers.values()), students


def _file_identity(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}


def _weight(term: "MethodTerm", registry: Registry) -> float:
    if term.weight is not None:
        return term.weight
    return float(registry.find("student_method", term.name).factory.default_weight)
