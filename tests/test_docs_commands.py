"""Every ``kpt`` command the user is shown works: ``kpt --help`` examples, README.md and docs/*.md.

Commands are collected when the tests are collected, so a command added to the help or the docs is tested
from then on. Sources: the examples of ``kpt --help`` and ``kpt train --help`` (kpt/cli.py ``EXAMPLES``,
``TRAIN_EXAMPLES``), every line starting with ``kpt`` (or ``torchrun ... -m kpt``) in a fenced code block
of README.md and docs/*.md (not docs/results/, which is history), and inline ```kpt ...``` spans of those
files that are complete commands (spans with placeholders such as ``NAME``, ``<run>``, ``[...]`` are
schematic; :data:`INLINE_REFERENCES` lists the spans that only name a command).

How deep each command is checked:

* ``kpt train ...``: run with ``--print-config`` (files named by ``--config`` are created as tiny YAML
  files); every ``key=value`` of the command must be in the printed config with that value.
* ``kpt plugins ...``, ``kpt new-plugin ...``, ``kpt --help`` and ``kpt eval mnist RUN`` (against a tiny
  run made where the command expects it): run for real.
* Everything else (real data, weights or a network needed): parsed by the real parsers and stopped right
  after a successful parse: ``kpt eval`` and plugin commands (predict, data, ...) by their own parser too,
  core commands declared whole in the CLI's parser (convert, ...) at the entry of their handler.

Placeholders in code blocks are replaced by paths in the test folder (``DIR``, ``RAW``, ``SRC``, ``RUN``,
``<run>``); a shell loop variable takes the loop's first value.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest
import tiny_plugin as tiny
import torch
import yaml

import kpt.plugin
from kpt import cli, registry
from kpt.config import build_config
from kpt.engine.trainer import train

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/results/ not globbed
#: Inline spans that name a command in running text rather than give one to type.
INLINE_REFERENCES = {"kpt eval face", "kpt predict face", "kpt data prepare face", "kpt eval",
                     "kpt plugins check", "kpt train", "kpt convert cvlface", "kpt new-plugin",
                     "kpt data validate face"}
_PLACEHOLDER = re.compile(r"\b(DIR|RAW|SRC|DST|RUN|FILE|PATH)\b|<run>")
#: A span is schematic when it has brackets, an ellipsis or a capitalised word that is not a placeholder.
_SCHEMATIC = re.compile(r"[<>\[\]{}]|\.\.\.|\b(?!(?:DIR|RAW|SRC|DST|RUN|FILE|PATH)\b)[A-Z][A-Z_]{2,}\b")


def _kpt_argv(words: list[str]) -> list[str] | None:
    """The kpt arguments of a shell command line, or None when it does not run kpt."""
    if words[:1] == ["kpt"]:
        return words[1:]
    for i in range(len(words) - 1):  # torchrun ... -m kpt ARGS, python -m kpt ARGS
        if words[i] == "-m" and words[i + 1] == "kpt" and words[0] in ("torchrun", "python"):
            return words[i + 2:]
    return None


def _help_commands() -> list[tuple[str, str]]:
    found = []
    for name in ("EXAMPLES", "TRAIN_EXAMPLES"):
        for line in getattr(cli, name).splitlines():
            text = line.strip()
            if text.startswith(("kpt ", "torchrun ")):
                # the description starts after a run of two or more spaces
                found.append((f"kpt --help {name}", re.split(r"\s{2,}", text)[0]))
    return found


def _doc_commands(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    where = path.relative_to(ROOT).as_posix()
    found = []
    fence = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
    for block in fence.findall(text):
        block = re.sub(r"\\\n\s*", " ", block)  # join continued lines
        loop = dict(re.findall(r"^\s*for (\w+) in (\S+)", block, re.MULTILINE))
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            for var, value in loop.items():
                line = line.replace(f"${var}", value)
            if re.match(r"(kpt|torchrun|python -m kpt)(\s|$)", line):
                found.append((where, " ".join(line.split(" #")[0].split())))
    for span in re.findall(r"(?<!`)`(kpt\s[^`]+)`(?!`)", fence.sub("", text)):
        span = " ".join(span.split())  # a span may be wrapped over two lines
        if span not in INLINE_REFERENCES and not _SCHEMATIC.search(span):
            found.append((f"{where} (inline)", span))
    return found


def _commands() -> list[tuple[str, str]]:
    found = _help_commands()
    for path in DOC_FILES:
        found += _doc_commands(path)
    unique = {}
    for where, line in found:
        unique.setdefault(line, where)
    return [(where, line) for line, where in unique.items()]


COMMANDS = _commands()


class _Parsed(Exception):
    """Raised right after a command's own parser accepted its arguments (nothing else runs)."""


@pytest.fixture
def xray_installed(tmp_path_factory, monkeypatch):
    """The ``kpt new-plugin xray`` scaffold, discoverable through its entry point (docs/plugins.md)."""
    parent = tmp_path_factory.mktemp("scaffold")
    assert cli.main(["new-plugin", "xray", "--out", str(parent)]) == 0
    folder = parent / "kpt-plugin-xray"
    tiny.write_entry_point(folder, "xray", "kpt_plugin_xray.plugin:PLUGIN")
    monkeypatch.syspath_prepend(str(folder))
    kpt.plugin.discover_plugins(refresh=True)
    registry.reset()
    yield
    monkeypatch.undo()
    for module in [m for m in sys.modules if m.startswith("kpt_plugin_xray")]:
        del sys.modules[module]
    kpt.plugin.discover_plugins(refresh=True)
    registry.reset()


def _words(line: str, tmp_path: Path) -> list[str]:
    def place(match: re.Match) -> str:
        path = tmp_path / "placeholder" / match.group(0).strip("<>")
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    words = shlex.split(line, comments=True)
    return [_PLACEHOLDER.sub(place, w) for w in words]


def _tiny_mnist_run(folder: Path) -> None:
    """A 2-step MNIST run on synthetic digits with a tiny model, written to ``folder``."""
    from kpt_plugins.mnist.plugin import PLUGIN

    cfg = build_config(PLUGIN, data="synthetic", overrides=[
        "model.depth=1", "model.embed_dim=16", "model.num_heads=2", "model.stem_channels=4",
        "data.synthetic_train=64", "data.synthetic_test=32", "train.batch_size=32",
        "train.max_steps=2", "eval.batch_size=64"])
    train(PLUGIN, cfg, folder)


def _check_train(argv: list[str], tmp_path: Path, capsys) -> None:
    if "--config" in argv:  # the files it names, as tiny configs any plugin accepts
        for name in argv[argv.index("--config") + 1:]:
            if name.startswith("-") or "=" in name:
                break
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("train:\n  max_steps: 3\n")
    capsys.readouterr()
    assert cli.main([*argv, "--print-config"] if "--print-config" not in argv else argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(printed, dict) and "train" in printed
    for word in argv[2:]:
        if "=" not in word or word.startswith("-"):
            continue
        key, _, value = word.partition("=")
        node = printed
        for part in key.split("."):
            node = node[part]
        wanted = yaml.safe_load(value)
        if isinstance(node, float):  # PyYAML reads 5e-4 as a string; the config casts it
            wanted = float(value)
        assert node == wanted, f"{key}: printed {node!r}, the command says {value!r}"


def _check_parses(argv: list[str], monkeypatch) -> None:
    """Run the CLI until the command's own parser has accepted the arguments."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        namespace = parse_args(self, args, namespace)
        raise _Parsed(f"{self.prog}: {namespace}")

    def stop(args: argparse.Namespace) -> int:
        raise _Parsed(f"kpt {args.command}: {args}")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    # `kpt eval` and the plugin commands (predict, data, ...) parse the rest of the line themselves;
    # a core command declared whole in the CLI's parser (convert, ...) stops where it would start work
    handler = f"cmd_{argv[0].replace('-', '_')}"
    if argv[0] != "eval" and hasattr(cli, handler):
        monkeypatch.setattr(cli, handler, stop)
    with pytest.raises(_Parsed):
        code = cli.main(argv)
        pytest.fail(f"`kpt {shlex.join(argv)}` returned {code} before its arguments were parsed")


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_documented_command(where, line, tmp_path, monkeypatch, capsys, xray_installed):
    argv = _kpt_argv(_words(line, tmp_path))
    assert argv is not None, line
    monkeypatch.chdir(tmp_path)
    command = argv[0] if argv else ""
    if command == "train":
        _check_train(argv, tmp_path, capsys)
    elif command in ("", "--help"):
        with pytest.raises(SystemExit) as info:
            cli.main(["--help"])
        assert info.value.code == 0 and "examples:" in capsys.readouterr().out
    elif command in ("plugins", "new-plugin"):
        assert cli.main(argv) == 0, capsys.readouterr()
    elif argv[:2] == ["eval", "mnist"]:
        checkpoint = Path(argv[2])
        _tiny_mnist_run(checkpoint.parent if checkpoint.suffix else checkpoint)
        assert cli.main(argv) == 0
        assert "mnist_acc" in capsys.readouterr().out
    else:
        _check_parses(argv, monkeypatch)


def test_commands_are_collected_from_every_source():
    wheres = {where.split(" ")[0] for where, _ in COMMANDS}
    assert {"kpt", "README.md", "docs/face.md", "docs/gait.md", "docs/mnist.md",
            "docs/plugins.md", "docs/kprpe.md"} <= wheres
    assert not any("results/" in where for where, _ in COMMANDS)
    lines = [line for _, line in COMMANDS]
    assert "kpt train mnist --test affnist" in lines  # the README's main job
    assert any(line.startswith("torchrun") for line in lines)


def test_ambiguous_dataset_name_says_which_plugins_to_name(capsys):
    """`kpt data get synthetic` (once in docs/gait.md): three plugins have a `synthetic` set."""
    assert cli.main(["data", "get", "synthetic", "--dst", "x"]) == 2
    err = capsys.readouterr().err
    assert "`kpt data get gait ...`" in err and "`kpt data get mnist ...`" in err


def test_gait_data_get_writes_the_walkers_that_train_uses(tmp_path, monkeypatch):
    """docs/gait.md: 40 train and 20 test ids, the defaults of `kpt train gait` (not 48/24)."""
    from kpt_plugins.gait import plugin as gait

    written = []
    monkeypatch.setattr(gait, "generate", lambda root, spec: written.append((root, spec)))
    assert cli.main(["data", "get", "gait", "--dst", str(tmp_path / "walkers")]) == 0
    (root, spec), = written
    assert root == tmp_path / "walkers"
    assert (spec.num_train, spec.num_test) == (40, 20)
    assert spec == gait.synthetic_spec(build_config(gait.PLUGIN))
    text = (ROOT / "docs" / "gait.md").read_text()
    assert "(40 train ids, 20 test\nids" in text or "40 train ids, 20 test ids" in text
