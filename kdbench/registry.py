"""Plugin discovery: entry points of the ``kdbench`` group -> name -> factory tables.

Built-in plugins come through the same entry-point group as third-party ones; the core never
imports ``kdbench_plugins``. A plugin that fails to import (or to register) is kept as a
:class:`BrokenPlugin` and reported, and the rest still load. Two distributions registering one
name is an error naming both when that name is used; ``dist:name`` picks one.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from kdbench import hookspecs
from kdbench.api import NoParams, Params, UserError

GROUP = "kdbench"

# kind -> (hook name, human label)
KINDS: dict[str, tuple[str, str]] = {
    "dataset": ("kdbench_register_datasets", "datasets"),
    "model": ("kdbench_register_models", "models"),
    "teacher_objective": ("kdbench_register_teacher_objectives", "teacher objectives"),
    "student_method": ("kdbench_register_student_methods", "student methods"),
    "optimizer": ("kdbench_register_optimizers", "optimizers"),
    "view": ("kdbench_register_views", "augmentation views"),
    "tracker": ("kdbench_register_trackers", "experiment trackers"),
}

ONLY_DISTS_ENV = "KDBENCH_ONLY_DISTS"  # comma-separated distributions to load (tests, debugging)


@dataclass
class Plugin:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: type[Params]
    help: str
    dist: str
    version: str
    module: str

    @property
    def qualified_name(self) -> str:
        return f"{self.dist}:{self.name}"


@dataclass
class BrokenPlugin:
    entry_point: str
    dist: str
    error: str


@dataclass
class Registry:
    plugins: dict[str, dict[str, list[Plugin]]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )
    broken: list[BrokenPlugin] = field(default_factory=list)

    # ---------------------------------------------------------------- lookup
    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])

    def all(self, kind: str) -> list[Plugin]:
        return [p for name in self.names(kind) for p in self.plugins[kind][name]]

    def find(self, kind: str, name: str) -> Plugin:
        """Resolve ``name`` or ``dist:name``; raises UserError (with a suggestion) otherwise."""
        dist, _, short = name.rpartition(":")
        candidates = self.plugins[kind].get(short, [])
        if dist:
            candidates = [p for p in candidates if normalize_dist(p.dist) == normalize_dist(dist)]
        if len(candidates) == 1:
            return candidates[0]
        label = {"student_method": "student method", "view": "augmentation view"}.get(kind, KINDS[kind][1][:-1])
        if not candidates:
            raise UserError(f"unknown {label} {name!r}{self.suggest(kind, short)}")
        both = " and ".join(p.qualified_name for p in candidates)
        raise UserError(
            f"{label} {short!r} is registered by several distributions ({both}); "
            f"write the qualified name, e.g. {candidates[0].qualified_name!r}"
        )

    def canonical_name(self, kind: str, name: str) -> str:
        """The name a run spec records for ``name``: the plain name whenever it alone finds the
        same plugin (so ``kdbench:kd`` and ``kd`` are one spec and one run id), else
        ``dist:name`` with the distribution's normalised name."""
        plugin = self.find(kind, name)
        if len(self.plugins[kind].get(plugin.name, [])) == 1:
            return plugin.name
        return f"{normalize_dist(plugin.dist)}:{plugin.name}"

    def suggest(self, kind: str, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(kind), n=1, cutoff=0.5)
        if close:
            return f" (did you mean {close[0]!r}?)"
        known = ", ".join(self.names(kind)) or "none registered"
        return f" (known: {known})"

    def view_makers(self) -> dict[str, Callable[..., Any]]:
        """Every registered augmentation view, by name (``dist:name`` too): what
        :class:`kdbench.data.loader.DeviceData` calls to make the views a plugin asks for."""
        makers = {}
        for plugin in self.all("view"):
            makers[plugin.qualified_name] = plugin.factory
            if len(self.plugins["view"][plugin.name]) == 1:
                makers[plugin.name] = plugin.factory
        return makers

    def versions(self) -> dict[str, str]:
        """Distribution -> version of every plugin provider (for provenance)."""
        return {p.dist: p.version for k in KINDS for p in self.all(k)}


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def normalize_dist(name: str) -> str:
    """PEP 503 normalisation: 'kdbench_Example' and 'kdbench-example' are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _entry_points() -> list[metadata.EntryPoint]:
    eps = list(metadata.entry_points(group=GROUP))
    only = os.environ.get(ONLY_DISTS_ENV)
    if only:
        keep = {normalize_dist(d.strip()) for d in only.split(",") if d.strip()}
        eps = [ep for ep in eps if ep.dist is not None and normalize_dist(ep.dist.name) in keep]
    # Deduplicate (the same dist can appear twice on sys.path, e.g. editable + build dir).
    seen, unique = set(), []
    for ep in eps:
        key = (ep.dist.name if ep.dist else "?", ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    return unique


def load_registry(entry_points: Iterable[metadata.EntryPoint] | None = None) -> Registry:
    """Load every plugin; broken ones are recorded, never raised."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    provider: dict[str, tuple[str, str]] = {}  # pluggy plugin name -> (dist, version)
    for ep in _entry_points() if entry_points is None else entry_points:
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "?"
        plugin_name = f"{dist}:{ep.name}"
        try:
            module = ep.load()
            pm.register(module, name=plugin_name)
        except Exception as exc:  # a broken third-party plugin must not take the others down
            reg.broken.append(BrokenPlugin(f"{ep.name} = {ep.value}", dist, _one_line(exc)))
            continue
        hooks = {caller.name for caller in pm.get_hookcallers(module) or []}
        if not hooks & {hook for hook, _ in KINDS.values()}:
            reg.broken.append(BrokenPlugin(f"{ep.name} = {ep.value}", dist,
                                           "no kdbench hooks found (missing @hookimpl, or a "
                                           "misspelled hook name? see kdbench/hookspecs.py)"))
            continue
        provider[plugin_name] = (dist, version, f"{ep.name} = {ep.value}")

    for kind, (hook_name, _) in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name not in provider:
                continue
            dist, version, ep_text = provider[impl.plugin_name]
            staged: list[Plugin] = []
            try:
                impl.function(register=_make_register(staged, kind, dist, version, ep_text))
                for plugin in staged:  # only a hook that completed registers anything
                    existing = reg.plugins[kind].setdefault(plugin.name, [])
                    if any(p.dist == dist for p in existing):
                        raise ValueError(f"{kind} {plugin.name!r} registered twice by {dist}")
                    existing.append(plugin)
            except Exception as exc:
                reg.broken.append(BrokenPlugin(ep_text, dist, _one_line(exc)))
    return reg


def _make_register(staged: list[Plugin], kind: str, dist: str, version: str, module: str):
    def register(name: str, factory: Callable[..., Any], params: type[Params] = NoParams,
                 help: str = "") -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"invalid plugin name {name!r}: use letters, digits, '_', '.', '-'")
        if not (isinstance(params, type) and issubclass(params, Params)):
            raise TypeError(f"{name}: params must be a kdbench.api.Params subclass")
        if any(p.name == name for p in staged):
            raise ValueError(f"{kind} {name!r} registered twice by {dist}")
        staged.append(Plugin(kind, name, factory, params, help, dist, version, module))

    return register


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())
