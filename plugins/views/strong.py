"""The ``strong`` view: crop + flip, then RandAugment and Cutout
(:func:`kdbench.data.strong_augment.strong_augment`), as MLLD's reference strong augmentation."""
from kdbench.api import hookimpl
from kdbench.data.augment import random_crop_flip


def strong_view(images, generator):
    from kdbench.data.strong_augment import strong_augment  # only the methods that ask pay for it

    return strong_augment(random_crop_flip(images, generator), generator)


@hookimpl
def kdbench_register_views(register):
    register("strong", strong_view, help="crop+flip, then RandAugment + Cutout (MLLD's strong view)")
