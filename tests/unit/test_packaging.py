"""pyproject.toml maps the repository's folders onto one `tierflow` namespace by hand;
this keeps the hand-kept list honest (a missing entry works in editable installs and
breaks in real ones)."""

from __future__ import annotations

import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_python_package_folder_is_listed_and_mapped() -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapping: dict[str, str] = tool["package-dir"]
    folders_to_names = {}
    for name, folder in mapping.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            folders_to_names[init.parent] = ".".join([name, *rel.parts]) if rel.parts else name
    on_disk = set(folders_to_names.values())
    assert on_disk <= listed, f"packages on disk but not in pyproject: {sorted(on_disk - listed)}"
    assert listed <= on_disk, f"packages in pyproject with no folder: {sorted(listed - on_disk)}"
