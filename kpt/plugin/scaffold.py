"""``kpt new-plugin NAME``: write a pip-installable third-party plugin package from the templates.

The package (folder ``kpt-plugin-NAME``) declares its plugin through the entry point group
``kpt.plugins``, ships a tiny synthetic dataset with a keypoint source, a typed default config, a kpt
ViT with KP-RPE, and a test that runs ``kpt plugins check NAME``. It installs and trains as written.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from kpt._version import __version__

TEMPLATE_DIR = Path(__file__).with_name("templates")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def render(text: str, values: dict[str, str]) -> str:
    """Replace ``{{key}}`` placeholders; an unknown placeholder is an error (a template bug)."""
    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def write_plugin_package(name: str, parent: Path | str = ".") -> Path:
    """Write the package ``parent/kpt-plugin-NAME`` and return its folder.

    Args:
        name: the domain name (``kpt train NAME``): lowercase letters, digits and ``_``, not a Python
            keyword.
        parent: where the package folder is created.

    Raises:
        ValueError: bad name. FileExistsError: the folder exists (nothing is overwritten).
    """
    if not _NAME_RE.match(name) or keyword.iskeyword(name):
        raise ValueError(f"plugin name {name!r}: use lowercase letters, digits and '_' (starting with "
                         f"a letter), e.g. 'xray' or 'hand_pose'")
    folder = Path(parent) / f"kpt-plugin-{name.replace('_', '-')}"
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; choose another name or --out")
    package = f"kpt_plugin_{name}"
    values = {"name": name, "package": package, "kpt_version": __version__}
    for template in sorted(TEMPLATE_DIR.rglob("*.tmpl")):
        relative = template.relative_to(TEMPLATE_DIR).with_suffix("")  # drop .tmpl
        parts = [package if p == "package" else p for p in relative.parts]
        target = folder.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(template.read_text(), values))
    return folder
