"""pyproject.toml: a non-editable ``pip install .`` ships every package and data file of the tree.

Editable installs import sub-packages from the source folders whether they are listed or not, so a
package missing from ``[tool.setuptools] packages`` only breaks wheels; this test catches it first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["setuptools"]


def _packages_on_disk(package_dir: dict[str, str]) -> set[str]:
    """Dotted install names of every folder with an ``__init__.py`` under the mapped folders."""
    names = set()
    for top, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            names.add(".".join((top, *init.parent.relative_to(ROOT / folder).parts)))
    return names


def test_every_package_folder_is_listed():
    conf = _setuptools()
    on_disk = _packages_on_disk(conf["package-dir"])
    listed = set(conf["packages"])
    assert "kpt_plugins.face.retinaface" in on_disk  # the walk sees sub-packages
    assert sorted(on_disk - listed) == [], "add these to [tool.setuptools] packages"
    assert sorted(listed - on_disk) == [], "listed packages without an __init__.py"


def test_every_plugin_yaml_is_package_data():
    conf = _setuptools()
    folder = ROOT / conf["package-dir"]["kpt_plugins"]
    shipped = {p for pattern in conf["package-data"]["kpt_plugins"] for p in folder.glob(pattern)}
    assert (folder / "face" / "config.yaml") in shipped
    assert sorted(set(folder.rglob("*.yaml")) - shipped) == []
