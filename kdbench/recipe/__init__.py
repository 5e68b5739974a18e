"""TOML recipe -> typed, validated recipe -> run specs.

Three parts: :mod:`~kdbench.recipe.schema` (the keys kdbench reads), :mod:`~kdbench.recipe.grid`
(the runs a recipe means) and :mod:`~kdbench.recipe.errors` (problems as messages a user can act
on). Loading (here) validates before any training and reports every problem at once, each with
the recipe path, the line of the key, the key path and a fix ("did you mean ..."). Plugin
parameters are written inline next to the core keys of their table and validated once, by the
plugin's own config model, e.g. ``{ name = "kd", weight = 0.9, temperature = 4 }``; the
validated objects travel on to the grid and the engine.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kdbench.api import Params, UserError
from kdbench.recipe.errors import Locator, RecipeError, describe, dotted
from kdbench.recipe.grid import SPEC_VERSION, RunSpec, StudentMeta, TeacherMeta, expand
from kdbench.recipe.schema import (DatasetSpec, MethodSet, MethodTerm, ModelRef, OptimizerRef, Pair,
                                   Recipe, Reference, Schedule, TeacherObjectiveSpec)
from kdbench.registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["LoadedRecipe", "RecipeError", "RunSpec", "StudentMeta", "TeacherMeta", "SPEC_VERSION",
           "expand", "load_recipe", "Recipe", "Schedule", "Pair", "ModelRef", "DatasetSpec",
           "MethodSet", "MethodTerm", "Reference", "TeacherObjectiveSpec"]


@dataclass
class LoadedRecipe:
    path: Path
    recipe: Recipe
    text: str
    # Validated plugin parameters by key path (("pairs", 0, "teacher"), ("method_sets", 1,
    # "methods", 0), ...), as the recipe check produced them.
    params: dict[tuple, Params] = field(default_factory=dict, repr=False)

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output or f"runs/{self.path.stem}")

    @property
    def teacher_dir(self) -> Path:
        return Path(self.recipe.teacher_cache) if self.recipe.teacher_cache else self.output_dir / "teachers"

    def plugin_tables(self):
        """(kind, key path, table) of every table of the recipe that names a plugin."""
        r = self.recipe
        yield "dataset", ("dataset",), r.dataset
        for i, pair in enumerate(r.pairs):
            yield "model", ("pairs", i, "teacher"), pair.teacher
            yield "model", ("pairs", i, "student"), pair.student
        for i, obj in enumerate(r.teacher_objectives):
            yield "teacher_objective", ("teacher_objectives", i), obj
        for i, ms in enumerate(r.method_sets):
            for j, term in enumerate(ms.methods):
                yield "student_method", ("method_sets", i, "methods", j), term
            if ms.optimizer is not None:
                yield "optimizer", ("method_sets", i, "optimizer"), ms.optimizer

    def plugin_params(self, registry: Registry) -> dict[tuple, Params]:
        """Every plugin table's validated parameters: those the check produced, and (for tables
        it did not see, such as the default ``ce`` objective) validated now."""
        out = dict(self.params)
        for kind, path, table in self.plugin_tables():
            if path not in out:
                out[path] = registry.find(kind, table.name).params.model_validate(table.params)
        # load_recipe validated the pairs' method_params already; a LoadedRecipe built by hand
        # (no params) has them validated here.
        if not self.params and any(pair.method_params for pair in self.recipe.pairs):
            problems = _check_pair_overrides(self.recipe, registry, Locator(self.text), out)
            if problems:
                raise RecipeError(self.path, problems)
        return out


def load_recipe(path: str | Path, registry: Registry, check_device: bool = True,
                check_files: bool = True) -> LoadedRecipe:
    """The recipe at ``path``, validated (RecipeError: every problem at once). ``check_device``
    and ``check_files`` (the reference table, the dataset's folder) can be left out to look at a
    recipe's structure on a machine that will not run it."""
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

    locate = Locator(text)
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [describe(err, raw, locate, Recipe) for err in _one_per_key(exc.errors())]
    # Plugin names and parameters are checked on the raw tables, so that they are reported
    # together with any schema problem elsewhere in the file.
    validated: dict[tuple, Params] = {}
    problems += _check_plugins(raw, registry, locate, validated)
    for i, obj in enumerate(raw.get("teacher_objectives") or []):
        ckpt = obj.get("checkpoint") if isinstance(obj, dict) else None
        if isinstance(ckpt, str) and not Path(ckpt).is_file():
            key = ("teacher_objectives", i, "checkpoint")
            problems.append(f"{locate(key)}{dotted(key)}: teacher checkpoint {ckpt!r} not found "
                            "(relative paths start at the current directory)")
    if check_device and isinstance(raw.get("device", "auto"), str):
        problems += _check_device(raw.get("device", "auto"), locate)
    if recipe is not None:
        problems += _check_across_keys(recipe, locate, path.parent)
        overrides = _check_pair_overrides(recipe, registry, locate, validated)
        problems += overrides
        if not overrides:  # the pairs' schedules merge cleanly
            problems += _check_optimizers(recipe, registry, locate, validated)
        if check_files:
            problems += _check_files(recipe, validated, locate)
    if problems or recipe is None:
        raise RecipeError(path, list(dict.fromkeys(problems)))
    return LoadedRecipe(path, recipe, text, validated)


_UNION_MEMBERS = {"int", "float", "str", "bool", "list", "dict"}


def _one_per_key(errors: list[dict]) -> list[dict]:
    """A value that fits no member of a union (``int | float``) is one problem, not one per
    member: the members' names leave the key path and the first error stands for them."""
    out, seen = [], set()
    for err in errors:
        loc = tuple(err["loc"])
        while loc and isinstance(loc[-1], str) and loc[-1] in _UNION_MEMBERS:
            loc = loc[:-1]
        if loc not in seen:
            seen.add(loc)
            out.append({**err, "loc": loc})
    return out


def _repeated(values: list) -> list:
    return sorted({v for v in values if values.count(v) > 1}, key=str)


def _check_across_keys(recipe: Recipe, locate: Locator, here: Path) -> list[str]:
    """Problems no single key shows: repeated labels and seeds, names of labels that do not
    exist. Each names its key path and line."""
    problems = []

    def at(key: tuple) -> str:
        return f"{locate(key)}{dotted(key)}"

    objectives = [t.display for t in recipe.teacher_objectives]
    for label in _repeated(objectives):
        i = len(objectives) - 1 - objectives[::-1].index(label)
        problems.append(f"{at(('teacher_objectives', i, 'label'))}: the teacher objective label "
                        f"{label!r} is used twice; give each objective a distinct label")
    sets = [ms.display for ms in recipe.method_sets]
    for label in _repeated(sets):
        i = len(sets) - 1 - sets[::-1].index(label)
        problems.append(f"{at(('method_sets', i, 'label'))}: the method set label {label!r} is used "
                        "twice (their rows would be merged); give each set a distinct label")
    for i, ms in enumerate(recipe.method_sets):
        for j, t in enumerate(ms.teachers or []):
            if t not in objectives:
                problems.append(f"{at(('method_sets', i, 'teachers', j))}: names teacher {t!r}, "
                                f"but the teacher objectives are labelled {objectives}")
    if _repeated(recipe.seeds):
        problems.append(f"{at(('seeds',))}: seed(s) {_repeated(recipe.seeds)} appear twice; list "
                        "each seed once")
    baseline = recipe.leaderboard.baseline if recipe.leaderboard else None
    if baseline is not None and baseline not in sets:
        problems.append(f"{at(('leaderboard', 'baseline'))}: {baseline!r} names no method set; "
                        f"the method sets are {sets}")
    return problems


def _check_pair_overrides(recipe: Recipe, registry: Registry, locate: Locator, validated: dict) -> list[str]:
    """A pair's ``student_schedule`` and ``method_params``: merged over the recipe's and
    validated; each overridden method's parameters go into ``validated`` under
    ``("pairs", i, "method_sets", m, "methods", j)``."""
    problems = []
    used = {t.name for ms in recipe.method_sets for t in ms.methods}
    for i, pair in enumerate(recipe.pairs):
        if pair.student_schedule:
            try:
                recipe.student_schedule_of(pair)
            except ValidationError as exc:
                for err in _one_per_key(exc.errors()):
                    key = ("pairs", i, "student_schedule", *err["loc"])
                    problems.append(f"{locate(key)}{dotted(key)}: {err['msg']}")
        for name, override in (pair.method_params or {}).items():
            key = ("pairs", i, "method_params", name)
            if name not in used:
                problems.append(f"{locate(key)}{dotted(key)}: no method set uses a method {name!r} "
                                f"(the methods are {sorted(used)})")
                continue
            if not isinstance(override, dict):
                problems.append(f"{locate(key)}{dotted(key)}: expected a table of {name}'s parameters")
                continue
            for m, ms in enumerate(recipe.method_sets):
                for j, term in enumerate(ms.methods):
                    if term.name != name:
                        continue
                    plugin = registry.find("student_method", name)
                    try:
                        validated[("pairs", i, "method_sets", m, "methods", j)] = \
                            plugin.params.model_validate({**term.params, **override})
                    except ValidationError as exc:
                        for err in _one_per_key(exc.errors()):
                            where = key + tuple(err["loc"])
                            problems.append(f"{locate(where)}{dotted(where)}: {err['msg']}")
    return list(dict.fromkeys(problems))


def _check_files(recipe: Recipe, validated: dict, locate: Locator) -> list[str]:
    """Files the grid will read, checked now rather than after training: the reference table,
    and a dataset's ``root`` folder (a dataset plugin's ``root`` parameter, by convention the
    folder it reads) unless the dataset downloads it."""
    problems = []
    ref = recipe.reference
    if ref is not None and ref.file is not None and not Path(ref.file).is_file():
        key = ("reference", "file")
        problems.append(f"{locate(key)}{dotted(key)}: reference table {ref.file!r} not found "
                        "(relative paths start at the current directory; omit it for the paper's tables)")
    params = validated.get(("dataset",))
    root = getattr(params, "root", None)
    if root is not None and not getattr(params, "download", False) and not Path(root).exists():
        key = ("dataset", "root")
        problems.append(f"{locate(key)}{dotted(key)}: dataset folder {str(root)!r} does not exist "
                        "(relative paths start at the current directory; set download = true "
                        "where the dataset plugin can fetch it)")
    return problems


def _check_device(device: str, locate: Locator) -> list[str]:
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


def _check_plugins(raw: dict, registry: Registry, locate: Locator, validated: dict) -> list[str]:
    """Problems with the plugin tables of ``raw``; each valid table's parameters go into
    ``validated`` by key path."""
    problems = []
    views = registry.view_makers()

    def check(kind: str, table: Any, path: tuple, spec: type[BaseModel]):
        if isinstance(table, str) and kind in ("model", "optimizer"):
            table = {"name": table}
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            return  # the schema check reports it
        try:
            plugin = registry.find(kind, table["name"])
        except UserError as exc:
            hint = "; leave optimizer out for the student schedule's SGD" if kind == "optimizer" else ""
            problems.append(f"{locate(path + ('name',))}{dotted(path + ('name',))}: {exc}{hint}")
            return
        params = {k: v for k, v in table.items() if k not in spec.model_fields}
        try:
            validated[path] = plugin.params.model_validate(params)
        except ValidationError as exc:
            for err in exc.errors():
                problems.append(describe(err, params, locate, plugin.params, prefix=path,
                                         extra_keys=set(spec.model_fields), plugin=plugin.name))
        for view in getattr(plugin.factory, "views", ()):  # read before the plugin is built
            if view not in views:
                where = f"{locate(path + ('name',))}{dotted(path + ('name',))}"
                problems.append(f"{where}: {kind.replace('_', ' ')} {plugin.name!r} asks for the "
                                f"augmentation view {view!r}, which no installed view plugin registers "
                                f"(known views: {', '.join(sorted(views)) or 'none'})")

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
        if isinstance(ms, dict) and ms.get("optimizer") is not None:
            check("optimizer", ms["optimizer"], ("method_sets", i, "optimizer"), OptimizerRef)
    return problems


def _check_optimizers(recipe: Recipe, registry: Registry, locate: Locator, validated: dict) -> list[str]:
    """A method set's optimizer plugin: it takes the loss in two parts, so the set needs a term
    of a method without a teacher (ce) and one with; and it must be able to use the student
    schedule of every pair (its schedule_problems)."""
    problems = []
    for m, ms in enumerate(recipe.method_sets):
        key = ("method_sets", m, "optimizer")
        methods = [("method_sets", m, "methods", j) for j in range(len(ms.methods))]
        if ms.optimizer is None or key not in validated or not all(k in validated for k in methods):
            continue  # none, or a name already reported
        plugin = registry.find("optimizer", ms.optimizer.name)
        at = f"{locate(key)}{dotted(key)}"
        teacher = [registry.find("student_method", t.name).factory.needs_teacher for t in ms.methods]
        missing = ('no label term; add { name = "ce" }' if all(teacher) else
                   "no distillation term" if not any(teacher) else None)
        if missing:
            problems.append(f"{at}: {plugin.name!r} splits the loss into the label terms (methods "
                            "without a teacher, e.g. ce) and the distillation terms, and method set "
                            f"{ms.display!r} has {missing}")
        schedules = [("student_schedule", recipe.student_schedule)]
        schedules += [(f"pairs[{i}].student_schedule", recipe.student_schedule_of(pair))
                      for i, pair in enumerate(recipe.pairs) if pair.student_schedule]
        for where, schedule in schedules:
            for problem in plugin.factory.schedule_problems(validated[key], schedule):
                problems.append(f"{at}: {plugin.name!r} cannot use {where}: {problem}")
    return problems
