"""TOML recipe -> typed, validated recipe -> run specs.

Validation happens before any training and reports every problem at once, each with the recipe
path, the line of the key, the key path and a fix ("did you mean ..."). Plugin parameters are
written inline next to the core keys of their table and validated by the plugin's own config
model, e.g. ``{ name = "kd", weight = 0.9, temperature = 4 }``.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdbench.api import Params, UserError
from kdbench.registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPEC_VERSION = 1  # bump when a change to training semantics must invalidate cached results


class RecipeError(UserError):
    """Several recipe problems, reported together (one per line)."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        head = f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the recipe"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------------------------------
# Schema. Tables that name a plugin allow extra keys: those are the plugin's parameters.
# ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: "2" is not an integer and "yes" is not a boolean (ints still pass as floats).
    model_config = ConfigDict(extra="forbid", strict=True)


class _WithPluginParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelRef(_WithPluginParams):
    name: str
    label: str | None = None


class Pair(_Strict):
    teacher: ModelRef
    student: ModelRef
    label: str | None = None
    ref_teacher: str | None = Field(None, description="teacher name in the reference table")
    ref_student: str | None = Field(None, description="student name in the reference table")

    @field_validator("teacher", "student", mode="before")
    @classmethod
    def _short(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @property
    def display(self) -> str:
        return self.label or f"{self.teacher.label or self.teacher.name}→{self.student.label or self.student.name}"


class DatasetSpec(_WithPluginParams):
    name: str
    subset_per_class: int | None = Field(None, gt=0)
    test_subset_per_class: int | None = Field(None, gt=0)
    label: str | None = None


class TeacherObjectiveSpec(_WithPluginParams):
    name: str
    label: str | None = None
    checkpoint: str | None = Field(None, description="load this published teacher instead of "
                                   "training one (RepDistiller/mdistiller layouts accepted)")

    @property
    def display(self) -> str:
        return self.label or self.name


class MethodTerm(_WithPluginParams):
    name: str
    weight: float | None = Field(None, ge=0)


class MethodSet(_Strict):
    label: str | None = None
    methods: list[MethodTerm] = Field(min_length=1)
    teachers: list[str] | None = Field(None, description="labels of the teacher objectives to use")
    ref_method: str | None = None

    @property
    def display(self) -> str:
        return self.label or "+".join(m.name for m in self.methods)


class Schedule(_Strict):
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=1)
    lr: float = Field(gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v):
        if any(m <= 0 for m in v) or v != sorted(v):
            raise ValueError("milestones must be positive epochs in increasing order")
        return v


class Reference(_Strict):
    table: str
    dataset: str
    file: str | None = None  # default: the paper's tables shipped with kdbench


class Recipe(_Strict):
    name: str | None = None
    output: str | None = None
    teacher_cache: str | None = None
    device: str = "auto"
    launcher: Literal["inline", "local", "slurm"] = Field(
        "inline", description="how the grid is run (kdbench run --launcher); not part of run ids")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = Field(False, description="torch.compile the nets' forward (CUDA); not part "
                          "of run ids, since it changes speed, not the computation")
    deterministic: bool = False
    teacher_logit_cache: bool = Field(
        False, description="serve a frozen teacher's logits from an exact per-view cache to "
        "method sets that read only logits (kdbench/engine/teacher_cache.py); not part of run ids")
    checkpoint_every_steps: int | None = Field(None, gt=0, description="also checkpoint every N "
                                               "steps (always at every epoch's end); not part of run ids")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    teacher_seed: int | None = None
    report: Literal["final", "best"] = "final"
    eval_batch_size: int = Field(512, gt=0)
    diagnostics_temperature: float = Field(4.0, gt=0)
    dataset: DatasetSpec
    pairs: list[Pair] = Field(min_length=1)
    teacher_objectives: list[TeacherObjectiveSpec] = Field(
        default_factory=lambda: [TeacherObjectiveSpec(name="ce")], min_length=1)
    method_sets: list[MethodSet] = Field(min_length=1)
    teacher_schedule: Schedule
    student_schedule: Schedule
    reference: Reference | None = None

    @model_validator(mode="after")
    def _labels_unique(self):
        labels = [t.display for t in self.teacher_objectives]
        dupes = {x for x in labels if labels.count(x) > 1}
        if dupes:
            raise ValueError(f"teacher_objectives labels must be unique (repeated: {sorted(dupes)}); "
                             "give each a distinct `label`")
        for ms in self.method_sets:
            for t in ms.teachers or []:
                if t not in labels:
                    raise ValueError(f"method set {ms.display!r} names teacher {t!r}, "
                                     f"but teacher_objectives are {labels}")
        return self


# ------------------------------------------------------------------------------------------------
# Run specs
# ------------------------------------------------------------------------------------------------
def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunSpec:
    """One training run. ``spec`` determines the result (hashed into ``id``); ``meta`` only
    labels it for humans and the leaderboard."""

    kind: Literal["teacher", "student"]
    spec: dict[str, Any]
    meta: dict[str, Any]
    teacher: "RunSpec | None" = None
    id: str = field(init=False)

    def __post_init__(self):
        self.id = f"{self.kind[0]}-{_hash(self.spec)}"

    @property
    def describe(self) -> str:
        m = self.meta
        if self.kind == "teacher" and "checkpoint" in self.spec:
            return f"teacher {m['model']} from {self.spec['checkpoint']['path']}"
        if self.kind == "teacher":
            return f"teacher {m['model']} [{m['objective']}] seed {self.spec['seed']}"
        return f"student {m['pair']} [{m['method_set']}] seed {self.spec['seed']}"


@dataclass
class LoadedRecipe:
    path: Path
    recipe: Recipe
    text: str

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output or f"runs/{self.path.stem}")

    @property
    def teacher_dir(self) -> Path:
        return Path(self.recipe.teacher_cache) if self.recipe.teacher_cache else self.output_dir / "teachers"


def _resolved(registry: Registry, kind: str, name: str, params: dict) -> dict:
    """The plugin's parameters with its defaults filled in: a changed default changes the run
    id, so a cached result is never reused for a computation that is no longer the same."""
    plugin = registry.find(kind, name)
    return plugin.params.model_validate(params).model_dump(mode="json", by_alias=True)


def expand(loaded: LoadedRecipe, registry: Registry) -> tuple[list[RunSpec], list[RunSpec]]:
    """Recipe -> (teacher runs, student runs); pairs × teacher objectives × method sets × seeds."""
    r = loaded.recipe
    def model_spec(ref: ModelRef) -> dict:
        return {"name": ref.name, "params": _resolved(registry, "model", ref.name, ref.params)}

    dataset = {"name": r.dataset.name,
               "params": _resolved(registry, "dataset", r.dataset.name, r.dataset.params),
               "subset_per_class": r.dataset.subset_per_class,
               "test_subset_per_class": r.dataset.test_subset_per_class}
    common = {"v": SPEC_VERSION, "dataset": dataset, "precision": r.precision,
              "deterministic": r.deterministic}
    ref = r.reference.model_dump() if r.reference else None
    teachers: dict[str, RunSpec] = {}
    students: list[RunSpec] = []
    dataset_label = r.dataset.label or r.dataset.name
    group = r.name or loaded.path.stem
    pairs_order = {p.display: i for i, p in enumerate(r.pairs)}
    for pair in r.pairs:
        for ms in r.method_sets:
            needs_teacher = any(registry.find("student_method", m.name).factory.needs_teacher
                                for m in ms.methods)
            objectives = [o for o in r.teacher_objectives
                          if ms.teachers is None or o.display in ms.teachers] if needs_teacher else [None]
            for obj in objectives:
                for seed in r.seeds:
                    teacher = None
                    if obj is not None:
                        tseed = r.teacher_seed if r.teacher_seed is not None else seed
                        tspec = {**common, "model": model_spec(pair.teacher),
                                 "objective": {"name": obj.name, "params": _resolved(
                                     registry, "teacher_objective", obj.name, obj.params)},
                                 "schedule": r.teacher_schedule.model_dump(), "seed": tseed}
                        if obj.checkpoint:  # a published teacher: its file, not training, decides it
                            tspec = {**common, "model": model_spec(pair.teacher),
                                     "checkpoint": _file_identity(obj.checkpoint)}
                        teacher = RunSpec("teacher", tspec, {
                            "group": group, "dataset": dataset_label, "order": pairs_order[pair.display], "model": pair.teacher.label or pair.teacher.name,
                            "objective": obj.display, "ref_teacher": pair.ref_teacher,
                            "reference": ref, "pair": pair.display})
                        teacher = teachers.setdefault(teacher.id, teacher)
                    sspec = {**common, "model": model_spec(pair.student),
                             "teacher": teacher.id if teacher else None,
                             "methods": [{"name": m.name, "weight": _weight(m, registry),
                                          "params": _resolved(registry, "student_method", m.name,
                                                              m.params)} for m in ms.methods],
                             "schedule": r.student_schedule.model_dump(), "seed": seed}
                    students.append(RunSpec("student", sspec, {
                        "group": group, "dataset": dataset_label,
                        "order": [pairs_order[pair.display], r.method_sets.index(ms),
                                  r.teacher_objectives.index(obj) if obj else -1], "pair": pair.display,
                        "teacher_model": pair.teacher.label or pair.teacher.name,
                        "student_model": pair.student.label or pair.student.name,
                        "objective": obj.display if obj else None,
                        "method_set": ms.display, "ref_method": ms.ref_method,
                        "ref_teacher": pair.ref_teacher, "ref_student": pair.ref_student,
                        "reference": ref}, teacher=teacher))
    return list(teachers.values()), students


def _file_identity(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}


def _weight(term: MethodTerm, registry: Registry) -> float:
    if term.weight is not None:
        return term.weight
    return float(registry.find("student_method", term.name).factory.default_weight)


# ------------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------------
def load_recipe(path: str | Path, registry: Registry, check_device: bool = True) -> LoadedRecipe:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: recipe file not found (check the path)")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a .toml recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc})") from None
    if not text.strip():
        raise UserError(f"{path}: the recipe is empty (see recipes/smoke.toml for a complete example)")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None

    locate = _Locator(text)
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err, raw, locate, Recipe) for err in exc.errors()]
    # Plugin names and parameters are checked on the raw tables, so that they are reported
    # together with any schema problem elsewhere in the file.
    problems += _check_plugins(raw, registry, locate)
    for i, obj in enumerate(raw.get("teacher_objectives") or []):
        ckpt = obj.get("checkpoint") if isinstance(obj, dict) else None
        if isinstance(ckpt, str) and not Path(ckpt).is_file():
            key = ("teacher_objectives", i, "checkpoint")
            problems.append(f"{locate(key)}{_dotted(key)}: teacher checkpoint {ckpt!r} not found "
                            "(relative paths start at the current directory)")
    if check_device and isinstance(raw.get("device", "auto"), str):
        problems += _check_device(raw.get("device", "auto"), locate)
    if problems or recipe is None:
        raise RecipeError(path, list(dict.fromkeys(problems)))
    return LoadedRecipe(path, recipe, text)


def _check_device(device: str, locate: "_Locator") -> list[str]:
    import torch

    where = locate(("device",))
    if device in ("auto", "cpu"):
        return []
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        return [f"{where}device = {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"]
    if not torch.cuda.is_available():
        return [f"{where}device = {device!r}, but no CUDA device is available here; "
                "use device = 'cpu' or 'auto'"]
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        return [f"{where}device = {device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist"]
    return []


def _check_plugins(raw: dict, registry: Registry, locate: "_Locator") -> list[str]:
    problems = []

    def check(kind: str, table: Any, path: tuple, spec: type[BaseModel]):
        if isinstance(table, str) and kind == "model":
            table = {"name": table}
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            return  # the schema check reports it
        try:
            plugin = registry.find(kind, table["name"])
        except UserError as exc:
            problems.append(f"{locate(path + ('name',))}{_dotted(path + ('name',))}: {exc}")
            return
        params = {k: v for k, v in table.items() if k not in spec.model_fields}
        try:
            plugin.params.model_validate(params)
        except ValidationError as exc:
            for err in exc.errors():
                problems.append(_describe(err, params, locate, plugin.params, prefix=path,
                                          extra_keys=set(spec.model_fields), plugin=plugin.name))

    def items(key):
        value = raw.get(key)
        return list(enumerate(value)) if isinstance(value, list) else []

    check("dataset", raw.get("dataset"), ("dataset",), DatasetSpec)
    for i, pair in items("pairs"):
        for role in ("teacher", "student"):
            if isinstance(pair, dict):
                check("model", pair.get(role), ("pairs", i, role), ModelRef)
    for i, obj in items("teacher_objectives"):
        check("teacher_objective", obj, ("teacher_objectives", i), TeacherObjectiveSpec)
    for i, ms in items("method_sets"):
        methods = ms.get("methods") if isinstance(ms, dict) else None
        for j, term in enumerate(methods if isinstance(methods, list) else []):
            check("student_method", term, ("method_sets", i, "methods", j), MethodTerm)
    return problems


def plugin_params(registry: Registry, kind: str, name: str, params: dict) -> Params:
    return registry.find(kind, name).params.model_validate(params)


def _dotted(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_TYPE_HINTS = {
    "int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
    "float_parsing": "a number", "string_type": "a string", "bool_type": "true or false",
    "bool_parsing": "true or false", "list_type": "an array", "dict_type": "a table",
    "model_type": "a table", "literal_error": None, "missing": None,
}


def _describe(err: dict, raw: Any, locate: "_Locator", model: type[BaseModel], prefix: tuple = (),
              extra_keys: set[str] = frozenset(), plugin: str | None = None) -> str:
    loc = tuple(err["loc"])
    path = prefix + loc
    where = locate(path)
    key = _dotted(path)
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(model, loc[:-1]) | set(extra_keys)
        close = difflib.get_close_matches(str(loc[-1]), sorted(valid), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
        owner = f" for {plugin!r}" if plugin else ""
        return f"{where}{key}: unknown key{owner} ({hint})"
    if kind == "missing":
        return f"{where}{key}: required key is missing"
    expected = _TYPE_HINTS.get(kind)
    value = _get(raw, loc)
    if expected:
        return f"{where}{key}: expected {expected}, got {value!r}"
    return f"{where}{key}: {err['msg']} (got {value!r})" if value is not _MISSING else f"{where}{key}: {err['msg']}"


_MISSING = object()


def _get(raw: Any, loc: tuple) -> Any:
    cur = raw
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return cur


def _valid_keys(model: type[BaseModel], loc: tuple) -> set[str]:
    """Field names of the (nested) model at ``loc``."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int) or cur is None:
            continue
        field_info = getattr(cur, "model_fields", {}).get(part)
        if field_info is None:
            return set()
        cur = _inner_model(field_info.annotation)
    keys = set(getattr(cur, "model_fields", {}))
    for name, f in getattr(cur, "model_fields", {}).items():
        if f.alias:
            keys.add(f.alias)
    return keys


def _inner_model(annotation):
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


class _Locator:
    """Best-effort line lookup for a key path in TOML text (tomllib keeps no positions)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def __call__(self, path: tuple) -> str:
        line = self.find(path)
        return f"line {line}: " if line else ""

    def find(self, path: tuple) -> int | None:
        """1-based line of the key at ``path``: searched inside its ``[table]`` or n-th
        ``[[array]]`` section when the file has one, else anywhere (inline tables)."""
        if path and isinstance(path[0], str):
            is_array = len(path) > 1 and isinstance(path[1], int)
            n, rest = (path[1], path[2:]) if is_array else (0, path[1:])
            pattern = r"^\s*\[\[\s*%s\s*\]\]" if is_array else r"^\s*\[\s*%s\s*\]"
            section = self._section(re.compile(pattern % re.escape(path[0])), n)
            if section:
                start, end = section
                return self._find_keys(list(rest), start, end) or start + 1
        return self._find_keys(list(path), 0, len(self.lines))

    def _section(self, header: re.Pattern, n: int) -> tuple[int, int] | None:
        hits = [i for i, line in enumerate(self.lines) if header.match(line)]
        if len(hits) <= n:
            return None
        start = hits[n]
        end = next((i for i in range(start + 1, len(self.lines))
                    if re.match(r"^\s*\[", self.lines[i])), len(self.lines))
        return start, end

    def _find_keys(self, path: list, start: int, end: int) -> int | None:
        """Walk the keys outer to inner, each at or after the line of the previous one."""
        found = None
        line = start
        for part in path:
            if isinstance(part, int):
                continue
            pat = re.compile(r"(^|[\s{,.])" + re.escape(part) + r"\s*[=.]")
            hit = next((i for i in range(line, end) if pat.search(self.lines[i])), None)
            if hit is None:
                break
            found = line = hit
        return None if found is None else found + 1
