"""Domain plugins: the contract a plugin fulfils, how plugins are found, and a package scaffold.

* :mod:`kpt.plugin.contract`: :class:`Plugin`, :class:`TaskData`, :func:`validate_plugin`
  (DESIGN §5);
* :mod:`kpt.plugin.discovery`: built-ins from ``registry.yaml`` and third parties from the
  entry-point group ``kpt.plugins``; :func:`load_plugin`, :func:`list_plugins`;
* :mod:`kpt.plugin.scaffold`: ``kpt new-plugin NAME`` (:func:`write_plugin_package`, templates in
  ``templates/``), imported only when used.

Every name a plugin or a caller needs is importable from here:
``from kpt.plugin import Plugin, TaskData``.
"""

from kpt.plugin.contract import PLUGIN_API_VERSION, Plugin, PluginError, TaskData, validate_plugin
from kpt.plugin.discovery import (
    ENTRY_POINT_GROUP,
    PluginEntry,
    discover_plugins,
    list_plugins,
    load_plugin,
    plugin_module_dir,
    rejected_plugins,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_API_VERSION",
    "Plugin",
    "PluginEntry",
    "PluginError",
    "TaskData",
    "discover_plugins",
    "list_plugins",
    "load_plugin",
    "plugin_module_dir",
    "rejected_plugins",
    "validate_plugin",
]
