"""Checks before any training: every model of the grid takes the dataset's images, and with
``deterministic = true`` every op a run will use has a deterministic implementation on the
device. Problems are UserErrors naming the recipe, the run's role and the fix."""
from __future__ import annotations

import json

import torch
from torch import nn

from kdbench.api import UserError
from kdbench.data.loader import DeviceData
from kdbench.engine.reproducibility import seed_everything
from kdbench.engine.tasks import build_model, build_student_task, dummy_forward


def _one_line(exc: Exception, limit: int = 300) -> str:
    return " ".join(str(exc).split())[:limit].rstrip(".")


def check_inputs(specs, train: DeviceData, registry, recipe_path, dataset_name: str,
                 device: torch.device, deterministic: bool) -> None:
    """Every model to train takes the dataset's images: its declared ``input_size`` (if the
    model has one: an int or (height, width)) matches, and a forward of two images works. With
    ``deterministic``, one training step of each distinct method set runs too (see
    :func:`check_deterministic_step`)."""
    c, h, w = (int(v) for v in train.images.shape[1:])
    seed_everything(0, deterministic)  # each run seeds again; this sets the mode
    checked, steps_checked = set(), set()
    for spec in specs:
        model_spec = spec.spec["model"]
        where = _where(spec, registry, recipe_path)
        key = json.dumps(model_spec, sort_keys=True, default=str)
        if key not in checked:
            checked.add(key)
            model = build_model(registry, model_spec, train.num_classes)
            size = getattr(model, "input_size", None)
            if size is not None:
                size = (size, size) if isinstance(size, int) else tuple(size)
                if size != (h, w):
                    raise UserError(f"{where} takes {size[0]}x{size[1]} images, but the dataset "
                                    f"{dataset_name!r} has {h}x{w} images; pair it with "
                                    "a dataset of that size or choose a model for this one")
            try:
                dummy_forward(model.to(device), train)
            except Exception as exc:
                raise UserError(f"{where} cannot take the dataset's images ({c} channels, {h}x{w}): "
                                f"{type(exc).__name__}: {_one_line(exc)}; choose a model or dataset "
                                "that fit together") from None
            if deterministic:
                _deterministic_backward(lambda: model(train.normalize(train.images[:2])).logits.float().sum(),
                                        model, where, device)
            del model
        if deterministic and spec.kind == "student" and spec.teacher is not None:
            step_key = json.dumps([model_spec, spec.teacher.spec["model"], spec.spec["methods"]],
                                  sort_keys=True, default=str)
            if step_key not in steps_checked:
                steps_checked.add(step_key)
                check_deterministic_step(spec, train, registry, device, where)


def _where(spec, registry, recipe_path) -> str:
    model_spec = spec.spec["model"]
    role = f"{spec.kind} of pair {spec.meta.pair!r}"
    fields = registry.find("model", model_spec["name"]).params.model_fields
    defaults = {f.alias or k: f.get_default(call_default_factory=True) for k, f in fields.items()}
    params = ", ".join(f"{k}={v!r}" for k, v in (model_spec.get("params") or {}).items()
                       if defaults.get(k, object()) != v)  # what the recipe set
    return f"{recipe_path}: {role}: model {model_spec['name']!r}" + (f" ({params})" if params else "")


def check_deterministic_step(spec, train: DeviceData, registry, device: torch.device, where: str) -> None:
    """One forward and backward of the student's whole step (its methods included, with an
    untrained teacher of the same architecture) on two images: an op without a deterministic
    implementation on ``device`` (e.g. on CUDA the backward of non-global adaptive pooling,
    used by ReviewKD and VID) raises here instead of at the run's first step."""
    from kdbench.api import Batch

    teacher = build_model(registry, spec.teacher.spec["model"], train.num_classes).to(device)
    teacher.eval().requires_grad_(False)
    student = build_model(registry, spec.spec["model"], train.num_classes).to(device)
    methods = [(m["name"], m["weight"], m["params"]) for m in spec.spec["methods"]]
    try:
        task = build_student_task(registry, methods, student, teacher, train, device, cast_teacher=False)
    except Exception as exc:
        raise UserError(f"{where}: its methods cannot be built for these models: "
                        f"{type(exc).__name__}: {_one_line(exc)}") from None
    x = train.normalize(train.images[:2])
    views = {v: x for v in task.views}
    batch = Batch(x=x, y=train.labels[:2], index=torch.arange(2, device=device), views=views)
    for m in task.modules():
        m.train()
    names = "+".join(m["name"] for m in spec.spec["methods"])
    _deterministic_backward(lambda: sum(task.loss_terms(batch)[0].values()).float(), student,
                            f"{where} with methods {names}", device)


def _deterministic_backward(loss_fn, model: nn.Module, where: str, device: torch.device) -> None:
    model.train()
    try:
        loss_fn().backward()
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "deterministic" in text:
            raise UserError(f"{where}: deterministic = true, but {text.split('. ')[0]} on "
                            f"{device}; set deterministic = false in the recipe (or "
                            "train on the CPU)") from None
        raise UserError(f"{where} cannot train on the dataset's images: "
                        f"{type(exc).__name__}: {text[:300]}") from None
