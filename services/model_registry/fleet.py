"""Fleet files: read, check, and say what is wrong with them, all at once and by path.

A fleet file is checked in two passes, both pure. First its shape: every item of every
section is decoded on its own, so each malformed item is reported (msgspec stops at the
first error of a document, which would make a person fix a file one typo per run).
Then, when the shapes are right, every rule of `rules.check_state` over the records the
file turns into on its own, each problem pointing at the file (`$.deployments[1].mode`).
The registry checks the file once more against what it already holds (see
`service.RegistryService.apply`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

from tierflow.services.model_registry.desired import to_records
from tierflow.services.model_registry.rules import Locator, Problem, RegistryLocator, RuleContext, check_state, format_problems
from tierflow.services.model_registry.schema import SECTIONS, Fleet

__all__ = ["Fleet", "FleetError", "FleetLocator", "load_fleet", "parse_fleet", "decode_fleet", "check_fleet", "read_fleet_file", "to_records"]

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


class FleetError(ValueError):
    """A fleet file that cannot be applied; `problems` lists each one with its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid fleet file:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class FleetLocator:
    """Paths into the fleet file for records it declares; registry paths for the rest."""

    def __init__(self, fleet: Fleet, fallback: Locator | None = None) -> None:
        self._fallback = fallback or RegistryLocator()
        self._index: dict[tuple[str, str], int] = {}
        self._versions: dict[tuple[str, str], int] = {}
        for section, items in (("model", fleet.models), ("bundle", fleet.bundles), ("deployment", fleet.deployments)):
            for i, item in enumerate(items):
                self._index.setdefault((section, item.name), i)
        for m in fleet.models:
            for k, v in enumerate(m.versions):
                self._versions.setdefault((m.name, v.version), k)

    def path(self, problem: Problem) -> str:
        i = self._index.get((problem.kind, problem.name))
        if i is None:
            return self._fallback.path(problem)
        base = f"$.{problem.kind}s[{i}]"
        if problem.version is not None:
            k = self._versions.get((problem.name, problem.version))
            base += f".versions[{k}]" if k is not None else f".versions[{problem.version}]"
        return base + problem.field


def _shape_problem(prefix: str, exc: msgspec.ValidationError) -> str:
    m = _AT.match(str(exc))
    assert m is not None  # the pattern matches any string
    return f"{prefix}{m['path'] or ''}: {m['msg']}"


def decode_fleet(text: str | bytes, *, source: str = "fleet file") -> Fleet:
    """The file's structs; FleetError lists every malformed item (and duplicate name)."""
    try:
        doc: Any = msgspec.yaml.decode(text)
    except msgspec.DecodeError as exc:
        raise FleetError([f"{source}: not valid YAML: {exc}"]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise FleetError([f"$: {source} must be a mapping with models, bundles and deployments, got {type(doc).__name__}"])
    problems = [f"$.{key}: unknown section (expected one of: {', '.join(SECTIONS)})" for key in doc if key not in SECTIONS]
    sections: dict[str, list[Any]] = {}
    for section, item_type in SECTIONS.items():
        items = doc.get(section) or []
        if not isinstance(items, list):
            problems.append(f"$.{section}: expected a list, got {type(items).__name__}")
            continue
        decoded = []
        for i, item in enumerate(items):
            try:
                decoded.append(msgspec.convert(item, item_type))
            except msgspec.ValidationError as exc:
                problems.append(_shape_problem(f"$.{section}[{i}]", exc))
        names = [d.name for d in decoded]
        problems += [f"$.{section}: the name {n!r} is declared twice" for n in sorted({n for n in names if names.count(n) > 1})]
        sections[section] = decoded
    if problems:
        raise FleetError(problems)
    return Fleet(**sections)


def check_fleet(fleet: Fleet, ctx: RuleContext | None = None) -> list[str]:
    """Every rule broken by the file on its own, by path into the file."""
    problems: list[Problem] = check_state(to_records(fleet), ctx or RuleContext.builtin())
    return format_problems(problems, FleetLocator(fleet))


def parse_fleet(text: str | bytes, *, source: str = "fleet file", ctx: RuleContext | None = None) -> Fleet:
    """A fleet that is well formed and consistent on its own, else FleetError with every problem."""
    fleet = decode_fleet(text, source=source)
    problems = check_fleet(fleet, ctx)
    if problems:
        raise FleetError(problems)
    return fleet


def read_fleet_file(path: str | Path) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise FleetError([f"{p}: cannot read: {exc.strerror}"]) from None


def load_fleet(path: str | Path, *, ctx: RuleContext | None = None) -> Fleet:
    return parse_fleet(read_fleet_file(path), source=str(path), ctx=ctx)
