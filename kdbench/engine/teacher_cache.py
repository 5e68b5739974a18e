"""An exact cache of a frozen teacher's logits under the standard crop+flip augmentation.

With ``RandomCrop(padding=4)`` + ``RandomHorizontalFlip`` every training image has only
(2·4 + 1)² · 2 = 162 distinct views, and an eval-mode teacher's logits for a view never change.
A student whose methods read only the teacher's logits of that view (``teacher_logits_only``, no
extra views, teacher in eval mode) can take them from a table of shape (162, N, classes)
instead of running the teacher every step.

The table is filled lazily, once per epoch, from the epoch's planned draws (:class:`EpochPlan`):
the views drawn that are not in the table yet are computed in one pass, in chunks of the run's
batch size (the last chunk padded to it), under the run's autocast precision, then every step
of the epoch only gathers rows. So the step has no host sync, the teacher runs at most once per
(view, image) in a process, and students of the same teacher (the runner keeps one table per
teacher while it trains that teacher's students) share the work.

Exactness: an eval-mode network computes each sample independently of the others, so an entry
equals what the step would have computed for that sample up to the floating-point order of the
convolution algorithm, which can depend on the batch shape. Chunks have the step's batch shape
for that reason: on the CPU every zoo model gives bit-identical logits whatever the chunk's
other samples (tests/test_teacher_cache.py trains a KD student with and without the cache and
gets bit-identical weights). The live teacher itself computes a view drawn in an epoch's short
last batch in another shape than the same view drawn in a full batch; the cache computes every
view in the full shape.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdbench.data.augment import crop_flip, crop_flip_decode, num_crop_flip_codes
from kdbench.data.loader import DeviceData, EpochPlan


class TeacherLogitCache:
    def __init__(self, teacher: nn.Module, data: DeviceData, chunk_size: int, amp):
        """``amp``: a callable returning the run's autocast context (the step's precision)."""
        self.teacher, self.data, self.chunk_size, self.amp = teacher, data, chunk_size, amp
        self.filled = torch.zeros(num_crop_flip_codes(), len(data), dtype=torch.bool, device=data.device)
        self.table: Tensor | None = None  # (views, N, classes), allocated at the first fill
        self.computed = 0  # entries the teacher computed (for the record)
        self.served = 0  # entries looked up by steps

    @property
    def nbytes(self) -> int:
        return self.filled.numel() + (self.table.numel() * self.table.element_size() if self.table is not None else 0)

    def fill(self, plan: EpochPlan) -> None:
        """Compute the entries of ``plan``'s views that are not cached yet (one host sync)."""
        index, code = plan.index, plan.view_code
        missing = ~self.filled[code, index]
        index, code = index[missing], code[missing]  # an epoch draws each image once: no repeats
        self.served += int(missing.numel())
        self.computed += int(index.numel())
        self.teacher.eval()  # the cache is only exact for a frozen eval-mode teacher
        for start in range(0, index.numel(), self.chunk_size):
            idx, cc = index[start:start + self.chunk_size], code[start:start + self.chunk_size]
            k = idx.numel()
            if k < self.chunk_size:  # pad to the step's batch shape (same convolution algorithm)
                pad = torch.arange(self.chunk_size - k, device=idx.device) % k
                idx, cc = torch.cat([idx, idx[pad]]), torch.cat([cc, cc[pad]])
            x = self.data.normalize(crop_flip(self.data.images[idx], *crop_flip_decode(cc)))
            with torch.inference_mode(), self.amp():
                logits = self.teacher(x).logits
            if self.table is None:
                self.table = torch.empty((self.filled.shape[0], len(self.data), logits.shape[1]),
                                         dtype=logits.dtype, device=logits.device)
            self.table[cc[:k], idx[:k]] = logits[:k]
        self.filled[code, index] = True

    def logits(self, index: Tensor, view_code: Tensor) -> Tensor:
        return self.table[view_code, index]

    def stats(self) -> dict:
        return {"entries_computed": self.computed, "entries_served": self.served,
                "teacher_forwards_saved": (1 - self.computed / self.served) if self.served else 0.0}
