"""One weights format: old and new headers load alike, run folders resolve, bad files are clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_plugin as tiny
import torch
from safetensors.torch import save_file

import kpt
from kpt.cli import main
from kpt.engine import weights
from kpt.engine.atomic import atomic_write, stale_temp_files
from kpt.engine.checkpoint import load_checkpoint, read_checkpoint_config
from kpt.engine.trainer import train
from kpt.engine.weights import CheckpointError, MissingCheckpointError
from kpt.errors import UserError
from kpt.models import save_model

torch.set_num_threads(1)

TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2,
            "pos": "abs+kprpe", "num_keypoints": 5}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-step run of the tiny test plugin (last.pt, best.pt, weights.safetensors)."""
    out = tmp_path_factory.mktemp("weights") / "run"
    with pytest.MonkeyPatch.context() as mp:
        tiny.register_in_process(mp)
        from kpt.config import build_config

        train(tiny.PLUGIN, build_config(tiny.PLUGIN, overrides=["train.max_steps=2"]), out)
    return out


@pytest.fixture
def tiny_installed(monkeypatch):
    tiny.register_in_process(monkeypatch)


def _outputs(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, tiny.TinyNet):
        x, k = torch.rand(3, 1, 8, 8, generator=g), torch.rand(3, 2, 2, generator=g)
    else:
        x, k = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 5, 2, generator=g)
    with torch.no_grad():
        return model.eval()(x, k)


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = kpt.create_model("vit", **TINY_VIT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # the zero-initialised KP-RPE layer too
    return model


# -- one schema, old files still load -------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_old_kpt_model_files_load_like_new_kpt_weights_files(tmp_path, suffix):
    model = _vit()
    new = save_model(model, tmp_path / f"new{suffix}")
    header = weights.read_header(new)
    assert (header["format"], header["version"], header["model"]) == ("kpt.weights", 2, "vit")
    assert header["plugin"] is None and header["kwargs"]["pos"] == "abs+kprpe"

    # the file exactly as kpt.models.serialization wrote it before the formats merged
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    legacy = {"kpt_format": "kpt-model", "kpt_version": "0.1.0", "model": "vit",
              "kwargs": json.dumps(model.kpt_spec["kwargs"], sort_keys=True)}
    old = tmp_path / f"old{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(old), metadata=legacy)
    else:
        torch.save({**legacy, "state_dict": state}, old)
    assert weights.read_header(old)["format"] == "kpt-model" and weights.is_model_file(old)

    a, b = kpt.load_model(str(old)), kpt.load_model(str(new))
    assert not a.training and type(a) is type(b)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert torch.equal(_outputs(a), _outputs(model)) and torch.equal(_outputs(b), _outputs(model))


def test_version_1_run_weights_load_like_the_new_ones(run, tiny_installed, tmp_path):
    from safetensors import safe_open

    new = run / "weights.safetensors"
    with safe_open(str(new), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "kpt.weights" and meta["version"] == "2" and meta["plugin"] == "tiny"
    # a version-1 file: the same keys without version / kpt_version
    old = tmp_path / "weights.safetensors"
    v1 = {k: meta[k] for k in ("format", "plugin", "model_class", "config", "info", "excluded")}
    from safetensors.torch import load_file

    save_file(load_file(str(new)), str(old), metadata=v1)
    a, b = kpt.load_model(old), kpt.load_model(new)
    assert isinstance(a, tiny.TinyNet) and torch.equal(_outputs(a), _outputs(b))


def test_save_model_stores_tied_weights_once(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

    model = Tied()
    path = save_model(model, tmp_path / "t.safetensors", name="vit", kwargs={})
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"a.weight", "a.bias", "b.bias"}


# -- one resolver ---------------------------------------------------------------------------------------
def test_run_folder_last_pt_and_weights_resolve_to_the_same_model(run, tiny_installed, tmp_path):
    assert weights.resolve_run_weights(run) == run / "weights.safetensors"
    ref = _outputs(kpt.load_model(run / "weights.safetensors"))
    for path in (run, run / "last.pt", run / "best.pt"):
        model = kpt.load_model(str(path))
        assert isinstance(model, tiny.TinyNet) and not model.training
        assert torch.equal(_outputs(model), ref), path  # 2 steps, evaluated at the end: best = last
    only_last = tmp_path / "only_last"
    only_last.mkdir()
    (only_last / "last.pt").write_bytes((run / "last.pt").read_bytes())
    assert weights.resolve_run_weights(only_last) == only_last / "last.pt"
    assert torch.equal(_outputs(kpt.load_model(only_last)), ref)

    empty = tmp_path / "empty"
    empty.mkdir()
    for missing in (empty, tmp_path / "nope.pt"):
        with pytest.raises(MissingCheckpointError, match=re.escape(str(missing))) as info:
            kpt.load_model(missing)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UserError)


def test_eval_takes_a_run_folder_last_pt_or_weights(run, tiny_installed, tmp_path, capsys):
    results = []
    for path in (run, run / "last.pt", run / "weights.safetensors"):
        out = tmp_path / f"{path.name}.json"
        assert main(["eval", "tiny", str(path), "--json", str(out)]) == 0, capsys.readouterr().err
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] == results[2]
    assert "tiny: " + str(run / "weights.safetensors") + " (step final)" in capsys.readouterr().out


# -- files that cannot be right -------------------------------------------------------------------------
DROP = object()  # a key left out of a checkpoint


class NotAllowed:
    """Pickled into a .pt file: ``weights_only`` loading must refuse it."""


def _bad_files(folder: Path, run: Path) -> dict[str, tuple[Path, str]]:
    """Each bad file and a fragment of the message it must give."""
    good_st, good_pt = (run / "weights.safetensors").read_bytes(), (run / "last.pt").read_bytes()
    files: dict[str, tuple[Path, str]] = {}

    def put(case: str, name: str, data: bytes, says: str) -> None:
        path = folder / case / name
        path.parent.mkdir()
        path.write_bytes(data)
        files[case] = (path, says)

    put("zero_pt", "last.pt", b"", "is empty (0 bytes)")
    put("zero_st", "weights.safetensors", b"", "is empty (0 bytes)")
    put("truncated_st", "weights.safetensors", good_st[: len(good_st) // 2], "as safetensors")
    put("truncated_pt", "last.pt", good_pt[: len(good_pt) // 2], "as a torch checkpoint")
    put("garbage_header", "weights.safetensors", (10**12).to_bytes(8, "little") + b"{not json",
        "as safetensors")
    put("text_as_pt", "best.pt", b"this is not a checkpoint\n", "as a torch checkpoint")
    tensors = {"fc1.weight": torch.zeros(2, 2)}
    meta = {"format": "kpt.weights", "version": "2", "plugin": "tiny", "model_class": "x.TinyNet",
            "info": "{}", "excluded": "[]"}
    for case, config, says in (("bad_json", "{model: [", "header key 'config' is not valid JSON"),
                               ("json_list", "[1, 2]",
                                "header key 'config' holds a list, expected a JSON object"),
                               ("no_config", None, "lacks the key 'config'")):
        path = folder / case / "weights.safetensors"
        path.parent.mkdir()
        save_file(tensors, str(path), metadata={**meta, **({"config": config} if config else {})})
        files[case] = (path, says)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for case, change, says in (("ckpt_no_model", {"model": DROP}, "lacks the key 'model'"),
                               ("ckpt_config_str", {"config": "model: x"},
                                "checkpoint key 'config' is a str, expected a dict"),
                               ("ckpt_step_float", {"step": 2.5}, "key 'step' is a float")):
        path = folder / case / "last.pt"
        path.parent.mkdir()
        bad = {k: v for k, v in {**ckpt, **change}.items() if v is not DROP}
        torch.save(bad, path)
        files[case] = (path, says)
    path = folder / "pickle" / "last.pt"
    path.parent.mkdir()
    torch.save({"format": "kpt.checkpoint", "obj": NotAllowed()}, path)
    files["pickle"] = (path, "refuses to unpickle")
    return files


BAD_CASES = ["zero_pt", "zero_st", "truncated_st", "truncated_pt", "garbage_header", "text_as_pt",
             "bad_json", "json_list", "no_config", "ckpt_no_model", "ckpt_config_str",
             "ckpt_step_float", "pickle"]


@pytest.fixture(scope="module")
def bad_files(run, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _bad_files(tmp_path_factory.mktemp("bad"), run)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_files_raise_checkpoint_error_naming_the_file(bad_files, tiny_installed, case):
    path, says = bad_files[case]
    for load in (kpt.load_model, lambda p: weights.read_run_state(p, "tiny"),
                 lambda p: kpt.load_model(p.parent)):  # the run folder resolves to the bad file
        with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
            load(path)
        assert says in str(info.value) and isinstance(info.value, UserError)
        assert "weights_only=False" not in str(info.value)  # never advise unpickling
        assert isinstance(info.value, RuntimeError)  # callers that caught RuntimeError still do
    if path.suffix == ".pt" and case not in ("text_as_pt",):
        with pytest.raises(CheckpointError, match=re.escape(says)):
            read_checkpoint_config(path)  # what `kpt train --resume` reads first
    assert not weights.is_model_file(path)


@pytest.mark.parametrize("case", ["zero_pt", "bad_json", "ckpt_config_str"])
def test_cli_eval_of_a_bad_file_is_one_line(bad_files, case, capsys):
    path, says = bad_files[case]
    assert main(["eval", "mnist", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and says in err and "Traceback" not in err


def test_files_of_another_plugin_or_a_bare_backbone_are_refused(run, tmp_path, capsys):
    for path in (run, run / "last.pt", run / "weights.safetensors"):
        with pytest.raises(CheckpointError, match="written by plugin 'tiny', not 'mnist'"):
            weights.read_run_state(path, "mnist")
    with pytest.raises(CheckpointError, match=r"last.pt was written by plugin 'tiny', not 'mnist'"):
        read_checkpoint_config(run / "last.pt", "mnist")
    # `kpt eval gait` / `kpt train mnist --resume` on a tiny run: a message, not a config-key error
    assert main(["eval", "gait", str(run)]) == 2
    assert "written by plugin 'tiny', not 'gait'" in capsys.readouterr().err
    assert main(["train", "mnist", "--resume", str(run / "last.pt"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "written by plugin 'tiny', not 'mnist'" in err and "unknown config key" not in err

    bare = save_model(_vit(), tmp_path / "vit.safetensors")
    with pytest.raises(CheckpointError, match=r"vit.safetensors holds a bare 'vit' backbone"):
        weights.read_run_state(bare, "gait")


def test_resume_checks_checkpoint_keys(run, tiny_installed, tmp_path):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt: the checkpoint lacks the key 'optimizer'"):
        load_checkpoint(tmp_path / "last.pt")
    from kpt.config import build_config

    with pytest.raises(CheckpointError, match="lacks the key 'optimizer'"):
        train(tiny.PLUGIN, build_config(tiny.PLUGIN), tmp_path / "b", resume=tmp_path / "last.pt")


# -- the atomic writer and its leftovers ----------------------------------------------------------------
def test_atomic_writes_leave_no_temporary_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"abc"))
    model = _vit()
    save_model(model, tmp_path / "m.safetensors")
    assert synced  # bare models are fsync'ed like run files now
    save_model(model, tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "m.pt", "m.safetensors"]
    assert (tmp_path / "a.bin").read_bytes() == b"abc"

    def broken_save(obj, fh):  # a full disk half-way through the write
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(_vit(), tmp_path / "m.pt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "m.pt", "m.safetensors"]
    assert torch.equal(_outputs(kpt.load_model(tmp_path / "m.pt")), _outputs(model))


@pytest.mark.skipif(os.name != "posix", reason="the pid liveness probe is POSIX only")
def test_stale_temp_files_are_those_of_dead_writers(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)
    stale = tmp_path / f".weights.safetensors.tmp-{dead}"
    live = tmp_path / f".last.pt.tmp-{os.getpid()}"
    other = tmp_path / f"notes.tmp-{dead}"  # not a name atomic_write makes
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert stale_temp_files(tmp_path) == [stale]
    assert stale_temp_files(tmp_path / "missing") == []
    # a write of that file removes its dead writer's leftover, and only that
    save_model(_vit(), tmp_path / "weights.safetensors")
    assert not stale.exists() and live.exists() and other.exists()


@pytest.mark.skipif(os.name != "posix", reason="the pid liveness probe is POSIX only")
def test_stale_temp_files_of_owned_names_include_the_older_forms_when_the_lock_is_held(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead, mine = int(proc.stdout), os.getpid()
    names = {n: tmp_path / n for n in (
        f".last.pt.tmp-{dead}", "weights.safetensors.tmp", f"best.pt.tmp-{dead}",
        f".last.pt.tmp-{mine}", ".last.pt.tmp-1", f".notes.txt.tmp-{dead}", "notes.tmp")}
    for path in names.values():
        path.write_bytes(b"partial")
    owned = {"last.pt", "best.pt", "weights.safetensors"}.__contains__
    # without the lock: only dead pids, of owned names, in any form
    assert [p.name for p in stale_temp_files(tmp_path, owned)] == [
        f".last.pt.tmp-{dead}", f"best.pt.tmp-{dead}"]
    # with it: also no pid and this process's own; never a live writer's or a name not owned
    assert [p.name for p in stale_temp_files(tmp_path, owned, lock_held=True)] == sorted([
        f".last.pt.tmp-{dead}", f".last.pt.tmp-{mine}", f"best.pt.tmp-{dead}",
        "weights.safetensors.tmp"])
    # atomic_write's own form only when no names are given
    assert [p.name for p in stale_temp_files(tmp_path)] == sorted([
        f".last.pt.tmp-{dead}", f".notes.txt.tmp-{dead}"])
