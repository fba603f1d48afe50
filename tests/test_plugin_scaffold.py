"""``kpt new-plugin``: the scaffold installs with pip, is discovered through its entry point, passes
``kpt plugins check`` and trains with ``kpt train``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import tiny_plugin as tiny

from kpt.cli import main
from kpt.plugin.scaffold import write_plugin_package


def test_scaffold_files_and_name_rules(tmp_path, capsys):
    assert main(["new-plugin", "hand_pose", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "kpt-plugin-hand-pose"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == {"pyproject.toml", "README.md", "tests/test_plugin.py",
                     "kpt_plugin_hand_pose/__init__.py", "kpt_plugin_hand_pose/plugin.py",
                     "kpt_plugin_hand_pose/data.py", "kpt_plugin_hand_pose/default.yaml"}
    pyproject = (folder / "pyproject.toml").read_text()
    assert '[project.entry-points."kpt.plugins"]' in pyproject
    assert 'hand_pose = "kpt_plugin_hand_pose.plugin:PLUGIN"' in pyproject
    assert "{{" not in "".join((folder / f).read_text() for f in files)
    assert 'main(["plugins", "check", "hand_pose"])' in (folder / "tests/test_plugin.py").read_text()
    with pytest.raises(FileExistsError):
        write_plugin_package("hand_pose", tmp_path)
    for bad in ("Hand", "2d", "class", "a-b"):
        with pytest.raises(ValueError, match="lowercase"):
            write_plugin_package(bad, tmp_path)


def test_installed_scaffold_is_found_checked_and_trained(tmp_path):
    folder = write_plugin_package("demo", tmp_path)
    site = tmp_path / "site"
    if importlib.util.find_spec("setuptools") is not None:  # build and install it as pip would
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--no-build-isolation", "--no-index", "--target", str(site),
                              str(folder)], capture_output=True, text=True, timeout=300, check=False)
        assert pip.returncode == 0, pip.stderr[-2000:]
    else:  # no offline build backend (Python >= 3.12 venvs): the package plus its entry point
        shutil.copytree(folder / "kpt_plugin_demo", site / "kpt_plugin_demo")
        tiny.write_entry_point(site, "demo", "kpt_plugin_demo.plugin:PLUGIN")
    assert (site / "kpt_plugin_demo" / "default.yaml").is_file()  # package data installed
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from kpt.cli import main
        codes = [main(["plugins"]), main(["plugins", "check", "demo"]),
                 main(["train", "demo", "--out", {str(run)!r}, "train.max_steps=3",
                       "data.train_size=48", "data.eval_size=16", "model.depth=1",
                       "train.batch_size=16"])]
        sys.exit(max(codes))
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    listing = proc.stdout.split("kpt plugins check demo")[0]
    demo_line = next(line for line in listing.splitlines() if line.startswith("demo "))
    assert " ok " in demo_line and "kpt-plugin-demo" in demo_line
    assert "PASSED" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3 and 0.0 <= summary["accuracy"] <= 100.0
    assert (run / "weights.safetensors").is_file()
