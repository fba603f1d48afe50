"""A misbehaving third-party plugin cannot take the CLI down or replace a built-in component."""

from __future__ import annotations

import json
import sys

import pytest

import kpt
from kpt import registry
from kpt.cli import main
from kpt.plugin import discovery as plugin_mod

_PLUGIN_SOURCE = """
from kpt.plugin import Plugin
PLUGIN = Plugin(name={name!r}, description="fake third-party plugin", default_config={{}},
                build_data=print, build_model=print, training_step=print, evaluate=print)
"""


class _FakeDist:
    def __init__(self) -> None:
        self.metadata = {"Name": "kpt-plugin-misbehaving"}


class _FakeEP:
    def __init__(self, name: str, value: str) -> None:
        self.name, self.value, self.dist = name, value, _FakeDist()


@pytest.fixture
def third_party(monkeypatch, tmp_path):
    """Install fake third-party plugins: ``install({name: module source})`` (entry point NAME)."""
    modules: list[str] = []

    def install(sources: dict[str, str]) -> None:
        eps = []
        for name, source in sources.items():
            module = f"fake_misbehaving_{name}"
            (tmp_path / f"{module}.py").write_text(source)
            modules.append(module)
            eps.append(_FakeEP(name, f"{module}:PLUGIN"))
        monkeypatch.setattr(plugin_mod, "_entry_points", lambda: eps)
        plugin_mod.discover_plugins(refresh=True)
        registry.reset()

    monkeypatch.syspath_prepend(str(tmp_path))
    yield install
    monkeypatch.undo()
    for module in modules:
        sys.modules.pop(module, None)
    for reg in registry.REGISTRIES.values():  # forget what the fake modules registered
        for name in [n for n, obj in reg._entries.items()
                     if str(getattr(obj, "__module__", "")).startswith("fake_misbehaving_")]:
            del reg._entries[name], reg._sources[name]
    plugin_mod.discover_plugins(refresh=True)
    registry.reset()


def test_plugin_calling_sys_exit_is_listed_as_broken(third_party, capsys):
    third_party({"exiter": "import sys\nsys.exit(3)\n",
                 "fine": _PLUGIN_SOURCE.format(name="fine")})
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("exiter"))
    assert "broken" in row and "SystemExit" in row and "kpt-plugin-misbehaving" in row
    assert any(line.startswith("fine") and " ok " in line for line in out.splitlines())
    for name in ("mnist", "face", "gait"):
        assert name in out
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["exiter"]["status"] == "broken" and rows["fine"]["status"] == "ok"
    assert main(["train", "exiter", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kpt: error:") and "exiter" in err


def test_sys_exit_while_importing_a_component_is_an_import_error(third_party):
    third_party({"exiter": "import sys\nsys.exit(4)\n"})
    with pytest.raises(ImportError, match="SystemExit"):
        registry.import_object("fake_misbehaving_exiter:PLUGIN")


_OVERRIDER = """
from torch import nn
from kpt.plugin import Plugin
from kpt.registry import HEADS, MODELS

@MODELS.register("vit", override=True)
def evil_vit(**kwargs):
    return nn.Identity()

@HEADS.register("adaface", override=True)
class EvilHead(nn.Identity):
    pass

@MODELS.register("overrider_net")
def overrider_net(**kwargs):
    return nn.Identity()

PLUGIN = Plugin(name="overrider", description="replaces built-ins", default_config={},
                build_data=print, build_model=print, training_step=print, evaluate=print)
"""


def test_third_party_override_keeps_the_builtin(third_party, capsys):
    third_party({"overrider": _OVERRIDER})
    # imported before the built-in components are loaded: it registers first, yet cannot keep them
    plugin_mod.load_plugin("overrider")
    builtin_vit = registry.MODELS.get("vit")
    assert builtin_vit.__module__.startswith("kpt.") and builtin_vit.__name__ != "evil_vit"
    head = registry.HEADS.get("adaface")
    assert head.__module__.startswith("kpt_plugins.face") and head.__name__ == "AdaFace"
    assert registry.HEADS.source("adaface") == "builtin plugin face"
    assert "overrider_net" in kpt.list_models()  # new names are fine
    model = kpt.create_model("vit", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                             num_classes=4, pos="none")
    assert type(model).__name__ != "Identity"
    lines = [c for c in registry.CONFLICTS if "fake_misbehaving_overrider" in c]
    assert len(lines) == 2
    vit_line = next(c for c in lines if "'vit'" in c)
    assert "keeping the built-in one from module kpt.models" in vit_line
    head_line = next(c for c in lines if "'adaface'" in c)
    assert "keeping the built-in one from builtin plugin face" in head_line
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "conflict: model 'vit'" in out and "keeping the built-in one" in out


def test_builtin_override_and_same_object_reregistration_still_work():
    reg = registry.Registry("gadget", "Gadgets.")

    def a():
        return 1

    def b():
        return 2

    reg.register("x")(a)
    reg.register("x")(a)  # the same object again (re-import): accepted
    with pytest.raises(registry.RegistryError, match="already registered"):
        reg.register("x")(b)
    reg.register("x", override=True)(b)  # both from the same (non-kpt) module: allowed
    assert reg.get("x") is b
