"""Name helpers shared by the registry, the plugin discovery and the config (private to kpt).

Kept apart so that those modules can use them without importing one another.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

__all__ = ["did_you_mean", "import_object"]


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(name), sorted(map(str, choices)), n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def import_object(target: str, what: str = "") -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute.

    Raises:
        ImportError: naming ``what`` (who asked for it) and the target, with the original error.
    """
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ImportError(f"{what or 'component'}: target {target!r} must look like 'module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # third-party code may even call sys.exit() on import
        raise ImportError(f"{what or target}: cannot import module {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(f"{what or target}: module {module_name!r} has no attribute "
                              f"{attr_path!r}") from exc
    return obj
