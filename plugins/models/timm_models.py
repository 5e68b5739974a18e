"""``timm``: any timm model as a kdbench model, through timm's own feature-extraction API.

Recipe: ``teacher = { name = "timm", model = "resnet18" }`` (``model`` is the timm name;
``kwargs`` passes further keyword arguments to ``timm.create_model``, e.g. ``{ img_size = 32 }``
for a ViT). The factory builds the *full* classifier (``timm.create_model(model,
num_classes=...)``) and maps it onto :class:`kdbench.api.ModelOutput`:

* ``feats``: one map per entry of the model's ``feature_info`` (timm's list of feature levels:
  channels, reduction, module), taken from ``forward_intermediates`` (timm's API for
  intermediate features of the classifier itself, so the head still runs on the same pass), or,
  for a model without it, from forward hooks on the ``feature_info`` modules (what timm's
  ``features_only`` wrapper does). ``feats[0]`` is the first, highest-resolution level (the
  stem for ResNets, whose first level is ``act1``), ``feats[1:]`` the stages, so
  ``stage_channels()`` is ``feature_info`` channels [1:]. They are the maps timm returns: the
  post-activation stage outputs for ResNet-like nets; for inverted-residual nets (MobileNetV3,
  EfficientNet) a stage ends in a linear bottleneck, so there is no activation to be "after"
  (as the zoo's mobilenetv2).
* ``logits``: the model's own head on the final features; ``pooled``: the input of the
  classifier layer (``get_classifier()``), i.e. timm's pre-logits vector.
* ``preact_feats``: for timm ResNets (``timm.models.resnet.ResNet``: resnet10t/18/34/50,
  resnet*d, ...), the real pre-activations: the input of the stem's ``act1`` and of the last
  block's final activation in each stage (the residual sum), captured by forward pre-hooks
  (those activation modules are switched to ``inplace=False`` so the captured input is not
  overwritten), and ``bn_before_relu()`` returns the last BN of each stage's last block, as
  the zoo's CIFAR ResNets do. For every other architecture there is no single activation to
  split off, so ``preact_feats`` are the same tensors as ``feats`` and ``bn_before_relu()``
  raises a :class:`UserError` (so OFD, the one method that needs them, says so clearly).

Pretrained weights are never downloaded implicitly: ``pretrained = true`` asks timm to load the
model's default weights (from the Hugging Face cache, or the hub if this machine is online) and
any failure is one clear error; ``pretrained_file`` loads weights from a local file with timm's
own loader, classifier included when its class count is the data set's (a teacher trained
elsewhere), dropped otherwise (e.g. ImageNet weights as an initialisation). kdbench machines are usually
offline, so a recipe normally leaves both unset.

Inputs: timm's defaults assume 224x224 ImageNet images; CIFAR-sized inputs work for
convolutional nets (the deepest maps become 1x1), ViTs need ``kwargs = { img_size = 32 }``.
"""
from __future__ import annotations

import difflib
import os
from typing import Any

from pydantic import Field, field_validator
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, Params, UserError, hookimpl


class TimmParams(Params):
    model: str = Field(description="timm model name, e.g. resnet18 (see timm.list_models())")
    pretrained: bool = Field(False, description="load timm's default pretrained weights "
                             "(needs them in the local Hugging Face cache, or network)")
    pretrained_file: str | None = Field(None, description="load weights from this local file "
                                        "(timm's loader; no network)")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="timm drop_rate (dropout before the "
                             "classifier)")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="timm drop_path_rate "
                                  "(stochastic depth)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="further keyword arguments "
                                   "for timm.create_model, e.g. { img_size = 32 }")

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        import timm

        arch = v.split(".", 1)[0]  # "resnet18.a1_in1k" -> architecture "resnet18"
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else \
                "see timm.list_models() for the names"
            raise ValueError(f"unknown timm model {v!r} ({hint})")
        return v

    @field_validator("kwargs")
    @classmethod
    def _not_core(cls, v: dict) -> dict:
        clash = sorted(set(v) & {"model_name", "num_classes", "pretrained", "features_only",
                                 "drop_rate", "drop_path_rate", "pretrained_cfg_overlay"})
        if clash:
            raise ValueError(f"kwargs may not set {clash}: kdbench sets num_classes from the "
                             "data set; use the plugin's own keys for the others")
        return v


# ------------------------------------------------------------------------------------------------
def _create(params: TimmParams, num_classes: int) -> nn.Module:
    import timm

    kwargs = dict(params.kwargs, num_classes=num_classes)
    # Only passed when set: not every timm architecture takes them.
    if params.drop_rate:
        kwargs["drop_rate"] = params.drop_rate
    if params.drop_path_rate:
        kwargs["drop_path_rate"] = params.drop_path_rate
    if params.pretrained_file is not None:
        path = os.path.expanduser(params.pretrained_file)
        if not os.path.isfile(path):
            raise UserError(f"timm model {params.model!r}: pretrained_file {path!r} does not exist")
        # First with the classifier (a checkpoint trained on this data set), then, if its head
        # has another class count, without it (timm drops the head: fine-tuning init).
        overlays = [{"file": path, "num_classes": num_classes}, {"file": path}]
        for i, overlay in enumerate(overlays):
            try:
                return timm.create_model(params.model, pretrained=True,
                                         pretrained_cfg_overlay=overlay, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- any loader failure is the user's file
                if i + 1 < len(overlays) and "size mismatch" in str(exc):
                    continue
                raise UserError(f"timm model {params.model!r}: could not load pretrained_file "
                                f"{path!r} ({type(exc).__name__}: {_short(exc)})") from None
    if params.pretrained:
        try:
            return timm.create_model(params.model, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- offline, no cached weights, no such tag ...
            raise UserError(
                f"timm model {params.model!r}: pretrained = true, but its weights could not be "
                f"loaded ({type(exc).__name__}: {_short(exc)}). kdbench does not download "
                "weights for you: put them in the Hugging Face cache (HF_HUB_OFFLINE=1 then uses "
                "it without network), or give a local file with pretrained_file, or set "
                "pretrained = false") from None
    try:
        return timm.create_model(params.model, pretrained=False, **kwargs)
    except TypeError as exc:  # an option the architecture does not take
        raise UserError(f"timm model {params.model!r} rejected its options: {_short(exc)}") \
            from None


def _short(exc: BaseException, n: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _feature_levels(model: nn.Module, name: str) -> list[dict]:
    info = getattr(model, "feature_info", None)
    levels = [dict(d) for d in info] if info else []
    if len(levels) < 2:
        raise UserError(f"timm model {name!r} has no feature_info with stages, so kdbench cannot "
                        "expose its stage features; use a convolutional timm model")
    return levels


# ------------------------------------------------------------------------------------------------
class _ResNetPreact:
    """Pre-activations of a timm ResNet: pre-hooks on the stem's act1 and on the final
    activation of each stage's last block; the BN before it (bn2 / bn3)."""

    def __init__(self, model: nn.Module, levels: list[dict]):
        from timm.models.resnet import BasicBlock, Bottleneck

        self.acts: list[nn.Module] = []
        self.bns: list[nn.BatchNorm2d] = []
        for i, level in enumerate(levels):
            mod = model.get_submodule(level["module"])
            if i == 0 and level["module"] == "act1":
                act, bn = mod, model.bn1
            elif isinstance(mod, nn.Sequential) and isinstance(mod[-1], (BasicBlock, Bottleneck)):
                blk = mod[-1]
                act, bn = (blk.act2, blk.bn2) if isinstance(blk, BasicBlock) else (blk.act3, blk.bn3)
            else:
                raise ValueError(f"unexpected ResNet feature level {level['module']!r}")
            if not isinstance(bn, nn.BatchNorm2d):
                raise ValueError("ResNet without BatchNorm2d")
            if hasattr(act, "inplace"):
                act.inplace = False  # the pre-hook keeps a reference to the input
            self.acts.append(act)
            self.bns.append(bn)

    @staticmethod
    def applies(model: nn.Module) -> bool:
        from timm.models.resnet import ResNet

        return isinstance(model, ResNet)


class TimmModel(KDModel):
    """A timm classifier exposing the kdbench feature protocol (see the module docstring)."""

    def __init__(self, params: TimmParams, num_classes: int):
        super().__init__()
        self.timm_name = params.model
        self.model = _create(params, num_classes)
        self._levels = _feature_levels(self.model, params.model)
        self._intermediates = hasattr(self.model, "forward_intermediates")
        # Kept out of the module tree (it is already registered inside self.model; registering
        # it again would duplicate its weights in the state dict).
        classifier = self.model.get_classifier() if hasattr(self.model, "get_classifier") \
            else None
        if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
            raise UserError(f"timm model {params.model!r} has no classifier layer to read the "
                            "pooled features from")
        self._preact = None
        if _ResNetPreact.applies(self.model):
            try:
                self._preact = _ResNetPreact(self.model, self._levels)
            except ValueError:
                self._preact = None  # an unusual ResNet variant: fall back to feats
        self._captured: dict[str, Any] = {}
        classifier.register_forward_pre_hook(self._grab_pooled)
        if self._preact is not None:
            for i, act in enumerate(self._preact.acts):
                act.register_forward_pre_hook(self._grab(f"pre{i}"))
        if not self._intermediates:
            for i, level in enumerate(self._levels):
                self.model.get_submodule(level["module"]).register_forward_hook(
                    self._grab_output(f"feat{i}"))

    # hooks -----------------------------------------------------------------------------
    def _grab_pooled(self, module, args):
        self._captured.setdefault("pooled", args[0])

    def _grab(self, key: str):
        def hook(module, args):
            self._captured[key] = args[0]
        return hook

    def _grab_output(self, key: str):
        def hook(module, args, output):
            self._captured[key] = output
        return hook

    def remap_published_keys(self, keys: list[str]) -> dict[str, str]:
        """For kdbench.published: a bare timm state dict (``conv1.weight``) maps onto this
        wrapper's ``model.`` prefix; a state dict of this wrapper is already in place."""
        return {k: f"model.{k}" for k in keys if not k.startswith("model.")}

    # protocol --------------------------------------------------------------------------
    def stage_channels(self) -> list[int]:
        return [int(level["num_chs"]) for level in self._levels[1:]]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        if self._preact is None:
            raise UserError(
                "OFD needs pre-ReLU features and the BN before each stage's ReLU; timm model "
                f"{self.timm_name!r} does not expose them (kdbench provides them for timm "
                "ResNets only; use a timm ResNet or a kdbench zoo model as the OFD teacher)")
        return list(self._preact.bns[1:])

    def forward(self, x: Tensor) -> ModelOutput:
        self._captured = {}
        try:
            if self._intermediates:
                final, feats = self.model.forward_intermediates(x, indices=len(self._levels))
                feats = list(feats)
            else:
                final = self.model.forward_features(x)
                feats = [self._captured[f"feat{i}"] for i in range(len(self._levels))]
            logits = self.model.forward_head(final)
            pooled = self._captured.get("pooled")
            if pooled is None:  # a head that bypasses its classifier module
                pooled = self.model.forward_head(final, pre_logits=True)
            if self._preact is not None:
                preacts = [self._captured[f"pre{i}"] for i in range(len(self._levels))]
            else:
                preacts = list(feats)
        finally:
            self._captured = {}  # hold no activations between calls
        bad = [i for i, f in enumerate(feats) if f.dim() != 4]
        if bad:
            raise UserError(f"timm model {self.timm_name!r}: feature levels {bad} are not "
                            "(N, C, H, W) maps, so feature methods cannot use them")
        return ModelOutput(logits, feats, preacts, pooled.flatten(1))


def _factory(num_classes: int, params: TimmParams) -> TimmModel:
    return TimmModel(params, num_classes)


@hookimpl
def kdbench_register_models(register):
    register("timm", _factory, params=TimmParams,
             help="any timm model (model = 'resnet18'), stage features via timm's "
                  "forward_intermediates / feature_info; pretrained weights never downloaded "
                  "implicitly")
