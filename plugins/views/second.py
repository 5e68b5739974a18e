"""The ``second`` view: another standard crop + flip of the same images (RandomCrop(padding=4)
+ RandomHorizontalFlip, drawn independently of view 0): the positive view of the intra-class
objectives."""
from kdbench.api import hookimpl
from kdbench.data.augment import random_crop_flip


@hookimpl
def kdbench_register_views(register):
    register("second", random_crop_flip, help="a second crop+flip of the same images")
