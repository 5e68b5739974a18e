"""The test harness: the tiny recipe and its variations, `kdbench` in a clean subprocess, and the
run records a grid leaves behind. Test modules import the plain helpers (``from conftest import
kdbench_env, run_kdbench, read_records, write_tiny_recipe``) and use the fixtures by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest
import torch

from kdbench.registry import ONLY_DISTS_ENV, load_registry

# Tests see only the plugins of the kdbench distribution itself (plus whatever a test adds):
# nothing the developer happens to have installed can leak in.
os.environ.setdefault(ONLY_DISTS_ENV, "kdbench")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_RECIPE = """
name = "{name}"
output = "{output}"
device = "cpu"
seeds = {seeds}

[dataset]
name = "synthetic"
num_classes = 4
train_per_class = 12
test_per_class = 6
image_size = 16

[[pairs]]
teacher = {{ name = "wrn_16_2", width_mult = 0.25 }}
student = {{ name = "wrn_16_2", width_mult = 0.25 }}
label = "T→S"
ref_teacher = "WRN-40-2"
ref_student = "WRN-16-2"

[[teacher_objectives]]
name = "ce"
ref_teacher = true

[[method_sets]]
label = "Student"
ref_method = "student"
methods = [{{ name = "ce" }}]

[[method_sets]]
label = "KD"
ref_method = "KD"
methods = [{{ name = "ce", weight = 0.1 }}, {{ name = "kd", weight = 0.9 }}]
{extra}
[reference]
table = "Table 1"
dataset = "CIFAR-100"

[teacher_schedule]
epochs = 2
batch_size = 16
lr = 0.05
milestones = [1]

[student_schedule]
epochs = 1
batch_size = 16
lr = 0.05
"""

TINY_NET = {"name": "wrn_16_2", "width_mult": 0.25}  # the tiny recipe's teacher and student


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------
def toml_value(value) -> str:
    """A TOML value, written the way TINY_RECIPE writes it (inline tables as `{ k = v }`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = value.as_posix()
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"no TOML for {value!r}")


_EXTRA = "\x00extra\n"  # where `extra` goes: after the method sets, before [reference]


def _set_keys(lines: list[str], updates: Mapping[str, object], where: str) -> None:
    """Set (or add, after the last key) each key of one table; a value of None removes the key."""
    for key, value in updates.items():
        at = next((i for i, line in enumerate(lines) if line.split("=", 1)[0].strip() == key
                   and "=" in line), None)
        if value is None:
            if at is None:
                raise KeyError(f"{where} has no key {key!r} to remove")
            del lines[at]
        elif at is not None:
            lines[at] = f"{key} = {toml_value(value)}\n"
        else:
            end = max((i + 1 for i, line in enumerate(lines) if line.strip()), default=0)
            lines.insert(end, f"{key} = {toml_value(value)}\n")


def edit_recipe(text: str, top: Mapping[str, object] | None = None, **tables) -> str:
    """Overrides applied to a recipe's text; whatever is not overridden stays byte for byte.

    ``top``: top-level keys to set (None removes one). Each keyword names a table: for a
    ``[table]`` a mapping of keys to set (None removes a key), for an array of tables
    (``[[pairs]]``, ``[[teacher_objectives]]``, ``[[method_sets]]``) a list of mappings that
    replaces all of it; None removes the table or the array."""
    blocks: list[tuple[str, list[str]]] = [("", [])]  # (header, its lines), the preamble first
    for line in text.splitlines(keepends=True):
        if line.startswith("[") or line == _EXTRA:
            blocks.append((line.strip(), []))
        blocks[-1][1].append(line)
    _set_keys(blocks[0][1], top or {}, "the top level")
    for name, value in tables.items():
        ours = [i for i, (header, _) in enumerate(blocks) if header in (f"[{name}]", f"[[{name}]]")]
        if value is None:
            if not ours:
                raise KeyError(f"the recipe has no [{name}] to remove")
            blocks = [b for i, b in enumerate(blocks) if i not in ours]
        elif isinstance(value, Mapping):
            if len(ours) != 1 or blocks[ours[0]][0] != f"[{name}]":
                if ours:
                    raise ValueError(f"[[{name}]] is an array of tables: give a list")
                blocks.append((f"[{name}]", [f"\n[{name}]\n"]))
                ours = [len(blocks) - 1]
            _set_keys(blocks[ours[0]][1], value, f"[{name}]")
        else:  # an array of tables, in place of the old one (or before `extra`, or at the end)
            new = [(f"[[{name}]]", [f"[[{name}]]\n", *(f"{k} = {toml_value(v)}\n" for k, v in item.items()), "\n"])
                   for item in value]
            at = ours[0] if ours else next((i for i, (h, _) in enumerate(blocks) if h == _EXTRA.strip()),
                                           len(blocks))
            kept = [b for i, b in enumerate(blocks) if i not in ours]
            blocks = kept[:at] + new + kept[at:]
    return "".join(line for _, lines in blocks for line in lines)


def write_tiny_recipe(path: Path | str, *, name: str = "tiny", output: Path | str | None = None,
                      seeds: Iterable[int] = (0,), extra: str = "",
                      top: Mapping[str, object] | None = None, **tables) -> Path:
    """TINY_RECIPE at ``path`` (folders made), its runs under ``output`` (default: ``runs`` next
    to the file; a str is written as given, e.g. a relative folder). ``extra`` is TOML text put
    after the method sets; ``top`` and the table keywords are overrides (see edit_recipe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    output = path.parent / "runs" if output is None else output
    text = TINY_RECIPE.format(name=name, seeds=list(seeds), extra=_EXTRA.rstrip("\n"),
                              output=output.as_posix() if isinstance(output, Path) else output)
    path.write_text(edit_recipe(text, top, **tables).replace(_EXTRA.rstrip("\n"), extra),
                    encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path):
    """``tiny_recipe(seeds=(0,), extra="", name="tiny", *, file=None, **overrides)``: the tiny
    recipe at ``tmp_path / (file or f"{name}.toml")``, runs under ``tmp_path / "runs"``;
    overrides as for write_tiny_recipe (``output``, ``top``, ``dataset={...}``, ...)."""
    def make(seeds=(0,), extra="", name="tiny", *, file=None, **overrides) -> Path:
        return write_tiny_recipe(tmp_path / (file or f"{name}.toml"), name=name, seeds=seeds,
                                 extra=extra, **overrides)
    return make


# ------------------------------------------------------------------------------------------------
# kdbench in a subprocess
# ------------------------------------------------------------------------------------------------
def kdbench_env(*, threads: int | None = 1, dists: Iterable[str] = (),
                pythonpath: Iterable[Path | str] = (), **overrides: object) -> dict[str, str]:
    """The environment for a `kdbench` subprocess: this one's, without the KDBENCH_TEST_* hooks
    (a test sets the one it means in ``overrides``), loading only kdbench's plugins plus
    ``dists``, OMP_NUM_THREADS = ``threads`` (None: left as it is; the default 1 because
    processes started together share the CPUs, and runs compared bit for bit need the same
    thread count), ``pythonpath`` put before any PYTHONPATH; then ``overrides`` (str()-ed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDBENCH_TEST_")}
    env[ONLY_DISTS_ENV] = ",".join(["kdbench", *dists])
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    paths = [str(p) for p in pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def kdbench_cmd(*args: object, torchrun: Sequence[object] | None = None) -> list[str]:
    """``python -m kdbench ARGS``; with ``torchrun`` (its options) under torch.distributed.run."""
    launcher = [] if torchrun is None else ["-m", "torch.distributed.run", *map(str, torchrun)]
    return [sys.executable, *launcher, "-m", "kdbench", *map(str, args)]


def run_kdbench(*args: object, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                timeout: float = 600, torchrun: Sequence[object] | None = None
                ) -> subprocess.CompletedProcess:
    """Runs ``kdbench ARGS`` to the end (env: kdbench_env() unless given); text output captured."""
    return subprocess.run(kdbench_cmd(*args, torchrun=torchrun), env=kdbench_env() if env is None else dict(env),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
RECORD_KINDS = ("teachers", "students")


def read_records(root: Path | str, kind: str | None = None) -> dict[str, dict]:
    """{run id: record} of the runs under the output folder ``root``: ``kind`` "teachers" or
    "students" (``root/<kind>/<id>/record.json``), or None for every record.json under root."""
    root = Path(root)
    if kind is None:
        paths = root.rglob("record.json")
    elif kind in RECORD_KINDS:
        paths = (root / kind).glob("*/record.json")
    else:
        raise ValueError(f"kind must be one of {RECORD_KINDS} or None, not {kind!r}")
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(paths)}


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
def builtin_registry():
    """The registry of kdbench's own plugins, whatever else is installed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ONLY_DISTS_ENV, "kdbench")
        return load_registry()


@pytest.fixture(scope="session")
def registry():
    reg = builtin_registry()
    assert not reg.broken, reg.broken
    return reg


def add_plugin(monkeypatch, kind: str, name: str, factory, params=None) -> None:
    """Every registry loaded while ``monkeypatch`` is active also has the test's plugin ``name``
    of ``kind`` (provided by a "tests" distribution), as if a package registered it."""
    import kdbench.registry as registry_module
    from kdbench.api import NoParams
    from kdbench.registry import Plugin

    original = registry_module.load_registry

    def load(*args, **kwargs):
        reg = original(*args, **kwargs)
        reg.plugins[kind][name] = [Plugin(kind, name, factory, params or NoParams, "", "tests", "0", "tests")]
        return reg

    monkeypatch.setattr(registry_module, "load_registry", load)
