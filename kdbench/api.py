"""Everything a plugin imports from kdbench: the data types that cross the plugin boundary.

A plugin module implements one or more hooks from :mod:`kdbench.hookspecs` (decorated with
:data:`hookimpl`) and calls ``register(name, factory, params=ParamsModel, help="one line")``.

Kinds of plugin and what their factories return:

* **model**: ``factory(num_classes, params) -> KDModel``; ``forward(x) -> ModelOutput``.
* **dataset**: ``factory(params, split) -> ImageData`` with uint8 images (N, C, H, W).
* **teacher objective**: ``factory(params, setup: ObjectiveSetup) -> TeacherObjective``.
* **student method**: ``factory(params, setup: MethodSetup) -> StudentMethod``.
* **optimizer**: ``factory(params) -> StudentOptimizer``: a student's update rule in place of
  the schedule's SGD.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import pluggy
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

hookimpl = pluggy.HookimplMarker("kdbench")


class Params(BaseModel):
    """Base of every plugin's config model: unknown keys are errors, values are validated."""

    # inf/nan are rejected: a plugin parameter of inf (a temperature, a weight) is a typo.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class NoParams(Params):
    pass


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing data, ...): one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
@dataclass
class ModelOutput:
    """What every model returns.

    ``feats[i]`` are per-stage outputs after the stage's final ReLU, the stem first;
    ``preact_feats[i]`` are the same maps before that ReLU (same shapes); ``pooled`` is the
    globally pooled penultimate vector that feeds the classifier.
    """

    logits: Tensor
    feats: list[Tensor]
    preact_feats: list[Tensor]
    pooled: Tensor


class KDModel(nn.Module):
    """Base class of distillable models. Subclasses implement ``forward`` -> ModelOutput and
    the two introspection methods below (used by OFD, ReviewKD and friends)."""

    def stage_channels(self) -> list[int]:
        """Channel count of ``feats[1:]`` (one entry per stage, stem excluded)."""
        raise NotImplementedError

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BatchNorm layer whose output feeds the final ReLU of each stage (``feats[1:]``)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
@dataclass
class ImageData:
    """One split of an image dataset, as uint8 tensors: images (N, C, H, W), labels (N,)."""

    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("ImageData.images must be a uint8 tensor of shape (N, C, H, W)")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("ImageData.labels must have shape (N,)")
        self.labels = self.labels.long()

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------
def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` up-cast to float32 if it is bf16/fp16 (float32 and float64 are left as they are).

    Under bf16 autocast (CUDA, or ``precision = "bf16"``) model outputs reach a plugin as bf16.
    A method's or objective's loss arithmetic (softmax, KL, logsumexp, exp with large
    arguments, distances, Gram matrices, normalisation, masks from medians) should run in fp32:
    up-cast its inputs with this and compute under ``torch.autocast(device_type, enabled=False)``
    so autocast does not cast them back. Learnable modules of a plugin may run in bf16; up-cast
    their outputs. On fp32 inputs this is the identity, so fp32 runs are unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def saveable(t: Tensor) -> Tensor:
    """``t``, or a copy of it if it is an inference tensor (made under ``torch.inference_mode``),
    which autograd cannot save for backward: what a method applies to a teacher tensor it feeds
    into a differentiable op (a regression target, an embedding's input). The engine runs the
    teacher under ``no_grad``, so there this returns ``t`` itself."""
    return t.clone() if t.is_inference() else t


# --------------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One training step's data, already on the training device.

    ``x`` is the normalised augmented view 0 (crop + flip); ``views`` holds any extra views a
    plugin asked for by name (e.g. ``"second"`` for a second crop+flip view, ``"strong"`` for
    RandAugment + Cutout), normalised the same way. ``index`` are the dataset indices of the
    samples (CRD's memory banks use them); ``view_code`` numbers the crop offset and flip of
    ``x`` (see :func:`kdbench.data.augment.crop_flip_code`) in epochs planned ahead (teacher
    logit cache), else None.
    """

    x: Tensor
    y: Tensor
    index: Tensor
    views: dict[str, Tensor] = field(default_factory=dict)
    epoch: int = 0  # 0-based
    epochs: int = 1
    step: int = 0  # global optimizer step, 0-based
    view_code: Tensor | None = None


@dataclass
class InitStage:
    """Epochs a method trains before distillation starts (RepDistiller's ``--init_epochs``: AB,
    FT and FSP pre-train their own modules first). The engine runs each method's stage with SGD
    (``lr``, ``momentum``, ``weight_decay``, no decay; ``lr = None``: the student schedule's
    learning rate, as RepDistiller's init for AB and FSP) on the training set, batches of the student
    schedule's size, view 0 only, the frozen teacher in eval mode and the student in train mode
    only if ``student_train_mode`` (RepDistiller keeps it in eval mode), with checkpoints and
    resume like any epoch; the stage's epochs go into the record under ``init_stages``.

    ``modules`` are what trains (the method's own modules, or parts of the student — they are
    put in train mode whatever the student's mode); ``loss(student_out, teacher_out, batch)``
    returns named terms, summed."""

    epochs: int
    modules: list[nn.Module]
    loss: Callable[["ModelOutput", "ModelOutput", "Batch"], dict[str, Tensor]]
    lr: float | None = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    student_train_mode: bool = False


@dataclass
class MethodSetup:
    """Everything a student method may use to build itself.

    ``student_out``/``teacher_out`` come from a dummy forward (batch of 2, eval mode) so modules
    can be sized from the real shapes. ``teacher`` is frozen: never give it to an optimizer.
    Under bf16 autocast its ``nn.Conv2d``/``nn.Linear`` weights become bf16 after set-up
    (:func:`kdbench.engine.runner.cast_teacher_once`): run it under autocast, as the step does.
    """

    student: KDModel
    teacher: KDModel | None
    student_out: ModelOutput
    teacher_out: ModelOutput | None
    num_classes: int
    num_train_samples: int
    train_labels: Tensor
    image_size: int
    device: torch.device


class StudentMethod(nn.Module):
    """A distillation method: returns named, already-weighted (by its own internal weights) loss
    terms; the recipe's per-method ``weight`` multiplies their sum.

    Class attributes declare what the method needs:
      * ``needs_teacher``: False only for the plain-CE student.
      * ``views``: names of extra augmented views (see :class:`Batch`) the student and teacher
        must also see; their outputs arrive in ``extra``.
      * ``default_weight``: the weight used when the recipe gives none (from the method card).
      * ``teacher_train_mode``: run the teacher in train mode (e.g. OFD's reference keeps the
        teacher's BN in train mode). The teacher still receives no gradient.
      * ``teacher_logits_only``: the method reads nothing of the teacher's output but
        ``logits``. When every method of a set says so (and none needs extra views), a recipe
        with ``teacher_logit_cache = true`` serves the teacher's logits from a cache; the
        teacher output the method then gets has empty ``feats``/``preact_feats`` and no
        ``pooled``.
      * ``revision``: raised when a change makes the same parameters train differently; a
        nonzero revision is part of the method's run specs (new ids, so a run finished under
        the old code is not taken for the new one); 0 leaves ids as they were.
    """

    needs_teacher: ClassVar[bool] = True
    revision: ClassVar[int] = 0
    views: ClassVar[tuple[str, ...]] = ()
    default_weight: ClassVar[float] = 1.0
    teacher_train_mode: ClassVar[bool] = False
    teacher_logits_only: ClassVar[bool] = False

    def forward(
        self,
        student: ModelOutput,
        teacher: ModelOutput | None,
        batch: Batch,
        extra: dict[str, tuple[ModelOutput, ModelOutput | None]],
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def epoch_stats(self) -> dict[str, float]:
        """Optional per-epoch statistics to record (read once per epoch)."""
        return {}

    def init_stage(self) -> InitStage | None:
        """Optional: epochs to train before distillation (see :class:`InitStage`)."""
        return None


@dataclass
class ObjectiveSetup:
    model: KDModel
    model_out: ModelOutput  # dummy forward, for sizing heads
    num_classes: int
    num_train_samples: int
    image_size: int
    device: torch.device


class TeacherObjective(nn.Module):
    """A teacher training objective: returns named loss terms (summed by the engine).

    ``views``: extra augmented views needed (e.g. ``("second",)`` for a positive view); their
    model outputs arrive in ``extra``, for the views in ``forward_views`` (default: all of
    ``views``; an objective that only needs a view's images, in ``batch.views``, lists fewer and
    saves the teacher's forward of it). ``encode`` runs the teacher (with gradient, in the
    current mode) on already-normalised images, for objectives that re-encode cached samples.
    Persistent state must live in buffers or ``get_extra_state`` so it is checkpointed.

    ``representation(out)``, optional: the embedding f(x) the objective trains (e.g. the logits
    or a projection of the pooled feature); the finished teacher's diagnostics then measure
    Section 4's distances and losses for it too, under ``representation_name``.

    ``revision``: as :class:`StudentMethod`'s (part of the teacher's run spec when nonzero).
    """

    views: ClassVar[tuple[str, ...]] = ()
    revision: ClassVar[int] = 0

    def forward(
        self,
        out: ModelOutput,
        batch: Batch,
        extra: dict[str, ModelOutput],
        encode: Callable[[Tensor], ModelOutput],
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def epoch_stats(self) -> dict[str, float]:
        """Optional per-epoch statistics (e.g. fraction of anchors passing a gate)."""
        return {}


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------
class StudentOptimizer:
    """How a student run turns its loss terms into a parameter update, in place of the
    schedule's SGD: a method set's ``optimizer = { name = "...", ... }``. Built once per run
    from its params (``factory(params)``).

    * ``build(parameters, schedule, device)``: the ``torch.optim.Optimizer`` that trains the
      parameters, with the schedule's lr (the schedule's MultiStepLR steps its groups' ``lr``)
      and whatever else of the schedule it uses; its ``state_dict`` is checkpointed.
    * ``step(optimizer, label_loss, distillation_loss)``: one training step's backward passes
      and update. ``label_loss`` is the sum of the terms of the set's methods that need no
      teacher (``needs_teacher = False``: the student's cross-entropy), ``distillation_loss``
      the sum of the others; the recipe check makes sure a set has both.

    ClassVars, read before building: ``revision`` (as :class:`StudentMethod`'s), and
    ``supports_ddp``: whether ``step`` works with the DDP-wrapped modules of a torchrun grid.
    ``schedule_problems(params, schedule)`` names what of a student schedule the rule cannot
    use; the recipe check reports it before anything trains.
    """

    revision: ClassVar[int] = 0
    supports_ddp: ClassVar[bool] = False

    @classmethod
    def schedule_problems(cls, params: Params, schedule) -> list[str]:
        return []

    def build(self, parameters: list[nn.Parameter], schedule, device: torch.device) -> torch.optim.Optimizer:
        raise NotImplementedError

    def step(self, optimizer: torch.optim.Optimizer, label_loss: Tensor, distillation_loss: Tensor) -> None:
        raise NotImplementedError
