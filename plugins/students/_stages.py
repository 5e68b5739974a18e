"""Stage matching shared by the feature-map methods that compare ``feats[1:]`` stage by stage
(AT, NST): the deepest ``min(student stages, teacher stages)`` stages are paired, as OFD and VID
pair them here, and each pair of maps is pooled to their common size."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdbench.api import UserError


def matched_stage_count(setup, method: str) -> int:
    """How many of ``feats[1:]``'s deepest stages both nets have; UserError (naming ``method``)
    if either has none, or a stage output is not a (B, C, H, W) map."""
    n_s, n_t = len(setup.student_out.feats) - 1, len(setup.teacher_out.feats) - 1
    if min(n_s, n_t) < 1:
        raise UserError(f"{method} needs at least one stage in feats[1:] of both nets (student has "
                        f"{n_s}, teacher {n_t})")
    for name, out in (("student", setup.student_out), ("teacher", setup.teacher_out)):
        for i, f in enumerate(out.feats[1:], start=1):
            if f.dim() != 4:
                raise UserError(f"{method}: {name} feats[{i}] has shape {tuple(f.shape)}; "
                                f"{method.upper()} needs (B, C, H, W) maps")
    return min(n_s, n_t)


def pool_to_common(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool each map to (min H, min W) of the two (a no-op when already there)."""
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if tuple(s.shape[-2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[-2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


def deepest_pairs(student, teacher, k: int):
    """(student map, teacher map) of the ``k`` deepest stages of ``feats[1:]``."""
    return zip(student.feats[1:][-k:], teacher.feats[1:][-k:])
