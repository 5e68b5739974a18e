"""MLLD — Jin, Wang & Lin 2023, "Multi-level logit distillation" (CVPR).

Two views of every image: the weak view v = w (crop + flip: ``batch.x``, the engine's ``student``
and ``teacher`` arguments) and the strong view v = s (crop + flip + RandAugment(2, 10) + Cutout,
asked for with ``views = ("strong",)`` and passed as ``extra["strong"]``). The teacher sees both.
For logits z (B × C) and a temperature T let P = softmax(z / T) row-wise; superscripts t/s mark
teacher/student. For every T in ``temperatures`` (prediction augmentation, default {2,3,4,5,6}),
three alignment levels:

* instance:  L_ins^v(T) = T² · (1/B) · Σ_i a_i^v · KL(P^t_i ‖ P^s_i)
* batch:     L_bat^v(T) = (1/B) · Σ_{i,j} b_j^v · (P^t P^tᵀ − P^s P^sᵀ)_{ij}²      (B × B Grams)
* class:     L_cls^v(T) = (1/C) · Σ_{k,l} c_l^v · (P^tᵀ P^t − P^sᵀ P^s)_{kl}²      (C × C Grams)

    L_MLLD = 0.9 · Σ_T [L_ins^w(T) + L_bat^w(T) + L_cls^w(T) + Σ_{ℓ ∈ strong_levels} L_ℓ^s(T)]
             + 0.1 · CE(z^s_strong, y)

with ``strong_levels`` = {instance} by default: the weak view gets all three levels, the strong
view the instance level only — the terms the reference code optimises (it also computes strong
batch and class terms but leaves them out of its returned losses; see "Scale and stability"
below for why that matters). ``strong_levels = ["instance", "batch", "class"]`` gives all three
levels on both views. The three levels and the temperatures follow the paper as summarised in
the method card (the paper's own text was not available while writing this); the weak/strong
views, the T² factor, the ÷B and ÷C normalisations and the masks below are read from the
reference code.

Confidence masks (from the reference code; computed once per step, without gradient, from the
teacher's *weak-view* probabilities at T = 1, q = softmax(t^w)):

* sample mask m_i = 1[max_k q_ik ≤ median_i(max_k q_ik)] — the *less* confident half is kept
  (``le``, as in the reference; not the FixMatch-style ≥ threshold);
* class mask  n_k = 1[Σ_i q_ik ≤ median_k(Σ_i q_ik)] — the classes with the smaller summed
  probability are kept.

The median is ``np.percentile(·, 50)`` (linear interpolation, i.e. the mean of the two middle
values for an even count), computed with ``torch.quantile``; ties are kept, so a batch whose
confidences are all equal keeps every sample (and B = 1 keeps its one sample). The masks are
applied where the reference applies them: a = m, b = m, c = n on the weak view; on the strong view
only the batch level is masked (b = m; a = c = 1). In the batch and class terms the mask selects
Gram *columns* (the pairs whose second member is kept; the Grams are symmetric, so rows or columns
give the same sum) — the direct analogue of ``(loss * mask).mean()`` on a per-entry loss.

Weights and the student's CE (read this when writing a recipe): every KD-type term is multiplied
by ``kd_weight`` = 0.9 inside the method and ``default_weight`` is 1.0. The reference trains with
``0.1 · (CE(weak) + CE(strong))``; the recipe's ``ce`` method sees only the weak view, so MLLD
adds the strong-view CE itself, ``ce_weight_strong`` = 0.1 (term ``mlld_ce_strong``). The recipe
``[{name = "ce", weight = 0.1}, {name = "mlld"}]`` therefore has the reference's loss scale:
0.1·CE_w + 0.1·CE_s + 0.9·(KD-type terms). Give ``ce`` weight 0.1, not 1.0.

Returned terms (each already weighted and summed over the temperatures): ``mlld_instance_weak``,
``mlld_batch_weak``, ``mlld_class_weak``, ``mlld_<level>_strong`` for each level in
``strong_levels`` (by default ``mlld_instance_strong`` only) and ``mlld_ce_strong``. Everything
is computed in float32 with autocast off.

Deviations from the reference code (``mdistiller/distillers/KD_ours.py`` of
Jin-Ying/Multi-Level-Logit-Distillation), made to follow the paper's formulation:

1. Masks select samples/classes. In the reference every loss helper is called with its default
   ``reduce=True`` (the ``reduce=False`` argument is commented out), so ``(loss * mask).mean()``
   multiplies an already batch-averaged *scalar* by the fraction of kept samples (or classes):
   the masks only scale the weak-view terms by ≈ 0.5 and select nothing. Here the mask weights
   each sample's (column's) contribution, as the masking evidently intends. Scale: the weak
   instance term stays close to the reference's (both ≈ half the unmasked sum), but the kept
   Gram columns are the *low*-mass ones, so the weak batch and class terms are smaller than the
   reference's ½·(full sum) — about ¼ and ⅛ of it on a synthetic trained-teacher-like batch
   (B = 64, C = 100).
2. In the reference's strong-view instance sum (and its unused strong class sum) the T = 2 and
   T = 6 terms use the *weak* logits (a copy-paste slip); here every strong-view term uses the
   strong logits.
3. The reference lists its temperatures as 4, 3, 5, 2, 6 (4 being ``cfg.KD.TEMPERATURE``); the
   set is the same.

``reference_quirks = true`` reproduces the reference's returned loss instead (1–2 undone: masks
as scalar fractions, T ∈ {2, 6} strong instance terms on weak logits; it cannot be combined with
a non-default ``strong_levels``); tests/test_method_mlld.py checks both modes against
independent numpy derivations.

Scale and stability (measured; read this before putting MLLD in a short or few-class recipe):

* There is no reduction bug behind MLLD's large loss: on a real batch (trained WRN-16-2 teacher,
  synthetic 10 classes, B = 64, fresh student) ``reference_quirks`` equals an independent numpy
  re-derivation of ``KD_ours.forward_train`` (14.39 both). The size is the reference's own: five
  temperatures, each instance term with T², on two views — at initialisation (fresh student,
  trained teachers, 5 and 10 classes) the reference's KD-type terms are ≈ 7–9× a single
  KD(T = 4) term in value and ≈ 5–6× in gradient norm on the student's logits (the default here:
  ≈ 3–5× and ≈ 4–4.5×). The ≈ 300 seen in the tiny leaderboard's first epoch is not the starting
  value (≈ 15–30 there) but the epoch mean after the student's logits blew up. The reference
  trains MLLD at lr 0.025 (every CIFAR-100 config of the repo) where the mdistiller baselines
  use 0.05, and with no warm-up (``KD_ours.forward_train`` ignores the epoch; its trainer has
  none), so this plugin has no warm-up either.
* The class level matters only with few classes: the C × C Gram entries are sums over the
  batch (unnormalised), so with teacher-like logits its gradient on the student's logits is
  ≈ 0.8× the instance level's at C = 5, B = 32, ≈ 0.25× at C = 10, B = 64 and < 10⁻³× at
  C = 100, B = 64. Few-class toy data sets run the class terms at full strength where
  CIFAR-100 barely feels them.
* Adding the strong-view class term (``strong_levels`` with "class", the previous default here)
  is what kept the tiny example leaderboard (recipes/table1_tiny.toml: 5 classes, 16×16, B = 32,
  4 epochs, lr 0.05) at chance. WRN-40-2→WRN-16-2 / VGG13→VGG8 there, 4 seeds, mean top-1:
  all levels on both views 25.5 / 28.0; the default (strong instance only) 51.3 / 39.8;
  ``reference_quirks`` 51.9 / 42.5; KD 59.8 / 65.5. At the reference's lr 0.025: 50.3 / 33.9,
  55.1 / 65.1, 60.8 / 67.4 and KD 59.0 / 69.0 (seed-to-seed spread ≈ ±10 points). A 1- or
  2-epoch linear warm-up of the MLLD terms did not rescue the all-levels variant. (The
  ResNet50→ResNet34 pair of that recipe stays near chance with every variant,
  ``reference_quirks`` included, while KD reaches ≈ 37.)

Schedules: the published MLLD results used 480 epochs against 240 for the baselines (see the
method card); compare methods on equal schedules.

Logit standardisation (``logit_standardize = true``; Sun et al. 2024, see ``_logits.py``): as in
the LS reference's ``mdistiller/distillers/MLKD.py`` only the instance-level KL terms see
z-scored logits (student and teacher, both views); the batch and class Grams and the confidence
masks use the raw logits, as there. Every KD-type term is multiplied by ``ls_scale`` = 10
(``kd_weight`` 0.9 → the reference's KD weight 9); the strong-view CE is not (the reference keeps
CE 0.1). Deviation: the reference sets ``cfg.KD.TEMPERATURE`` to the base temperature 2, which
turns its temperature list {T, 3, 5, 2, 6} into {2, 3, 5, 2, 6} (T = 2 twice, no T = 4); here
``temperatures`` stay {2, 3, 4, 5, 6} unless the recipe sets them.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, field_validator, model_validator
from torch import Tensor

from kdbench.api import StudentMethod, UserError, hookimpl
from kdbench_plugins.students._logits import LogitStandardization, standardize_logits


class MLLDParams(LogitStandardization):
    ls_defaults = {"ls_scale": 10.0}

    temperatures: tuple[PositiveFloat, ...] = Field(
        (2.0, 3.0, 4.0, 5.0, 6.0), min_length=1,
        description="softmax temperatures of the prediction augmentation")
    kd_weight: float = Field(0.9, ge=0, description="weight of every instance/batch/class term")
    ce_weight_strong: float = Field(
        0.1, ge=0, description="weight of the student's CE on the strong view (the weak-view CE "
        "is the recipe's separate `ce` method, weight 0.1)")
    strong_levels: tuple[Literal["instance", "batch", "class"], ...] = Field(
        ("instance",), description="alignment levels applied to the strong view (the weak view "
        "always gets all three); the reference optimises only the instance level there")
    reference_quirks: bool = Field(
        False, description="reproduce the reference code's loss (scalar masks, weak logits in "
        "two strong terms) instead of the paper's")

    @field_validator("strong_levels")
    @classmethod
    def _unique_levels(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"strong_levels repeats a level: {list(v)}")
        return v

    @model_validator(mode="after")
    def _quirks_fix_the_levels(self):
        if self.reference_quirks and self.strong_levels != ("instance",):
            raise ValueError("reference_quirks reproduces the reference's terms (strong view: "
                             "instance level only); leave strong_levels at its default")
        return self


def confidence_masks(teacher_weak_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(sample mask (B,), class mask (C,)) as float 0/1: kept where the teacher's weak-view
    max-probability (resp. summed class probability) at T = 1 is at most its median."""
    with torch.no_grad():
        q = F.softmax(teacher_weak_logits.float(), dim=1)
        conf = q.max(dim=1).values
        cls = q.sum(dim=0)
        sample_mask = (conf <= torch.quantile(conf, 0.5)).float()
        class_mask = (cls <= torch.quantile(cls, 0.5)).float()
    return sample_mask, class_mask


def instance_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """Per-sample T² · KL(softmax(t/T) ‖ softmax(s/T)), shape (B,)."""
    log_ps = F.log_softmax(s / temperature, dim=1)
    log_pt = F.log_softmax(t / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(1) * temperature**2


def batch_gram_sq(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """(P^t P^tᵀ − P^s P^sᵀ)² / B, shape (B, B)."""
    ps = F.softmax(s / temperature, dim=1)
    pt = F.softmax(t / temperature, dim=1)
    return (pt @ pt.t() - ps @ ps.t()).pow(2) / s.shape[0]


def class_gram_sq(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """(P^tᵀ P^t − P^sᵀ P^s)² / C, shape (C, C)."""
    ps = F.softmax(s / temperature, dim=1)
    pt = F.softmax(t / temperature, dim=1)
    return (pt.t() @ pt - ps.t() @ ps).pow(2) / s.shape[1]


def mlld_terms(s_w: Tensor, t_w: Tensor, s_s: Tensor, t_s: Tensor, temperatures,
               kd_weight: float = 0.9, reference_quirks: bool = False,
               strong_levels=("instance",), logit_standardize: bool = False) -> dict[str, Tensor]:
    """The KD-type terms of MLLD (weighted by ``kd_weight``, summed over the temperatures); the
    strong view gets only the levels in ``strong_levels`` (ignored with ``reference_quirks``).
    With ``logit_standardize`` the instance-level terms see z-scored logits (as the LS
    reference); batch, class and masks see the raw ones."""
    with torch.autocast(device_type=s_w.device.type, enabled=False):
        s_w, s_s = s_w.float(), s_s.float()
        t_w, t_s = t_w.detach().float(), t_s.detach().float()
        m, n = confidence_masks(t_w)
        # the instance level's inputs: z-scored under logit standardisation, else the raw logits
        ins = {"weak": (s_w, t_w), "strong": (s_s, t_s)}
        if logit_standardize:
            ins = {v: (standardize_logits(s), standardize_logits(t)) for v, (s, t) in ins.items()}
        terms = {}
        if reference_quirks:
            fm, fn = m.mean(), n.mean()  # the reference's mask acts as this scalar factor
            terms["mlld_instance_weak"] = sum(
                instance_kl(*ins["weak"], T).mean() * fm for T in temperatures)
            terms["mlld_instance_strong"] = sum(
                instance_kl(*ins["weak" if T in (2.0, 6.0) else "strong"], T).mean()
                for T in temperatures)
            terms["mlld_batch_weak"] = sum(
                batch_gram_sq(s_w, t_w, T).sum() * fm for T in temperatures)
            terms["mlld_class_weak"] = sum(
                class_gram_sq(s_w, t_w, T).sum() * fn for T in temperatures)
        else:
            b = s_w.shape[0]
            for view, s, t in (("weak", s_w, t_w), ("strong", s_s, t_s)):
                levels = ("instance", "batch", "class") if view == "weak" else strong_levels
                a = m if view == "weak" else None
                c = n if view == "weak" else None
                for level in levels:
                    total = 0.0
                    for T in temperatures:
                        if level == "instance":
                            kl = instance_kl(*ins[view], T)
                            total = total + (kl if a is None else kl * a).sum() / b
                        elif level == "batch":  # masked on both views, as in the reference
                            total = total + (batch_gram_sq(s, t, T) * m).sum()
                        else:
                            g = class_gram_sq(s, t, T)
                            total = total + (g if c is None else g * c).sum()
                    terms[f"mlld_{level}_{view}"] = total
        return {k: kd_weight * v for k, v in terms.items()}


class MLLD(StudentMethod):
    views = ("strong",)
    default_weight = 1.0  # kd_weight 0.9 and the strong-view CE 0.1 are inside (see docstring)

    def __init__(self, params: MLLDParams, setup):
        super().__init__()
        self.temperatures = tuple(float(T) for T in params.temperatures)
        self.kd_weight = params.kd_weight
        self.ce_weight_strong = params.ce_weight_strong
        self.reference_quirks = params.reference_quirks
        self.strong_levels = tuple(params.strong_levels)
        self.logit_standardize = params.logit_standardize
        self.ls_factor = params.ls_factor  # on the KD-type terms only

    def forward(self, student, teacher, batch, extra):
        if "strong" not in extra or extra["strong"][1] is None:
            raise UserError("mlld needs the strong view of student and teacher (extra['strong'])")
        student_strong, teacher_strong = extra["strong"]
        terms = mlld_terms(student.logits, teacher.logits, student_strong.logits,
                           teacher_strong.logits, self.temperatures,
                           self.kd_weight * self.ls_factor,
                           self.reference_quirks, self.strong_levels, self.logit_standardize)
        with torch.autocast(device_type=batch.y.device.type, enabled=False):
            terms["mlld_ce_strong"] = self.ce_weight_strong * F.cross_entropy(
                student_strong.logits.float(), batch.y)
        return terms


@hookimpl
def kdbench_register_student_methods(register):
    register("mlld", MLLD, params=MLLDParams,
             help="multi-level logit distillation: instance/batch/class levels, two views")
