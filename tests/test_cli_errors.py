"""Errors caused by the user's files or settings: exit status 2 and one ``kpt: error:`` line.

Every case calls ``kpt.cli.main`` in-process and checks that stderr holds exactly one error line
naming the key or file at fault, and no traceback; ``--debug`` re-raises instead.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tiny_plugin as tiny
import torch

from kpt.cli import CliError, main
from kpt.config import ConfigError
from kpt.convert import ConversionError
from kpt.data.safe_pickle import (
    NUMPY_ARRAY_GLOBALS,
    InvalidPickleError,
    UnsafePickleError,
    restricted_load,
)
from kpt.data.samplers import PKBatchSampler
from kpt.errors import DataError, UserError

torch.set_num_threads(1)


@pytest.fixture
def tiny_installed(monkeypatch):
    tiny.register_in_process(monkeypatch)


def one_error_line(capsys) -> str:
    """The single ``kpt: error:`` line on stderr (asserts there is exactly one and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("kpt: error:")]
    assert len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0]
    return lines[0]


def test_user_error_classes():
    for cls in (CliError, ConfigError, ConversionError, UnsafePickleError, InvalidPickleError):
        assert issubclass(cls, UserError)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)
    assert issubclass(InvalidPickleError, pickle.UnpicklingError)
    assert issubclass(ConfigError, ValueError) and issubclass(ConversionError, ValueError)


@pytest.mark.parametrize("domain", ["mnist", "face"])
def test_bad_choice_is_refused_by_print_config(domain, capsys):
    assert main(["train", domain, "--print-config", "model.pos=kprp"]) == 2
    line = one_error_line(capsys)
    assert "model.pos='kprp'" in line and "did you mean 'kprpe'" in line.lower()


@pytest.mark.parametrize("override, key", [
    ("train.amp=fp61", "train.amp"),
    ("train.sched=cosin", "train.sched"),
    ("train.optimizer=adamx", "train.optimizer"),
    ("model.kprpe_variant=rel_split", "model.kprpe_variant"),
    ("model.stem=convv", "model.stem"),
])
def test_enumerated_engine_and_plugin_keys(override, key, capsys):
    assert main(["train", "mnist", "--print-config", override]) == 2
    line = one_error_line(capsys)
    assert key in line and "did you mean" in line.lower()


def test_choices_of_list_values_and_numbers(capsys):
    assert main(["train", "face", "--print-config", "eval.protocols=[aligned,unalignd]"]) == 2
    assert "eval.protocols='unalignd'" in one_error_line(capsys)
    assert main(["train", "gait", "--print-config", "model.parts=14"]) == 2
    assert "model.parts=14" in one_error_line(capsys)
    assert main(["train", "gait", "--print-config", "model.pos=kprpe", "eval.metric=cosine"]) == 0


def test_defaults_of_every_builtin_plugin_pass_validation(capsys):
    for domain in ("mnist", "face", "gait"):
        assert main(["train", domain, "--print-config"]) == 0
    assert main(["train", "face", "--print-config", "recipe=step_sgd", "train.sched=Cosine"]) == 0
    assert main(["train", "face", "--print-config", "recipe=step_sdg"]) == 2
    assert "Did you mean 'step_sgd'" in one_error_line(capsys)


@pytest.mark.parametrize("overrides, key", [
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=-8"], "train.batch_size"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-1e-3"], "train.lr"),
    (["train.lr=nan"], "train.lr"),
    (["train.max_steps=-1"], "train.max_steps"),
    (["train.epochs=-2"], "train.epochs"),
    (["train.epochs=0", "train.max_steps=0"], "train.max_steps"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
])
def test_bad_numbers_are_refused_naming_the_key(tiny_installed, overrides, key, capsys):
    assert main(["train", "tiny", "--print-config", *overrides]) == 2
    assert key in one_error_line(capsys)


def test_debug_reraises(tiny_installed):
    with pytest.raises(ConfigError, match="train.lr"):
        main(["--debug", "train", "tiny", "--print-config", "train.lr=0"])
    with pytest.raises(ConfigError, match="kprpe"):
        main(["--debug", "train", "mnist", "--print-config", "model.pos=kprp"])


def test_flag_typos_get_a_suggestion(tiny_installed, capsys):
    assert main(["train", "tiny", "--tset", "blobs"]) == 2
    line = one_error_line(capsys)
    assert "--tset" in line and "Did you mean '--test'" in line
    assert main(["trian", "tiny"]) == 2
    assert "Did you mean 'train'" in one_error_line(capsys)
    assert main(["plugins", "--jsn"]) == 2
    assert "Did you mean '--json'" in one_error_line(capsys)
    assert main(["convert", "cvlfac", "a", "b"]) == 2
    assert "Did you mean 'cvlface'" in one_error_line(capsys)
    with pytest.raises(CliError, match="--tset"):
        main(["--debug", "train", "tiny", "--tset", "blobs"])


def test_dataset_smaller_than_one_batch(tiny_installed, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), "data.size=4", "train.batch_size=8",
                 "train.device=cpu"]) == 2
    line = one_error_line(capsys)
    assert "train.batch_size=8" in line and "4 items" in line


def test_fp16_on_cpu_says_what_works(tiny_installed, tmp_path, capsys):
    assert main(["train", "tiny", "--out", str(tmp_path / "run"), "train.amp=fp16",
                 "train.device=cpu"]) == 2
    line = one_error_line(capsys)
    assert "train.amp=fp16" in line and "train.amp=bf16" in line and "train.amp=none" in line


def test_pk_batch_with_fewer_identities_than_p(tmp_path, capsys):
    args = ["train", "gait", "--out", str(tmp_path / "run"), f"data.cache_dir={tmp_path / 'c'}",
            "data.synthetic_train_ids=2", "data.synthetic_test_ids=2", "data.synthetic_seqs=2",
            "data.synthetic_frames=12", "data.frames=8", "train.batch_size=16", "data.k=4",
            "train.device=cpu"]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "only 2 labels" in line and "train.batch_size" in line and "data.k" in line


def test_pk_sampler_raises_a_user_error():
    with pytest.raises(UserError, match="P=3 identities.*only 2 labels.*see keys"):
        PKBatchSampler([0, 0, 1, 1], p=3, k=2, hint=" see keys")
    with pytest.raises(UserError, match="multiple of the world size 2"):
        PKBatchSampler([0, 1, 2], p=3, k=1, world_size=2)


@pytest.mark.parametrize("name", ["notes.pt", "notes.safetensors", "empty.pt"])
def test_convert_a_file_that_is_not_a_checkpoint(name, tmp_path, capsys):
    src = tmp_path / name
    src.write_bytes(b"" if name.startswith("empty") else b"this is not a checkpoint\n")
    assert main(["convert", "cvlface", str(src), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert str(src) in line and "CVLface" in line
    assert not (tmp_path / "out.safetensors").exists()


def test_malicious_and_garbage_pickles_are_data_errors(tmp_path):
    with pytest.raises(UnsafePickleError, match="evil.pkl"):
        restricted_load(pickle.dumps(print), NUMPY_ARRAY_GLOBALS, "evil.pkl")
    with pytest.raises(InvalidPickleError, match="junk.pkl"):
        restricted_load(b"\x80\x04junk", NUMPY_ARRAY_GLOBALS, "junk.pkl")
    arr = np.arange(3)
    np.testing.assert_array_equal(restricted_load(pickle.dumps(arr), NUMPY_ARRAY_GLOBALS), arr)


def test_any_user_error_from_a_command_is_one_line(monkeypatch, capsys):
    import dataclasses

    def get(argv):
        raise DataError("records.bin: record 7: label -1 is negative")

    plugin = dataclasses.replace(tiny.PLUGIN, commands={"data get": get})
    monkeypatch.setattr(tiny, "PLUGIN", plugin)
    tiny.register_in_process(monkeypatch)
    assert main(["data", "get", "tiny"]) == 2
    assert "records.bin: record 7" in one_error_line(capsys)
    with pytest.raises(DataError):
        main(["--debug", "data", "get", "tiny"])


def test_predict_face_refuses_a_non_image(tmp_path):
    from kpt_plugins.face.predict import _read_image

    path = tmp_path / "photo.jpg"
    path.write_text("not an image")
    with pytest.raises(DataError, match="photo.jpg"):
        _read_image(path)
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # a JPEG header and nothing else
    with pytest.raises(DataError, match="photo.jpg"):
        _read_image(path)


def test_user_error_is_printed_by_rank_zero_only(monkeypatch, capsys):
    # torchrun: every rank meets the same bad input; one message, every rank exits 2
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "mnist", "--print-config", "model.pos=kprp"]) == 2
    assert "kpt: error:" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "mnist", "--print-config", "model.pos=kprp"]) == 2
    assert "model.pos='kprp'" in one_error_line(capsys)
