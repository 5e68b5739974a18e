"""Device-resident data: the whole split lives on the training device as uint8; an epoch is one
permutation on the device, and every batch is a gather + batched augmentation + normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor

from kdbench.api import Batch, ImageData
from kdbench.data.augment import Normalizer, crop_flip, crop_flip_code, draw_crop_flip


def subset_per_class(data: ImageData, per_class: int | None, seed: int = 0) -> ImageData:
    """The first ``per_class`` samples of every class, in a seeded random order (a small but
    balanced version of a real dataset for tiny runs)."""
    if per_class is None:
        return data
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.labels), generator=g)
    labels = data.labels[order]
    keep = []
    for c in range(data.num_classes):
        keep.append(order[labels == c][:per_class])
    idx = torch.cat(keep).sort().values
    return ImageData(data.images[idx], data.labels[idx], data.num_classes, data.mean, data.std)


VAL_SPLIT_SEED = 1  # the validation split's draw (the subsets' is 0): fixed, so it is in the run id


def hold_out_per_class(data: ImageData, per_class: int | float, seed: int = VAL_SPLIT_SEED) -> tuple[ImageData, ImageData]:
    """(rest, held out): ``per_class`` samples of every class (an int), or that fraction of each
    class (a float in (0, 1), rounded, at least one), drawn in a seeded random order. The
    validation split of the training set; raises ValueError if a class has too few samples."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.labels), generator=g)
    labels = data.labels[order]
    held = []
    for c in range(data.num_classes):
        members = order[labels == c]
        k = per_class if isinstance(per_class, int) else max(1, round(per_class * len(members)))
        if k >= len(members):
            raise ValueError(f"class {c} has {len(members)} training samples: too few to hold out "
                             f"{k} for validation and train on the rest")
        held.append(members[:k])
    held_idx = torch.cat(held).sort().values
    keep = torch.ones(len(data.labels), dtype=torch.bool)
    keep[held_idx] = False
    rest_idx = keep.nonzero().squeeze(1)
    take = lambda idx: ImageData(data.images[idx], data.labels[idx], data.num_classes, data.mean, data.std)  # noqa: E731
    return take(rest_idx), take(held_idx)


ViewMaker = Callable[[Tensor, torch.Generator], Tensor]  # uint8 images in, uint8 images out


@dataclass
class EpochPlan:
    """An epoch's random draws made up front: the sample order and every batch's crop offsets
    and flips, drawn from the generator in exactly the order :meth:`DeviceData.train_batches`
    draws them batch by batch (so planned and unplanned epochs are the same epoch). Only for
    epochs without extra views, whose draws would come in between."""

    batches: list[tuple[Tensor, Tensor, Tensor]]  # (index, offsets, flips) per batch

    @property
    def index(self) -> Tensor:
        return torch.cat([b[0] for b in self.batches])

    @property
    def view_code(self) -> Tensor:
        return torch.cat([crop_flip_code(b[1], b[2]) for b in self.batches])


class DeviceData:
    """One split on the device with its normaliser. ``view_makers`` are the named extra views
    a task may ask for (the registry's view plugins: :meth:`Registry.view_makers`)."""

    def __init__(self, data: ImageData, device: torch.device,
                 view_makers: Mapping[str, ViewMaker] | None = None,
                 memory_format: torch.memory_format | None = None):
        """``memory_format`` of every batch: by default channels_last on CUDA (cuDNN's fast
        layout, which the nets run in there) and contiguous elsewhere."""
        self.view_makers = dict(view_makers or {})
        self.images = data.images.to(device, non_blocking=True).contiguous()
        self.labels = data.labels.to(device, non_blocking=True)
        self.num_classes = data.num_classes
        self.device = device
        normalize = Normalizer(data.mean, data.std, device)
        if memory_format is None:
            memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.memory_format = memory_format
        self.normalize = (normalize if memory_format == torch.contiguous_format else
                          lambda u8: normalize(u8).contiguous(memory_format=memory_format))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def epoch_plan(self, batch_size: int, generator: torch.Generator) -> EpochPlan:
        return EpochPlan(list(self._draws(batch_size, generator)))

    def _draws(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        n = len(self)
        order = torch.randperm(n, device=self.device, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            if index.shape[0] < 2:
                break
            yield (index, *draw_crop_flip(index.shape[0], self.device, generator))

    def train_batches(self, batch_size: int, generator: torch.Generator, views=(),
                      epoch: int = 0, epochs: int = 1, first_step: int = 0,
                      plan: EpochPlan | None = None) -> Iterator[Batch]:
        """Shuffled, augmented batches (those of ``plan`` if given). A last batch of a single
        sample is dropped (BatchNorm cannot train on it); otherwise the last, smaller batch is
        kept, as the reference DataLoaders (drop_last=False) do."""
        if plan is not None and views:
            raise ValueError("an epoch with extra views cannot be planned ahead")
        unknown = [v for v in views if v not in self.view_makers]
        if unknown:
            raise ValueError(f"no augmentation view named {unknown} (this data has "
                             f"{sorted(self.view_makers) or 'none'}; views come from view plugins)")
        draws = iter(plan.batches) if plan is not None else self._draws(batch_size, generator)
        # Unplanned, a batch's crop and flip are drawn (by ``draws``) before its extra views.
        for step, (index, offsets, flips) in enumerate(draws, start=first_step):
            raw = self.images[index]
            yield Batch(
                x=self.normalize(crop_flip(raw, offsets, flips)),
                y=self.labels[index],
                index=index,
                views={v: self.normalize(self.view_makers[v](raw, generator)) for v in views},
                epoch=epoch,
                epochs=epochs,
                step=step,
                view_code=crop_flip_code(offsets, flips) if plan is not None else None,
            )

    def num_batches(self, batch_size: int) -> int:
        n = len(self)
        full, rest = divmod(n, batch_size)
        return full + (1 if rest >= 2 else 0)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            yield (self.normalize(self.images[start:start + batch_size]),
                   self.labels[start:start + batch_size])
