"""The recipe's schema: the TOML keys kdbench itself reads, with their types and defaults.
Tables that name a plugin allow extra keys: those are the plugin's parameters, validated by the
plugin's own model (:func:`kdbench.recipe.load_recipe`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator, model_validator)


class _Strict(BaseModel):
    # strict: "2" is not an integer and "yes" is not a boolean (ints still pass as floats);
    # inf and nan are not numbers a recipe can mean.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _WithPluginParams(BaseModel):
    # The core keys of a plugin table are strict too (field by field: the extra keys are the
    # plugin's, validated by its own model).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelRef(_WithPluginParams):
    name: StrictStr
    label: StrictStr | None = None


class Pair(_Strict):
    teacher: ModelRef
    student: ModelRef
    label: str | None = None
    ref_teacher: str | None = Field(None, description="teacher name in the reference table")
    ref_student: str | None = Field(None, description="student name in the reference table")
    student_schedule: dict[str, Any] | None = Field(
        None, description="keys of [student_schedule] this pair's students use instead (e.g. "
        "lr = 0.01 for MobileNetV2/ShuffleNet students, as the reference scripts)")
    method_params: dict[str, dict[str, Any]] | None = Field(
        None, description="parameters of a method this pair's students use instead of the method "
        "set's, by method name (e.g. { dkd = { beta = 2.0 } }, DKD's per-pair β)")

    @field_validator("teacher", "student", mode="before")
    @classmethod
    def _short(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @property
    def display(self) -> str:
        return self.label or f"{self.teacher.label or self.teacher.name}→{self.student.label or self.student.name}"


class DatasetSpec(_WithPluginParams):
    name: StrictStr
    subset_per_class: StrictInt | None = Field(None, gt=0)
    test_subset_per_class: StrictInt | None = Field(None, gt=0)
    val_per_class: StrictInt | StrictFloat | None = Field(
        None, gt=0, description="hold out this many training samples per class (an integer) or "
        "this fraction of each class (a number below 1) as a validation split: the best epoch "
        "is chosen on it; part of run ids")
    label: StrictStr | None = None

    @field_validator("val_per_class")
    @classmethod
    def _fraction_below_one(cls, v):
        if isinstance(v, float) and not v < 1:
            raise ValueError("a fraction must be below 1 (an integer is a count per class)")
        return v


class TeacherObjectiveSpec(_WithPluginParams):
    name: StrictStr
    label: StrictStr | None = None
    checkpoint: StrictStr | None = Field(None, description="load this published teacher instead of "
                                         "training one (RepDistiller/mdistiller layouts accepted)")
    ref_teacher: StrictBool = Field(False, description="these teachers are the reference table's "
                              "teacher row (the paper's teachers are CE-trained); not part of run ids")

    @property
    def display(self) -> str:
        return self.label or self.name


class MethodTerm(_WithPluginParams):
    name: StrictStr
    weight: float | None = Field(None, ge=0, strict=True)


class OptimizerRef(_WithPluginParams):
    name: StrictStr


class MethodSet(_Strict):
    label: str | None = None
    methods: list[MethodTerm] = Field(min_length=1)
    optimizer: OptimizerRef | None = Field(
        None, description="an optimizer plugin that trains this set's students instead of the "
        "student schedule's SGD (e.g. \"dot\"); part of run ids when given")
    teachers: list[str] | None = Field(None, description="labels of the teacher objectives to use")
    ref_method: str | None = None

    @field_validator("optimizer", mode="before")
    @classmethod
    def _short(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @property
    def display(self) -> str:
        return self.label or "+".join(m.name for m in self.methods)


MAX_EPOCHS = 100_000  # a bound that catches a typo (99999999999999999999999) before it trains


class Schedule(_Strict):
    epochs: int = Field(gt=0, le=MAX_EPOCHS)
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
    table: str | None = None  # the paper's table; with dataset, or neither when literature is given
    dataset: str | None = None
    file: str | None = None  # default: the paper's tables shipped with kdbench
    literature: list[str] | None = Field(
        None, min_length=1, description="published numbers to show beside every cell, by source "
        "(\"CRD\", \"DKD\", \"DOT\", \"LS\", \"DIST\" or the CSV's full source name; "
        "kdbench/references/literature-cifar100.csv, kdbench/literature.py)")

    @field_validator("literature")
    @classmethod
    def _known_sources(cls, v):
        from kdbench.literature import resolve_sources

        if v is not None:
            resolve_sources(v)  # ValueError naming the unknown source and the valid ones
        return v

    @model_validator(mode="after")
    def _table_or_literature(self):
        if (self.table is None) != (self.dataset is None):
            raise ValueError("give both table and dataset (the paper's table), or neither")
        if self.table is None and not self.literature:
            raise ValueError("name the paper's table (table, dataset) or literature sources "
                             "(literature = [\"CRD\", \"DKD\"])")
        return self


class LeaderboardSpec(_Strict):
    baseline: str | None = Field(None, description="label of the method set every row is compared "
                                 "with (paired over shared seeds); not part of run ids")


class Recipe(_Strict):
    name: str | None = None
    output: str | None = None
    teacher_cache: str | None = None  # a folder of trained teachers shared between recipes
    device: str = "auto"
    launcher: str = Field("inline", description="how the grid is run (kdbench run --launcher; "
                          "kdbench.launchers.LAUNCHERS); not part of run ids")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = Field(False, description="torch.compile the nets' forward (CUDA); not part "
                          "of run ids, since it changes speed, not the computation")
    deterministic: bool = False
    teacher_logit_cache: bool = Field(
        False, description="serve a frozen teacher's logits from an exact per-view cache to "
        "method sets that read only logits (kdbench/engine/logit_cache.py; not the same thing as "
        "teacher_cache, the folder of trained teachers); not part of run ids")
    checkpoint_every_steps: int | None = Field(None, gt=0, description="also checkpoint every N "
                                               "steps (always at every epoch's end); not part of run ids")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    teacher_seed: int | None = None
    report: Literal["final", "best"] = "final"
    eval_batch_size: int = Field(512, gt=0)
    eval_every: int = Field(1, gt=0, description="evaluate every N epochs (the last epoch always); "
                            "not part of run ids: evaluation does not change training")
    eval_subset_per_class: int | None = Field(
        None, gt=0, description="evaluate the test set on this many images per class after the "
        "epochs that are neither the last nor a new best on validation (those on the whole test "
        "set); not part of run ids")
    diagnostics_temperature: float = Field(4.0, gt=0)
    dataset: DatasetSpec
    pairs: list[Pair] = Field(min_length=1)
    teacher_objectives: list[TeacherObjectiveSpec] = Field(
        default_factory=lambda: [TeacherObjectiveSpec(name="ce")], min_length=1)
    method_sets: list[MethodSet] = Field(min_length=1)
    teacher_schedule: Schedule
    student_schedule: Schedule
    reference: Reference | None = None
    leaderboard: LeaderboardSpec | None = None

    def student_schedule_of(self, pair: Pair) -> Schedule:
        """The student schedule of ``pair``: its ``student_schedule`` keys over the recipe's."""
        if not pair.student_schedule:
            return self.student_schedule
        return Schedule.model_validate({**self.student_schedule.model_dump(), **pair.student_schedule})

    @field_validator("launcher")
    @classmethod
    def _known_launcher(cls, v):
        from kdbench.launchers import LAUNCHERS

        if v not in LAUNCHERS:
            raise ValueError(f"unknown launcher {v!r}; use one of {', '.join(LAUNCHERS)}")
        return v
