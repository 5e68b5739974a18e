"""The whole plugin contract: seven hooks, one per kind of named thing.

Each hook receives ``register(name, factory, params=Params subclass, help="one line")``.
A plugin module (named by an entry point in the ``kdbench`` group) implements any of them::

    from kdbench.api import hookimpl

    @hookimpl
    def kdbench_register_student_methods(register):
        register("my_kd", MyKD, params=MyKDParams, help="my method in one line")

Factory signatures are documented in :mod:`kdbench.api`.

A teacher objective's or student method's *factory is a class* (a subclass of
:class:`kdbench.api.TeacherObjective` / :class:`kdbench.api.StudentMethod`): the engine reads its
ClassVars **before** building it — ``needs_teacher`` (whether the grid trains a teacher for the
set), ``views`` (the extra views every batch must carry, checked against the registered views
when the recipe is validated), ``default_weight`` (the weight when the recipe gives none),
``teacher_train_mode`` and ``teacher_logits_only`` (how the step runs the teacher, whether the
logit cache may serve it) — so they must be class attributes, not set in ``__init__``. The
instance is built once per run, from ``(params, setup)`` with the real output shapes.
"""
import pluggy

hookspec = pluggy.HookspecMarker("kdbench")


@hookspec
def kdbench_register_datasets(register):
    """Register datasets: ``factory(params, split) -> ImageData``."""


@hookspec
def kdbench_register_models(register):
    """Register models: ``factory(num_classes, params) -> KDModel``."""


@hookspec
def kdbench_register_teacher_objectives(register):
    """Register teacher objectives: ``factory(params, setup) -> TeacherObjective``."""


@hookspec
def kdbench_register_student_methods(register):
    """Register student methods: ``factory(params, setup) -> StudentMethod``."""


@hookspec
def kdbench_register_optimizers(register):
    """Register student optimizers: ``factory(params) -> kdbench.api.StudentOptimizer``, a
    method set's update rule in place of the schedule's SGD (``optimizer = "name"``)."""


@hookspec
def kdbench_register_views(register):
    """Register augmentation views: ``factory(images, generator) -> images``, uint8 (N, C, H, W)
    in and out, drawing its randomness from ``generator`` only (on the images' device). A method
    or objective asks for a view by name in its ``views`` ClassVar; its outputs for the view
    arrive in ``extra[name]``."""


@hookspec
def kdbench_register_trackers(register):
    """Register experiment trackers: ``factory(params, output_dir) -> kdbench.trackers.Tracker``,
    told each run's start, per-epoch metrics and end (rank 0 only, once per epoch; see
    :mod:`kdbench.trackers`). Off unless ``kdbench run --tracker NAME`` asks for one."""
