"""Registry, lazy components, plugin discovery/validation and the safe unpickler."""

from __future__ import annotations

import pickle
from importlib import metadata

import numpy as np
import pytest
import torch

import kpt
from kpt import registry
from kpt.data.safe_pickle import NUMPY_ARRAY_GLOBALS, UnsafePickleError, restricted_load
from kpt.plugin import Plugin, PluginError, load_plugin, validate_plugin
from kpt.plugin import discovery as plugin_mod


def test_register_create_list_and_did_you_mean():
    reg = registry.Registry("widget", "Widgets: widget(x) -> x.")

    @reg.register()
    class Linearish(torch.nn.Module):
        def __init__(self, width: int = 3):
            super().__init__()
            self.width = width

    @reg.register("other_widget")
    def make_other(width: int = 1):
        return Linearish(width)

    assert reg.list() == ["Linearish", "other_widget"]
    assert reg.list("other*") == ["other_widget"]
    assert reg.create("other_widget", width=5).width == 5
    with pytest.raises(registry.RegistryError, match="Did you mean 'other_widget'"):
        reg.create("other_widgit")
    with pytest.raises(registry.RegistryError, match="already registered"):
        reg.register("other_widget")(lambda: None)


def test_lazy_component_is_imported_only_on_create():
    reg = registry.Registry("thing", "Things.")
    assert reg.register_lazy("od", "collections:OrderedDict", "test")
    assert type(reg._entries["od"]).__name__ == "_Lazy"
    assert isinstance(reg.create("od"), dict)
    assert not reg.register_lazy("od", "collections:Counter", "another plugin")
    assert any("conflicts" in c for c in registry.CONFLICTS)
    registry.CONFLICTS.clear()


def test_public_api_names_and_unknown_kind():
    listed = kpt.list()
    # the kinds and names that DESIGN §4 promises (core backbones, built-in plugin components, metrics)
    assert {"model", "head", "keypoints", "dataset", "metric"} <= set(listed)
    assert {"vit", "swin", "vit_small_kprpe", "vit_base_kprpe"} <= set(listed["model"])
    assert {"adaface", "arcface", "cosface", "kappaface"} <= set(listed["head"])
    assert {"retinaface", "box"} <= set(listed["keypoints"])
    assert {"face-synthetic", "face-data"} <= set(listed["dataset"])
    assert {"verification", "tar_at_far", "identification", "retrieval"} <= set(listed["metric"])
    assert kpt.list_models() == listed["model"]
    assert kpt.list_models("vit*") == sorted(n for n in listed["model"] if n.startswith("vit"))
    assert kpt.list("head") == {"head": listed["head"]}
    with pytest.raises(registry.RegistryError, match="Did you mean 'model'"):
        kpt.create("modle", "vit")


def _dummy_plugin(**kw):
    return Plugin(**{"name": "dummy", "description": "d", "default_config": {},
                     "build_data": lambda c: None, "build_model": lambda c, i: None,
                     "training_step": lambda m, b, c: None, "evaluate": lambda m, d, c, dev: {},
                     **kw})


def test_validation_names_plugin_and_problem():
    assert validate_plugin(_dummy_plugin(), "plugin 'dummy' (pkg)") == []
    problems = validate_plugin(_dummy_plugin(name="Bad Name", evaluate=3, api_version=99), "P (pkg x)")
    text = " ".join(problems)
    assert "P (pkg x)" in text and "Bad Name" in text and "evaluate must be callable" in text
    assert "api_version 99" in text
    assert "expected a kpt.plugin.Plugin" in validate_plugin(object(), "where")[0]


class _FakeDist:
    def __init__(self):
        self.metadata = {"Name": "kpt-plugin-fake"}


class _FakeEP:
    def __init__(self, name, value):
        self.name, self.value, self.dist = name, value, _FakeDist()


def test_third_party_discovery_broken_and_conflict(monkeypatch):
    eps = [_FakeEP("mnist", "evil_pkg:PLUGIN"), _FakeEP("broken", "no_such_module_xyz:PLUGIN"),
           _FakeEP("wrongtype", "collections:OrderedDict")]
    monkeypatch.setattr(plugin_mod, "_entry_points", lambda: eps)
    try:
        found = plugin_mod.discover_plugins(refresh=True)
        assert found["mnist"].builtin  # the built-in keeps its name
        rejected = plugin_mod.rejected_plugins()
        assert [r.name for r in rejected] == ["mnist"] and rejected[0].status == "conflict"
        assert "kpt-plugin-fake" in rejected[0].error and "already taken" in rejected[0].error
        entries = {e.name: e for e in plugin_mod.list_plugins() if not e.builtin}
        assert entries["broken"].status == "broken" and "no_such_module_xyz" in entries["broken"].error
        assert entries["wrongtype"].status == "broken"
        with pytest.raises(PluginError, match="kpt-plugin-fake"):
            load_plugin("broken")
        with pytest.raises(PluginError, match="Did you mean 'broken'"):
            load_plugin("brokn")
    finally:
        monkeypatch.undo()
        plugin_mod.discover_plugins(refresh=True)


def test_entry_point_group_is_queried():
    assert plugin_mod.ENTRY_POINT_GROUP == "kpt.plugins"
    names = {ep.name for ep in metadata.entry_points(group="kpt.plugins")}
    assert names <= set(plugin_mod.discover_plugins(refresh=True)) | {
        e.name for e in plugin_mod.rejected_plugins()}


def test_restricted_load_allows_arrays_and_rejects_code(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = restricted_load(pickle.dumps({"a": arr, "b": [1, 2]}), NUMPY_ARRAY_GLOBALS, "arrays.pkl")
    np.testing.assert_array_equal(out["a"], arr)
    evil = pickle.dumps(print)  # a global that is not allowed
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*builtins\.print"):
        restricted_load(evil, NUMPY_ARRAY_GLOBALS, "evil.pkl")
    path = tmp_path / "x.pkl"
    path.write_bytes(b"garbage")
    with path.open("rb") as fh, pytest.raises(pickle.UnpicklingError, match="x.pkl"):
        restricted_load(fh, set(), str(path))


def test_third_party_components_are_lazy_and_cannot_replace_builtins(monkeypatch, tmp_path):
    import sys

    module = tmp_path / "fake_components_plugin.py"
    module.write_text(
        "from kpt.plugin import Plugin\n"
        "PLUGIN = Plugin(name='fakecomp', description='d', default_config={},\n"
        "                build_data=print, build_model=print, training_step=print, evaluate=print,\n"
        "                components={'widget': {'ordered': 'collections:OrderedDict'},\n"
        "                            'head': {'adaface': 'collections:Counter'}})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugin_mod, "_entry_points",
                        lambda: [_FakeEP("fakecomp", "fake_components_plugin:PLUGIN")])
    plugin_mod.discover_plugins(refresh=True)
    registry.reset()
    try:
        assert "ordered" in kpt.list("widget")["widget"]
        assert isinstance(kpt.create("widget", "ordered"), dict)
        conflicts = " ".join(registry.CONFLICTS)
        assert "head 'adaface'" in conflicts and "kpt-plugin-fake" in conflicts
        assert registry.HEADS.source("adaface") == "builtin plugin face"
    finally:
        monkeypatch.undo()
        sys.modules.pop("fake_components_plugin", None)
        plugin_mod.discover_plugins(refresh=True)
        registry.reset()
        registry.REGISTRIES.pop("widget", None)
