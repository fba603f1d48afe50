"""Run folders are never overwritten or shared: unique default names, refusal of a folder that holds a
run (unless --resume / --overwrite), a lock against a second writer, stale temporary files cleaned, and a
resume that survives a torn last line of metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest
import tiny_plugin as tiny
import torch

from kpt.cli import main
from kpt.config import build_config
from kpt.engine import run_dir
from kpt.engine.progress import MetricsLog
from kpt.engine.run_dir import LOCK_NAME, RunDirError, RunLock, new_run_dir
from kpt.engine.trainer import default_run_dir, train
from kpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MNIST_TINY = ["--data", "synthetic", "model.depth=1", "model.embed_dim=16", "model.num_heads=2",
              "model.stem_channels=4", "data.synthetic_train=64", "data.synthetic_test=32",
              "train.batch_size=32", "train.warmup_epochs=0", "eval.batch_size=64"]
RUN_OUTPUTS = ("best.pt", "last.pt", "metrics.jsonl", "config.yaml", "summary.json",
               "weights.safetensors")


class _FrozenClock(datetime):
    """datetime whose now() is always the same second: forces the same-second collision."""

    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(*overrides):
    return build_config(tiny.PLUGIN, overrides=list(overrides))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- unique default names --------------------------------------------------------------------------------
def test_default_run_dirs_in_the_same_second_differ_and_sort_by_time(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "datetime", _FrozenClock)
    made = [default_run_dir("tiny", tmp_path) for _ in range(3)]
    assert len(set(made)) == 3 and all(p.is_dir() for p in made)
    assert [p.name for p in made] == ["20260102-030405", "20260102-030405-02", "20260102-030405-03"]
    assert sorted(made) == made  # creation order == name order: the newest run sorts last
    assert str(made[-1].name) < "20260102-030406"  # and before any run of the next second


def test_default_run_dirs_of_two_processes_in_the_same_second_differ(tmp_path):
    script = textwrap.dedent(f"""
        import datetime, sys
        sys.path.insert(0, {str(REPO)!r})
        from kpt.engine import run_dir
        class Frozen(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return cls(2026, 1, 2, 3, 4, 5)
        run_dir.datetime = Frozen
        for _ in range(10):
            print(run_dir.new_run_dir({str(tmp_path)!r}), flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    names = [line for p in procs for line in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert len(names) == 20 and len(set(names)) == 20
    assert len(list(tmp_path.iterdir())) == 20


# -- an --out that holds a run -----------------------------------------------------------------------
def test_second_train_on_a_finished_run_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "mnist", *MNIST_TINY, "train.max_steps=2", "--out", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in RUN_OUTPUTS}
    capsys.readouterr()
    assert main(["train", "mnist", *MNIST_TINY, "train.max_steps=3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kpt: error: ") and len(err.strip().splitlines()) == 1
    assert str(out) in err and "already holds a run" in err
    assert "--resume" in err and "--overwrite" in err
    assert {name: (out / name).read_bytes() for name in RUN_OUTPUTS} == before
    assert not (out / LOCK_NAME).exists()  # the refusing process let go of the lock


def test_overwrite_replaces_the_run_without_old_metrics(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "mnist", *MNIST_TINY, "train.max_steps=3", "train.log_every=1",
                 "--out", str(out)]) == 0
    assert max(r["step"] for r in _records(out / "metrics.jsonl")) == 3
    assert main(["train", "mnist", *MNIST_TINY, "train.max_steps=1", "train.log_every=1",
                 "--out", str(out), "--overwrite"]) == 0
    records = _records(out / "metrics.jsonl")
    assert {r["step"] for r in records} == {1}  # nothing of the replaced 3-step run
    assert [(r["type"], r["step"]) for r in records] == [("train", 1), ("eval", 1)]
    assert json.loads((out / "summary.json").read_text())["step"] == 1
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1


def test_resume_of_a_finished_run_still_works(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "mnist", *MNIST_TINY, "train.max_steps=2", "train.log_every=1",
                 "--out", str(out)]) == 0
    assert main(["train", "mnist", "train.max_steps=3", "--out", str(out), "--resume", "auto"]) == 0
    steps = [(r["type"], r["step"]) for r in _records(out / "metrics.jsonl")]
    assert ("train", 3) in steps and len(steps) == len(set(steps))
    assert json.loads((out / "summary.json").read_text())["step"] == 3


def test_refusal_is_a_user_error_naming_the_folder(tmp_path):
    train(tiny.PLUGIN, _cfg("train.max_steps=1"), tmp_path / "a")
    with pytest.raises(UserError, match=r"a already holds a run .*--overwrite"):
        train(tiny.PLUGIN, _cfg("train.max_steps=1"), tmp_path / "a")
    with pytest.raises(UserError, match="contradict"):
        train(tiny.PLUGIN, _cfg("train.max_steps=1"), tmp_path / "a",
              resume=tmp_path / "a" / "last.pt", overwrite=True)


# -- the lock --------------------------------------------------------------------------------------------
def test_a_lock_held_in_this_process_stops_a_second_writer_at_once(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunDirError, match=rf"in use by another kpt process \(pid {os.getpid()}\b"):
            train(tiny.PLUGIN, _cfg("train.max_steps=1"), out)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written
    assert not (out / LOCK_NAME).exists()
    train(tiny.PLUGIN, _cfg("train.max_steps=1"), out)  # free again
    assert not (out / LOCK_NAME).exists()  # released at the end of the run


def test_a_lock_held_by_another_live_process_names_its_pid(tmp_path, capsys):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from kpt.engine.run_dir import RunLock
        lock = RunLock({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "mnist", *MNIST_TINY, "train.max_steps=1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and str(out) in err
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_an_exited_process_is_taken_over(tmp_path, kpt_log):
    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "somewhere"}) + "\n")
    train(tiny.PLUGIN, _cfg("train.max_steps=1"), out)
    assert (out / "last.pt").is_file() and not (out / LOCK_NAME).exists()
    assert any(f"pid {pid}" in r.getMessage() and "taking over" in r.getMessage()
               for r in kpt_log.records)


# -- stale temporary files -------------------------------------------------------------------------------
def test_stale_temporary_files_are_cleaned_at_run_start(tmp_path):
    out = tmp_path / "run"
    train(tiny.PLUGIN, _cfg("train.max_steps=2"), out)
    dead = _dead_pid()
    stale = [f".last.pt.tmp-{dead}", f".best.pt.tmp-{dead}", f".weights.safetensors.tmp-{dead}",
             "weights.safetensors.tmp", f".last.step2.rank0.pt.tmp-{dead}"]
    for name in stale:
        (out / name).write_bytes(b"torn")
    (out / "notes.tmp").write_text("not ours")  # a user's file is left alone
    train(tiny.PLUGIN, _cfg("train.max_steps=3"), out, resume=out / "last.pt")
    left = {p.name for p in out.iterdir()}
    assert not left & set(stale)
    assert "notes.tmp" in left


def test_temporary_file_of_a_live_writer_is_kept(tmp_path):
    (tmp_path / ".last.pt.tmp-1").write_bytes(b"x")  # pid 1 always lives
    (tmp_path / f".last.pt.tmp-{_dead_pid()}").write_bytes(b"x")
    assert [p.name for p in run_dir.clean_stale_tmp(tmp_path)] != []
    assert [p.name for p in tmp_path.iterdir()] == [".last.pt.tmp-1"]


# -- torn metrics line -----------------------------------------------------------------------------------
def test_resume_ignores_a_torn_last_metrics_line_and_reports_it(tmp_path, kpt_log):
    out = tmp_path / "run"
    train(tiny.PLUGIN, _cfg("train.max_steps=2"), out)
    metrics = out / "metrics.jsonl"
    n_lines = len(metrics.read_text().splitlines())
    with open(metrics, "a") as fh:  # a kill in the middle of an append
        fh.write('{"type": "train", "step": 3, "loss": 0.69')
    train(tiny.PLUGIN, _cfg("train.max_steps=4"), out, resume=out / "last.pt")
    records = _records(metrics)  # every line parses: the torn one is gone
    steps = [(r["type"], r["step"]) for r in records]
    assert len(steps) == len(set(steps)) and ("train", 4) in steps
    warned = [r.getMessage() for r in kpt_log.records if r.levelno == logging.WARNING
              and "metrics.jsonl" in r.getMessage()]
    assert len(warned) == 1 and f"line {n_lines + 1}" in warned[0] and str(metrics) in warned[0]


def test_truncate_after_drops_invalid_lines_once(tmp_path, kpt_log):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    MetricsLog(path).truncate_after(2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    MetricsLog(path).write({"step": 3})
    assert _records(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert sum("line 4" in r.getMessage() for r in kpt_log.records) == 1


def test_new_run_dir_is_created_under_its_parent(tmp_path):
    path = new_run_dir(tmp_path / "a" / "b")
    assert path.parent == tmp_path / "a" / "b" and path.is_dir() and not any(path.iterdir())


def test_lock_on_a_file_system_without_flock_warns_and_runs(tmp_path, monkeypatch, kpt_log):
    import errno
    import types

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir, "fcntl", types.SimpleNamespace(flock=no_flock, LOCK_EX=2, LOCK_NB=4))
    with RunLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any("cannot lock" in r.getMessage() for r in kpt_log.records)
