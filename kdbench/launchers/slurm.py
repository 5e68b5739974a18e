"""The ``slurm`` launcher (Slurm job arrays through submitit): not implemented yet."""
from __future__ import annotations

from kdbench.api import UserError


def run_slurm(loaded, registry, args) -> int:
    raise UserError("the slurm launcher is not implemented yet; use --launcher local or inline")
