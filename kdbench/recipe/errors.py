"""Recipe problems as messages a user can act on: the recipe path, the line of the key, the key
path (``method_sets[2].methods[0].temperature``) and a fix ("did you mean ...", the valid keys,
the expected type). tomllib keeps no positions, so lines are found in the text."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kdbench.api import UserError


class RecipeError(UserError):
    """Several recipe problems, reported together (one per line)."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        head = f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the recipe"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


def dotted(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_TYPE_HINTS = {
    "int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
    "float_parsing": "a number", "string_type": "a string", "bool_type": "true or false",
    "bool_parsing": "true or false", "list_type": "an array", "dict_type": "a table",
    "model_type": "a table", "literal_error": None, "missing": None,
}


def describe(err: dict, raw: Any, locate: "Locator", model: type[BaseModel], prefix: tuple = (),
              extra_keys: set[str] = frozenset(), plugin: str | None = None) -> str:
    loc = tuple(err["loc"])
    path = prefix + loc
    where = locate(path)
    key = dotted(path)
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(model, loc[:-1]) | set(extra_keys)
        close = difflib.get_close_matches(str(loc[-1]), sorted(valid), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
        owner = f" for {plugin!r}" if plugin else ""
        return f"{where}{key}: unknown key{owner} ({hint})"
    if kind == "missing":
        return f"{where}{key}: required key is missing"
    expected = _TYPE_HINTS.get(kind)
    value = _get(raw, loc)
    if expected:
        return f"{where}{key}: expected {expected}, got {value!r}"
    return f"{where}{key}: {err['msg']} (got {value!r})" if value is not _MISSING else f"{where}{key}: {err['msg']}"


_MISSING = object()


def _get(raw: Any, loc: tuple) -> Any:
    cur = raw
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return cur


def _valid_keys(model: type[BaseModel], loc: tuple) -> set[str]:
    """Field names of the (nested) model at ``loc``."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int) or cur is None:
            continue
        field_info = getattr(cur, "model_fields", {}).get(part)
        if field_info is None:
            return set()
        cur = _inner_model(field_info.annotation)
    keys = set(getattr(cur, "model_fields", {}))
    for name, f in getattr(cur, "model_fields", {}).items():
        if f.alias:
            keys.add(f.alias)
    return keys


def _inner_model(annotation):
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


class Locator:
    """Best-effort line lookup for a key path in TOML text (tomllib keeps no positions)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def __call__(self, path: tuple) -> str:
        line = self.find(path)
        return f"line {line}: " if line else ""

    def find(self, path: tuple) -> int | None:
        """1-based line of the key at ``path``: searched inside its ``[table]`` or n-th
        ``[[array]]`` section when the file has one, else anywhere (inline tables)."""
        if path and isinstance(path[0], str):
            is_array = len(path) > 1 and isinstance(path[1], int)
            n, rest = (path[1], path[2:]) if is_array else (0, path[1:])
            pattern = r"^\s*\[\[\s*%s\s*\]\]" if is_array else r"^\s*\[\s*%s\s*\]"
            section = self._section(re.compile(pattern % re.escape(path[0])), n)
            if section:
                start, end = section
                return self._find_keys(list(rest), start, end) or start + 1
        return self._find_keys(list(path), 0, len(self.lines))

    def _section(self, header: re.Pattern, n: int) -> tuple[int, int] | None:
        hits = [i for i, line in enumerate(self.lines) if header.match(line)]
        if len(hits) <= n:
            return None
        start = hits[n]
        end = next((i for i in range(start + 1, len(self.lines))
                    if re.match(r"^\s*\[", self.lines[i])), len(self.lines))
        return start, end

    def _find_keys(self, path: list, start: int, end: int) -> int | None:
        """Walk the keys outer to inner, each at or after the line of the previous one."""
        found = None
        line = start
        for part in path:
            if isinstance(part, int):
                continue
            pat = re.compile(r"(^|[\s{,.])" + re.escape(part) + r"\s*[=.]")
            hit = next((i for i in range(line, end) if pat.search(self.lines[i])), None)
            if hit is None:
                break
            found = line = hit
        return None if found is None else found + 1
