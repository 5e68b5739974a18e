"""Margin-gated intra-class contrastive teacher with the per-class pipeline — "Enriching Knowledge
Distillation with Intra-Class Contrastive Learning", Sec. 3.3, Eq. 6–7, Algorithm 1.

    ρ_x = p_x^y − max_{j≠y} p_x^j                                                       (Eq. 6)
    L_Intra(x) = Eq. 4 if ρ_x > δ else 0                                                  (Eq. 7)
    L_Teacher = CE(y, p_t) + λ · L_Intra                                                  (Eq. 5)

Gate. ρ comes from the teacher's current softmax of view 0 (``batch.x``), detached (no gradient
flows through the gate). A sample passes when ρ > δ; the decision covers the sample as a pair
(its view-0 and second-view anchors). Gated-out samples never take part in L_Intra at all — not
as anchors, positives or negatives — so they receive no gradient from it.

Pipeline (Sec. 3.3, "samples that meet the threshold are cached in a pipeline corresponding to
their class; once the number of samples in the pipeline is sufficient, we compute the
intra-class loss and then clear the pipeline"). With P = ``pipeline_size``:
  * The queue holds the *normalised images of both views* of passing samples, in fixed per-class
    buffers ``queue (num_classes, P, 2, C, H, W)`` float32 with ``counts (num_classes,)``. It does
    not hold embeddings: when a class flushes, all its cached samples are re-encoded with
    ``encode`` (current parameters, with gradient), so the loss and its gradient are those of the
    current teacher, no autograd graph ever outlives its step, and memory is bounded by
    num_classes × P × 2 images (CIFAR-100: 39 MB; Tiny-ImageNet 64×64: 315 MB, also in
    checkpoints). All queue state is registered buffers, so it checkpoints with the objective.
  * Per step, each class's passing samples are appended in batch order after its cached ones.
    Every complete run of P consecutive samples (old cached first) is one flushed group; a class
    can flush several groups in one step if many of its samples pass (e.g. CIFAR-10 with large
    batches). The leftover (< P samples) stays cached for later steps; nothing is dropped.
  * Each flushed group is its own contrastive set: anchors = its P samples × 2 views, positive =
    the other view, negatives = the other 2P − 2 images of the group. All groups flushed in a
    step are re-encoded in ONE ``encode`` call.
  * L_Intra = mean over all flushed anchors of the step; an exact, graph-connected 0 when nothing
    flushes.
  * One forward per image per step: the second view's images are only queued, never run through
    the teacher at their own step (``forward_views = ()``: the engine forwards view 0 alone);
    they are encoded once, when their group flushes.
  * ``pipeline_size = 0`` disables the cache: the gate is applied within the batch using the live
    embeddings of both views (the second view is forwarded then), with the same membership rule
    (anchors and negatives = passing samples of the same class in the batch). Useful as an
    ablation of the pipeline.

BatchNorm in the re-encoding pass (the step's batch statistics). The teacher trains in train
mode, in which BatchNorm normalises a forward's images with *that forward's* batch statistics and
moves its running statistics towards them. A flushed group is typically one class (P samples ×
2 views, e.g. 32 images of one class): normalised with its own statistics, every layer would
subtract the class's own mean and divide by its own spread — removing the very intra-class
structure the loss measures — and each flush would pull the running statistics (those of the
evaluated teacher and of the soft labels the students learn from) towards a single class. So
the re-encoding forward normalises every BatchNorm layer's input with the batch statistics
(per-channel mean and biased variance, detached) that layer saw in this step's train-mode
forward of view 0 — the step's mixed-class batch — and leaves the running statistics and
``num_batches_tracked`` unchanged (:class:`StepBatchStatistics`). Consequences, which the tests
check:
  * After a step, the running statistics are exactly those of the same step with nothing
    flushed: they move once per step, with view 0, as a CE teacher's do.
  * A flushed image is normalised exactly as it would be had it been one more image of view 0's
    batch (without moving those statistics): gradient flows through BatchNorm's affine
    parameters and the image's own activations, not through the batch statistics.
  * Like train mode, and unlike eval mode, this is invariant to the scale of each layer's
    pre-BatchNorm activations. Measured why that matters: the first version of this change used
    the running statistics (eval-mode BatchNorm) for the flushed group. On
    recipes/fashion_mnist_cpu.toml's VGG13 margin teacher (λ = 0.02, seed 0) its train loss
    matched the old code's (1.008 at epoch 3 both) but its validation accuracy lagged far behind
    (24.5 / 25.5 / 52.5% at epochs 3–5 against 41.5 / 57.5 / 72% before): the intra term's
    gradient through frozen normalisation rescales activations that train-mode BatchNorm
    ignores, and the running statistics kept chasing them.
  * Cost: one extra mean/variance per BatchNorm layer per step (hooks on the teacher's
    BatchNorm layers, found again at each flush, so layers converted later, e.g. DDP's
    SyncBatchNorm, are covered from the next step). Under DDP a rank's saved statistics are
    those of its own slice of view 0. A layer with no saved statistics yet uses its running
    statistics.
Defaults (the paper gives neither δ nor the pipeline length):
  * δ = 0.5. Eq. 6 gives ρ ∈ [−1, 1]; ρ > 0 ⇔ correctly classified; ρ > 0.5 means the sample is
    classified correctly *and* confidently (p^y > 0.5 + the runner-up). Early in training almost
    nothing passes, so the intra term switches itself on as the teacher learns the classes —
    the behaviour Sec. 3.3 asks for ("at the beginning ... focus on the differences between
    classes"; "strengthening the representations of samples which are already well classified").
  * P = 16: with the paper's batch of 256, a CIFAR-100 class contributes ≈ 2.6 samples a step
    (Tiny-ImageNet ≈ 1.3), too few negatives (the problem Sec. 3.3 describes); 16 cached samples
    give every anchor 30 same-class negatives, and a class fills in roughly 6–25 steps.
Other defaults and the representation f (``embedding``: default the normalised pooled feature;
the unnormalised logits of Algorithm 1 are an option that did not train in our measurements;
the range of s for each choice) as ``intra_class``: λ = 0.02, τ = 1.

Caveats / costs:
  * One host synchronisation per step: deciding whether anything flushes (and gathering a
    dynamically sized set of flushed samples) needs the count on the host. All other bookkeeping
    (ranks, slots, counts, statistics) stays on the device.
  * Re-encoding costs one extra forward+backward of 2 × (flushed samples) images per step; at a
    high pass rate that is about as many images as the step's own two views. A sample that
    passes and flushes at the same step has its view 0 run twice that step: once in train mode
    (CE, the gate) and once in the flushed group (eval-mode BatchNorm, as its group).

Precision: as ``intra_class`` (CE, gate softmax, embeddings and similarities in fp32, autocast
off); the queue holds float32 images.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdbench.api import ModelOutput, Params, TeacherObjective, hookimpl
from kdbench_plugins.teachers.ce import fp32_cross_entropy
from kdbench_plugins.teachers.intra_class import (
    EMBEDDING_HELP,
    Embedder,
    Embedding,
    intra_class_loss_terms,
    masked_mean,
    renamed_embedding,
)


class MarginIntraParams(Params):
    lambda_: float = Field(0.02, alias="lambda", ge=0,
                           description="weight λ of L_Intra (paper: 0.01–0.03)")
    delta: float = Field(0.5, ge=-1, lt=1, description="margin threshold δ: anchors need ρ > δ")
    pipeline_size: int = Field(16, ge=0, description="per-class samples cached before L_Intra "
                               "is computed (0 = no cache, gate within the batch)")
    embedding: Embedding = Field("pooled_normalized", description=EMBEDDING_HELP)
    temperature: float = Field(1.0, gt=0, description="τ in exp(s/τ); 1 = the paper's Eq. 4")

    _renamed = field_validator("embedding", mode="before")(renamed_embedding)

    @field_validator("pipeline_size")
    @classmethod
    def _not_one(cls, v: int) -> int:
        if v == 1:
            raise ValueError("must be 0 (no cache) or >= 2 (a lone sample has no same-class negative)")
        return v


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """ρ = p^y − max_{j≠y} p^j (Eq. 6) from softmax(logits), detached, float32 (autocast off)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.softmax(logits.detach().float(), dim=1)
        p_y = p.gather(1, y[:, None]).squeeze(1)
        p_other = p.scatter(1, y[:, None], float("-inf")).max(dim=1).values
        return p_y - p_other


def _true_indices(mask: Tensor, count: int) -> Tensor:
    """Indices of the True entries of the 1-D ``mask`` in order, given their ``count`` (no host
    synchronisation, unlike ``nonzero``)."""
    pos = torch.where(mask, mask.long().cumsum(0) - 1, count)
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(0, pos, torch.arange(mask.numel(), device=mask.device))
    return out[:count]


class StepBatchStatistics:
    """Saves, for every BatchNorm layer of ``model``, the batch statistics of its latest
    train-mode forward (per-channel mean and biased variance of its input, detached, float32),
    and replays them: inside :meth:`replay` every BatchNorm layer normalises its input with those
    saved statistics (then its affine transform) and leaves its running statistics unchanged."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self.hooked: set[nn.Module] = set()
        self.replaying = False
        self.attach()

    def attach(self) -> None:
        for m in self.model.modules():
            if isinstance(m, _BatchNorm) and m not in self.hooked:
                m.register_forward_hook(self._hook)
                self.hooked.add(m)

    def _hook(self, module: _BatchNorm, inputs, output):
        x = inputs[0]
        if self.replaying:
            if module not in self.saved:
                return None  # nothing saved yet: its (eval-mode) output, on running statistics
            mean, var = self.saved[module]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            with torch.autocast(device_type=x.device.type, enabled=False):
                y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
                if module.affine:
                    y = y * module.weight.float().view(shape) + module.bias.float().view(shape)
            return y.to(output.dtype)
        if module.training:
            with torch.no_grad():
                dims = [0, *range(2, x.dim())]
                var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
            self.saved[module] = (mean, var)
        return None

    @contextlib.contextmanager
    def replay(self):
        self.attach()  # BatchNorm layers converted since (SyncBatchNorm): saved from the next step
        switched = [m for m in self.model.modules() if isinstance(m, _BatchNorm) and m.training]
        for m in switched:
            m.train(False)  # no running-statistics update; the hook replaces the output
        self.replaying = True
        try:
            yield
        finally:
            self.replaying = False
            for m in switched:
                m.train(True)


def _input_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


class MarginIntra(TeacherObjective):
    views = ("second",)
    revision = 1  # issue 15: the pipeline re-encodes on view 0's BN statistics, queues view 1

    def __init__(self, params: MarginIntraParams, setup):
        super().__init__()
        self.lam = float(params.lambda_)
        self.delta = float(params.delta)
        self.size = int(params.pipeline_size)
        self.temperature = float(params.temperature)
        self.num_classes = int(setup.num_classes)
        self.embed = Embedder(params.embedding, setup.model_out)
        self.representation_name = params.embedding
        # Pipeline mode reads the second view's images only (they are queued): the engine
        # forwards view 0 alone. Without the cache the second view's outputs are the positives.
        self.forward_views = () if self.size else ("second",)
        if self.size:
            # The teacher's BatchNorm statistics of each step's view 0, for the re-encoding (see
            # "BatchNorm" above); a plain attribute: the teacher is not the objective's state.
            self.step_stats = StepBatchStatistics(setup.model)
            c, s = _input_channels(setup.model), int(setup.image_size)
            self.register_buffer("queue", torch.zeros(self.num_classes, self.size, 2, c, s, s))
            self.register_buffer("counts", torch.zeros(self.num_classes, dtype=torch.long))
        # Per-epoch statistics (device side, not checkpointed).
        for name in ("_stat_seen", "_stat_passed", "_stat_flushes", "_stat_anchors", "_stat_loss"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64), persistent=False)

    # ----------------------------------------------------------------------------------------
    def forward(self, out, batch, extra, encode):
        y = batch.y
        ce = fp32_cross_entropy(out.logits, y)
        passed = margin(out.logits, y) > self.delta
        with torch.no_grad():
            self._stat_seen += y.numel()
            self._stat_passed += passed.sum()
        if self.size:
            loss, valid, flushes = self._pipeline(batch, passed, encode)
        else:
            loss, valid, flushes = self._in_batch(out, extra, y, passed)
        if loss is None:  # nothing flushed: exact 0, still connected to the graph
            intra = out.logits.float().sum() * 0.0
        else:
            intra = masked_mean(loss, valid)
            with torch.no_grad():
                self._stat_anchors += valid.sum()
                self._stat_loss += (loss.detach() * valid).sum().double()
        with torch.no_grad():
            self._stat_flushes += flushes
        return {"ce": ce, "intra": self.lam * intra}

    def _in_batch(self, out, extra, y, passed):
        """pipeline_size = 0: Eq. 7 within the batch; gated-out samples are left out entirely."""
        z1, z2 = self.embed(out), self.embed(extra["second"])
        # Put every gated-out sample in a class of its own (label −1 − i): it then has no
        # negatives (so it is no anchor) and is no negative of anyone.
        idx = torch.arange(y.shape[0], device=y.device)
        labels = torch.where(passed, y, -1 - idx)
        loss, valid = intra_class_loss_terms(z1, z2, labels, self.temperature)
        return loss, valid, (valid.any()).to(torch.float64)

    def _pipeline(self, batch, passed, encode):
        y, P, C = batch.y, self.size, self.num_classes
        x2 = batch.views["second"]
        if batch.x.shape[1:] != self.queue.shape[3:]:
            raise ValueError(f"margin_intra: images of shape {tuple(batch.x.shape[1:])} do not fit "
                             f"the pipeline built for {tuple(self.queue.shape[3:])}")
        with torch.no_grad():
            onehot = F.one_hot(y, C) * passed[:, None].long()  # (B, C)
            rank = (onehot.cumsum(0) - onehot).gather(1, y[:, None]).squeeze(1)  # earlier same-class passes
            arrivals = onehot.sum(0)  # (C,)
            n_old = self.counts.clone()
            total = n_old + arrivals
            groups = total // P  # full groups per class this step
            pos = n_old[y] + rank  # position in the class's sequence [cached..., arrivals...]
            k, slot = pos // P, pos % P
            flush_new = passed & (k < groups[y])
            keep_new = passed & (k >= groups[y])
            old_mask = (groups[:, None] >= 1) & (torch.arange(P, device=y.device)[None, :] < n_old[:, None])
            max_groups = (P - 1 + y.shape[0]) // P + 1
            old_flat = old_mask.flatten()
            # The one host synchronisation of the step: how many samples flush / stay cached.
            n_old_flush, n_new_flush, n_keep = torch.stack(
                [old_flat.sum(), flush_new.sum(), keep_new.sum()]).tolist()
            old_j = _true_indices(old_flat, n_old_flush)
            old_c, old_s = old_j // P, old_j % P
            new_i = _true_indices(flush_new, n_new_flush)
            keep_i = _true_indices(keep_new, n_keep)
            # Flushed samples: the cached ones of flushing classes (group 0), then new ones.
            pair = torch.stack([batch.x, x2], 1).detach()
            images = torch.cat([self.queue[old_c, old_s], pair[new_i].to(self.queue.dtype)])
            group = torch.cat([old_c * max_groups, y[new_i] * max_groups + k[new_i]])
            flushes = groups.sum().to(torch.float64)
            # Update the queue after reading it (the gathers above copied): kept arrivals go to
            # their slot; a flushing class restarts at slot 0.
            self.queue[y[keep_i], slot[keep_i]] = pair[keep_i].to(self.queue.dtype)
            self.counts.copy_(total % P)
        m = images.shape[0]
        if m == 0:
            return None, None, flushes
        imgs = images.to(batch.x.dtype)
        with self.step_stats.replay():  # view 0's batch statistics: "BatchNorm" above
            z = self.embed(encode(torch.cat([imgs[:, 0], imgs[:, 1]])))
        loss, valid = intra_class_loss_terms(z[:m], z[m:], group, self.temperature)
        return loss, valid, flushes

    def representation(self, out: ModelOutput) -> Tensor:
        """The f(x) this objective trains (for the teacher diagnostics)."""
        return self.embed(out)

    # ----------------------------------------------------------------------------------------
    def epoch_stats(self):
        stats = [self._stat_seen, self._stat_passed, self._stat_flushes, self._stat_anchors,
                 self._stat_loss]
        seen, passed, flushes, anchors, loss = torch.stack(stats).tolist()
        for b in stats:
            b.zero_()
        return {
            "gate_pass_frac": passed / seen if seen else 0.0,  # samples (= anchor pairs) with ρ > δ
            # groups of pipeline_size samples flushed this epoch (pipeline_size = 0: steps in
            # which at least one anchor entered L_Intra)
            "flushes": flushes,
            "intra_anchors": anchors,  # anchors that entered L_Intra this epoch
            "intra_loss": loss / anchors if anchors else 0.0,  # unweighted mean L_Intra
        }


@hookimpl
def kdbench_register_teacher_objectives(register):
    register("margin_intra", MarginIntra, params=MarginIntraParams,
             help="CE + λ·intra-class loss on margin-gated anchors (ρ > δ) via per-class pipeline")
