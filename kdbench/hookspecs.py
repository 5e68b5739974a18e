"""The whole plugin contract: four hooks, one per kind of named thing.

Each hook receives ``register(name, factory, params=Params subclass, help="one line")``.
A plugin module (named by an entry point in the ``kdbench`` group) implements any of them::

    from kdbench.api import hookimpl

    @hookimpl
    def kdbench_register_student_methods(register):
        register("my_kd", MyKD, params=MyKDParams, help="my method in one line")

Factory signatures are documented in :mod:`kdbench.api`.
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
