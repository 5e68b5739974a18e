"""The teacher logit cache: a frozen teacher's logits under the standard crop+flip augmentation,
kept in a table (exact up to the rounding of the batch shape: see Exactness below). Not to be
confused with the recipe's ``teacher_cache``, the folder of trained teachers; the recipe key of
this one is ``teacher_logit_cache``.

With ``RandomCrop(padding=4)`` + ``RandomHorizontalFlip`` every training image has only
(2·4 + 1)² · 2 = 162 distinct views, and an eval-mode teacher's logits for a view never change.
A student whose methods read only the teacher's logits of that view (``teacher_logits_only``, no
extra views, teacher in eval mode) can take them from a table of shape (162, N, classes)
instead of running the teacher every step.

The table is filled lazily, once per epoch, from the epoch's planned draws (:class:`EpochPlan`):
the views drawn that are not in the table yet are computed in one pass, in chunks of the run's
batch size (the last chunk padded to it), under the run's autocast precision, then every step
of the epoch only gathers rows. So the step has no host sync, the teacher runs at most once per
(view, image) while the table lives, and students of the same teacher and batch size share it
(the runner trains them back to back and keeps the table between them).

Exactness: an eval-mode network computes each sample independently of the others, so an entry
is what the step would have computed for that sample, up to the floating-point order of the
convolution algorithm, which may depend on the batch *shape* (never, on the CPU, on the other
samples). Chunks have the step's batch shape for that reason. On the CPU in fp32, WRN, ResNet34,
VGG and ShuffleNetV2 give bit-identical logits at any batch size, so their KD students are
bit-identical with and without the cache (tests/test_logit_cache.py); ResNet50 and
MobileNetV2 differ in the last bits between batch sizes, which reaches a student only through
views drawn in an epoch's short last batch (the live teacher, too, computes one view at
different shapes in different epochs). On CUDA (bf16, cuDNN autotuning) it is unmeasured.

Memory: views × N × classes values in the teacher's output dtype (CIFAR-100 in bf16: 1.6 GB;
Tiny ImageNet: 6.5 GB), allocated up front so that a device too small for it is found before
training (the runner then runs the teacher live).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdbench.data.augment import crop_flip, crop_flip_decode, num_crop_flip_codes
from kdbench.data.loader import DeviceData, EpochPlan


class TeacherLogitCache:
    def __init__(self, data: DeviceData, num_classes: int, dtype: torch.dtype, chunk_size: int, amp):
        """``amp``: a callable returning the run's autocast context (the step's precision);
        ``dtype``: that of the teacher's logits under it. Raises torch.OutOfMemoryError if the
        table does not fit."""
        self.data, self.chunk_size, self.amp = data, chunk_size, amp
        self.teacher: nn.Module | None = None  # the frozen teacher of the student being trained
        views = num_crop_flip_codes()
        self.filled = torch.zeros(views, len(data), dtype=torch.bool, device=data.device)
        self.table = torch.empty((views, len(data), num_classes), dtype=dtype, device=data.device)
        self.computed = 0  # entries the teacher computed (for the record)
        self.served = 0  # entries looked up by steps

    @property
    def nbytes(self) -> int:
        return self.filled.numel() + self.table.numel() * self.table.element_size()

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
            # no_grad as the live step (not inference_mode): a compiled teacher reuses its graph
            with torch.no_grad(), self.amp():
                logits = self.teacher(x).logits
            if logits.dtype != self.table.dtype:  # a model whose logits leave autocast's dtype
                if self.computed > index.numel():
                    raise RuntimeError(f"teacher logits are {logits.dtype}, the cache's table "
                                       f"{self.table.dtype}")
                self.table = torch.empty_like(self.table, dtype=logits.dtype)  # nothing cached yet
            self.table[cc[:k], idx[:k]] = logits[:k]
        self.filled[code, index] = True

    def logits(self, index: Tensor, view_code: Tensor) -> Tensor:
        return self.table[view_code, index]

    def stats(self) -> dict:
        return {"entries_computed": self.computed, "entries_served": self.served,
                "teacher_forwards_saved": (1 - self.computed / self.served) if self.served else 0.0}


class LogitCacheKeeper:
    """The logit cache's lifetime over a grid: one table is kept, that of the current student's
    teacher and batch size (the runner trains a teacher's students back to back); a student of
    another teacher frees it first. The table outlives each student, the teacher reference
    does not (:meth:`release`)."""

    def __init__(self, device: torch.device, precision: str):
        from kdbench.engine.loop import autocast, autocast_dtype

        self.device, self.precision = device, precision
        self.dtype = autocast_dtype(device, precision) or torch.float32
        self._amp = lambda: autocast(device, precision)
        self._current: tuple[tuple, TeacherLogitCache] | None = None

    def attach(self, teacher_id: str, batch_size: int, task, data: DeviceData):
        """Give ``task`` (a StudentTask) the table of ``teacher_id`` if its method set allows it.
        Returns a callable giving the record's ``teacher_logit_cache`` entry."""
        key = (teacher_id, batch_size)  # chunks have the step's batch shape
        shared = self._current is not None and self._current[0] == key
        if not shared:
            self._current = None  # free the previous teacher's table first
        blocker = task.logit_cache_blocker()
        if blocker is None and not shared:
            try:
                self._current = (key, TeacherLogitCache(data, data.num_classes, self.dtype,
                                                        batch_size, self._amp))
            except (torch.OutOfMemoryError, RuntimeError) as exc:  # the CPU's is a RuntimeError
                if not isinstance(exc, torch.OutOfMemoryError) and "alloc" not in str(exc):
                    raise
                size = num_crop_flip_codes() * len(data) * data.num_classes * self.dtype.itemsize
                blocker = f"no room on {self.device} for the table ({size / 2**30:.1f} GiB)"
        if blocker is not None:
            return lambda: {"used": False, "why_not": blocker}
        cache = self._current[1]
        cache.teacher = task.teacher  # the same weights, loaded for this student
        before = cache.stats()
        task.use_logit_cache(cache)

        def report() -> dict:
            after = cache.stats()
            computed = after["entries_computed"] - before["entries_computed"]
            served = after["entries_served"] - before["entries_served"]
            return {"used": True, "shared_with_earlier_student": shared, "table_bytes": cache.nbytes,
                    "entries_computed": computed, "entries_served": served,
                    "teacher_forwards_saved": round(1 - computed / served, 6) if served else 0.0}
        return report

    def release(self) -> None:
        """After a student: the table stays, its teacher can go."""
        if self._current is not None:
            self._current[1].teacher = None
