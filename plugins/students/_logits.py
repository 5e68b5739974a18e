"""Logit standardisation — Sun, Wang, Ren, Cao & Zhang 2024, "Logit standardization in
knowledge distillation" (CVPR) — shared by the logit methods kd, dkd, mlld, dist and ctkd.

    Z(z)_k = (z_k − mean(z)) / (std(z) + ε),    mean and std over the C classes of one sample

applied to the student's and the teacher's logits before the temperature (softmax(Z(z) / T)).
As in the reference (``normalize`` in mdistiller/distillers/KD.py, DKD.py, MLKD.py and
CTKD/distiller_zoo/KD.py of sunshangquan/logit-standardization-KD): ``std`` is torch's default,
the *unbiased* one (÷ (C − 1)), and ε = 1e-7 is added to the std, not inside the root.

The option (``logit_standardize = true`` on a method, :class:`LogitStandardization`) also
brings the reference's base temperature and loss weight, filled in for whichever of them the
recipe leaves unset (``ls_defaults`` of each method's params):

* the reference's ``tools/train.py`` (``--logit-stand --base-temp 2 --kd-weight 9``) sets, for
  KD and MLKD, the KD weight to 9 and the temperature to 2; for DKD, α ← 9·α, β ← 9·β and T = 2.
  Its config defaults (mdistiller/engine/cfg.py) agree: KD T 2, CE 0.1, KD 9. Its CTKD copy
  trains KD at ``-r 0.1 -a 9`` (CTKD/scripts/run_cifar_distill.sh); the temperature stays the
  learned one.
* Here the recipe's method weight stays what it is without the option (kd 0.9, dkd 1.0,
  mlld 1.0, ctkd 0.9, dist 2.0) and ``ls_scale`` multiplies the method's terms: kd 10
  (0.9 × 10 = the reference's 9), dkd 9 (α and β × 9), mlld 10 (kd_weight 0.9 × 10 = 9; its
  strong-view CE is not scaled: the reference keeps CE 0.1), ctkd 10 (0.9 × 10 = 9), dist 1
  (the reference has no DIST: DIST keeps its own τ = 4 and weight). A recipe that writes the
  reference's weight 9 as the method weight *and* turns the option on gets 9 × ls_scale: give
  one of them, not both.
* The reference's logs (logs/KD, logs/DKD, logs/MLKD: file names end in
  ``base temp, kd weight[, DKD β]``) show per-pair values besides 2 / 9, e.g. KD
  resnet110→resnet20 at T 4, weight 12; DKD wrn_40_2→wrn_16_2 at T 2, weight 12, β 2;
  MLKD vgg13→vgg8 at weight 6. Set ``temperature`` / ``ls_scale`` per pair to follow them.

Without the option (the default) nothing changes, and the two fields are left out of the
parameters' dump, so run ids of recipes that do not use them are those from before the option.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, TypeAdapter, ValidationError, model_validator
from torch import Tensor

from kdbench.api import Params, UserError, at_least_fp32

LS_EPS = 1e-7  # added to the per-sample std, as in the reference
_BOOL = TypeAdapter(bool)


def standardize_logits(z: Tensor) -> Tensor:
    """(z − mean) / (std + 1e-7) per row (over the classes, dim 1); unbiased std as the
    reference's ``logit.std(dim=-1)``. Computed in the dtype of ``z`` (up-cast it first)."""
    if z.dim() != 2 or z.shape[1] < 2:
        raise UserError(f"logit standardisation needs logits of shape (batch, classes ≥ 2); got "
                        f"{tuple(z.shape)}")
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True)  # unbiased (÷ C − 1), as torch's default
    return (z - mean) / (std + LS_EPS)


def fp32_logit_pair(student_logits: Tensor, teacher_logits: Tensor, standardize: bool,
                    method: str) -> tuple[Tensor, Tensor]:
    """The student's logits and the teacher's (detached) in at least float32, z-scored if
    ``standardize``: the start of a logit method's loss, to call with autocast off. UserError
    (naming ``method``) unless the logits are (batch, classes ≥ 2)."""
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise UserError(f"{method} needs logits of shape (batch, classes ≥ 2); got "
                        f"{tuple(student_logits.shape)}")
    s, t = at_least_fp32(student_logits), at_least_fp32(teacher_logits).detach()
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    return s, t


def _is_false(v: Any) -> bool:
    return v is False


def _is_none(v: Any) -> bool:
    return v is None


class LogitStandardization(Params):
    """Mixin of a logit method's parameters: the logit-standardisation option.

    ``ls_defaults`` (a ClassVar of the subclass) are the values the option fills in for the
    fields a recipe leaves unset when ``logit_standardize`` is true (``temperature``,
    ``ls_scale``). Both option fields are left out of ``model_dump`` while at their defaults
    (false / unset), so the dump, and every run id made from it, is unchanged for recipes that
    do not turn the option on.
    """

    ls_defaults: ClassVar[dict[str, Any]] = {}

    logit_standardize: bool = Field(
        False, exclude_if=_is_false,
        description="z-score student and teacher logits per sample (Sun et al. 2024) before the "
        "temperature; unset temperature / ls_scale then take the LS reference's values")
    ls_scale: float | None = Field(
        None, ge=0, exclude_if=_is_none,
        description="factor on this method's loss terms under logit_standardize (default: the "
        "LS reference's, e.g. kd 10: recipe weight 0.9 × 10 = its KD weight 9); only with "
        "logit_standardize = true")

    @model_validator(mode="before")
    @classmethod
    def _fill_ls_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "logit_standardize" not in data:
            return data
        try:
            on = _BOOL.validate_python(data["logit_standardize"])
        except ValidationError:
            return data  # the field's own validation reports it
        return {**cls.ls_defaults, **data} if on else data

    @model_validator(mode="after")
    def _ls_fields_need_the_option(self):
        if not self.logit_standardize and self.ls_scale is not None:
            raise ValueError("ls_scale applies only with logit_standardize = true")
        return self

    @property
    def ls_factor(self) -> float:
        """The factor on the method's terms: ls_scale under the option, else 1."""
        return float(self.ls_scale) if self.logit_standardize and self.ls_scale is not None else 1.0
