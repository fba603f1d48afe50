"""Foreign face weights in `kpt eval face` / `kpt predict face`: ONNX recognisers (also graphs
with initializers listed as inputs or a dangling input) and insightface / AdaFace IResNets."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from kpt.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class TinyRecognizer(nn.Module):
    """112×112 RGB → 8-d embedding, small enough to export and run in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=8, padding=2)
        self.fc = nn.Linear(4 * 14 * 14, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _export(model: nn.Module, path, batch: int = 2, dynamic: bool = True, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(batch, 3, 112, 112),), str(path),
                          input_names=["data"], output_names=["embedding"], opset_version=17,
                          dynamic_axes={"data": {0: "batch"}} if dynamic else None,
                          dynamo=False, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyRecognizer().eval()
    root = tmp_path_factory.mktemp("onnx")
    _export(model, root / "plain.onnx")
    return model, root


def _pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 112, 112), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8).float()


def _plugin_input(pixels: torch.Tensor) -> torch.Tensor:
    return pixels / 127.5 - 1.0  # what the face plugin feeds backbones: (x/255 − 0.5)/0.5


@pytest.mark.parametrize(("mean", "std"), [(127.5, 127.5), (0.0, 1.0), (104.0, 58.0)])
def test_normalisation_options_feed_the_model_as_configured(tiny, mean, std):
    from kpt_plugins.face.onnx_recognizer import OnnxRecognizer

    model, root = tiny
    rec = OnnxRecognizer(root / "plain.onnx", input_mean=mean, input_std=std)
    pixels = _pixels()
    got = rec(_plugin_input(pixels), torch.rand(3, 5, 2))
    with torch.no_grad():
        expected = model((pixels - mean) / std)
    assert got.shape == (3, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_default_normalisation_is_insightface(tiny):
    from kpt_plugins.face.onnx_recognizer import OnnxRecognizer

    model, root = tiny
    pixels = _pixels(2, seed=1)
    default = OnnxRecognizer(root / "plain.onnx")(_plugin_input(pixels))
    raw = OnnxRecognizer(root / "plain.onnx", 0.0, 1.0)(_plugin_input(pixels))
    with torch.no_grad():
        torch.testing.assert_close(default, model((pixels - 127.5) / 127.5), rtol=1e-4,
                                   atol=1e-4)
    assert (default - raw).abs().max() > 1e-2  # the option reaches the model


def test_initializers_listed_as_inputs(tiny, tmp_path):
    from kpt_plugins.face.onnx_recognizer import OnnxRecognizer

    model, _ = tiny
    path = tmp_path / "init_inputs.onnx"
    _export(model, path, keep_initializers_as_inputs=True)
    listed = [i.name for i in onnx.load(str(path)).graph.input]
    assert len(listed) > 1  # the export really lists the weights as inputs
    rec = OnnxRecognizer(path)
    assert rec.input_name == "data"
    pixels = _pixels(2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(rec(_plugin_input(pixels)), model((pixels - 127.5) / 127.5),
                                   rtol=1e-4, atol=1e-4)


def test_dangling_input_is_stripped(tiny, tmp_path):
    from kpt_plugins.face.onnx_recognizer import OnnxRecognizer

    model, root = tiny
    proto = onnx.load(str(root / "plain.onnx"))
    proto.graph.input.insert(0, onnx.helper.make_tensor_value_info(
        "unused_scale", onnx.TensorProto.FLOAT, [1]))
    path = tmp_path / "dangling.onnx"
    onnx.save(proto, str(path))
    x = _plugin_input(_pixels(2, seed=3))
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="unused_scale"):  # onnxruntime alone refuses it
        plain.run(None, {"data": x.numpy()})
    rec = OnnxRecognizer(path)
    assert rec.input_name == "data"
    with torch.no_grad():
        torch.testing.assert_close(rec(x), model(x), rtol=1e-4, atol=1e-4)


def test_fixed_batch_of_one_and_other_input_size(tmp_path):
    from kpt_plugins.face.onnx_recognizer import OnnxRecognizer

    torch.manual_seed(1)
    model = TinyRecognizer().eval()
    path = tmp_path / "batch1.onnx"
    _export(model, path, batch=1, dynamic=False)
    rec = OnnxRecognizer(path)
    x = _plugin_input(_pixels(3, seed=4))
    with torch.no_grad():
        torch.testing.assert_close(rec(x), model(x), rtol=1e-4, atol=1e-4)
        # a 224×224 crop is resized to the graph's fixed 112×112
        big = nn.functional.interpolate(x, size=224, mode="nearest")
        assert rec(big).shape == (3, 8)


def test_graph_with_two_read_inputs_is_a_clear_error(tmp_path):
    from kpt_plugins.face.onnx_recognizer import OnnxModelError, OnnxRecognizer

    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x.flatten(1)[:, :4] + y

    path = tmp_path / "two.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TwoInputs(), (torch.randn(1, 3, 112, 112), torch.randn(1, 4)),
                          str(path), input_names=["data", "extra"], dynamo=False)
    with pytest.raises(OnnxModelError, match=r"two.onnx.*2 inputs.*extra"):
        OnnxRecognizer(path)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(OnnxModelError, match="junk.onnx"):
        OnnxRecognizer(tmp_path / "junk.onnx")


def test_missing_onnxruntime_is_a_clear_message(tiny, monkeypatch):
    import builtins

    from kpt_plugins.face.onnx_recognizer import OnnxRecognizer

    from kpt.errors import UserError

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(UserError, match=r"pip install 'kpt\[onnx\]'"):
        OnnxRecognizer(tiny[1] / "plain.onnx")


# ------------------------------------------------------------------------------------ CLI
_EVAL = ["eval.synthetic_pairs=20", "eval.protocols=[aligned]", "eval.flip=false",
         "data.num_identities=4", "data.images_per_identity=2"]


def test_eval_face_with_onnx_weights(tiny, tmp_path):
    _, root = tiny
    out = tmp_path / "metrics.json"
    weights = str(root / "plain.onnx")
    assert main(["eval", "face", "--weights", weights, *_EVAL, "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["aligned_accuracy"] <= 100.0
    # the normalisation options reach the model: raw pixels give other embeddings
    out3 = tmp_path / "metrics3.json"
    assert main(["eval", "face", "--weights", weights, *_EVAL, "eval.input_mean=0",
                 "eval.input_std=1", "--json", str(out3)]) == 0
    assert json.loads(out3.read_text())["synthetic-aligned/threshold"] != \
        metrics["synthetic-aligned/threshold"]


def test_eval_weights_given_twice_or_not_at_all(tiny, capsys):
    weights = str(tiny[1] / "plain.onnx")
    assert main(["eval", "face", weights, "--weights", weights]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["eval", "face", *_EVAL]) == 2
    assert "--weights" in capsys.readouterr().err


def test_predict_face_with_onnx_weights(tiny, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    face = skimage_data.astronaut()
    Image.fromarray(face).save(tmp_path / "a.png")
    Image.fromarray(np.ascontiguousarray(face[:, ::-1])).save(tmp_path / "b.png")
    args = ["predict", "face", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
            "--weights", str(tiny[1] / "plain.onnx"), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert -1.0 <= result["similarity"] <= 1.0 and result["weights"].endswith("plain.onnx")
    assert main([*args, "--input-mean", "0", "--input-std", "1"]) == 0
    raw = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert raw["similarity"] != pytest.approx(result["similarity"], abs=1e-6)


# ------------------------------------------------------------------ insightface / AdaFace IResNet
_LAYERS = (2, 1, 2, 1)  # not a named depth: the depth must come from the keys


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and shifts, so that a wrong mapping cannot hide."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                if mod.affine:
                    mod.bias.normal_(0, 0.2)
    return model.eval()


def _reference_iresnet() -> nn.Module:
    """A small kpt IResNet (arcface_torch's module names) with random BatchNorm statistics."""
    from kpt_plugins.face.iresnet import iresnet18

    torch.manual_seed(3)
    return _randomise_batchnorm(iresnet18(layers=_LAYERS, widths=(8, 16, 24, 32),
                                          num_classes=16, img_size=112))


class _AdaFaceBlock(nn.Module):
    """The structure of AdaFace net.py ``BasicBlockIR`` (its module names come from it)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.shortcut_layer = nn.MaxPool2d(1, stride) if c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.PReLU(c_out), nn.Conv2d(c_out, c_out, 3, stride, 1,
                                                              bias=False),
            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class _AdaFaceIR(nn.Module):
    """The structure of AdaFace net.py ``Backbone`` (IR, 112×112): BGR input in [−1, 1]."""

    def __init__(self, widths=(8, 16, 24, 32), dim: int = 16) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        blocks, c_in = [], widths[0]
        for n, c_out in zip(_LAYERS, widths):
            blocks += [_AdaFaceBlock(c_in, c_out, 2)] + [_AdaFaceBlock(c_out, c_out, 1)
                                                         for _ in range(n - 1)]
            c_in = c_out
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(c_in), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(c_in * 7 * 7, dim),
                                          nn.BatchNorm1d(dim, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def test_arcface_torch_and_adaface_files_load_into_equal_models(tmp_path):
    from kpt_plugins.face.iresnet_weights import load_iresnet_weights

    ref = _reference_iresnet()
    torch.manual_seed(4)
    ada = _randomise_batchnorm(_AdaFaceIR())
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "backbone.pth")
    state = {f"model.{k}": v for k, v in ada.state_dict().items()}
    state["head.kernel"] = torch.randn(16, 7)  # AdaFace's margin head: not part of the backbone
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120}, tmp_path / "adaface.ckpt")
    x = torch.randn(2, 3, 112, 112)  # RGB, as kpt feeds its models
    with torch.no_grad():
        for name, expected in (("backbone.pth", ref(x)), ("adaface.ckpt", ada(x.flip(1)))):
            model = load_iresnet_weights(tmp_path / name)
            assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == list(_LAYERS)
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        # the BGR → RGB flip matters: the AdaFace model on RGB is another function
        assert (ada(x) - ada(x.flip(1))).abs().max() > 1e-3


def test_eval_takes_insightface_weights(tmp_path, capsys):
    ref = _reference_iresnet()
    torch.save(ref.state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "m.json"
    assert main(["eval", "face", "--weights", str(tmp_path / "backbone.pth"), *_EVAL,
                 "--json", str(out)]) == 0
    assert 0.0 <= json.loads(out.read_text())["aligned_accuracy"] <= 100.0
    from kpt_plugins.face.predict import load_face_backbone  # what `kpt predict face` loads

    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(load_face_backbone(tmp_path / "backbone.pth")(x), ref(x),
                                   rtol=1e-4, atol=1e-4)


def test_unknown_weights_layout_names_the_file(tmp_path, capsys):
    import argparse

    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    assert main(["eval", "face", "--weights", str(tmp_path / "other.pth"), *_EVAL]) == 2
    err = capsys.readouterr().err
    assert "other.pth" in err and "unknown weights layout" in err and "AdaFace" in err
    torch.save({"state_dict": {}, "hparams": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    assert main(["eval", "face", "--weights", str(tmp_path / "pickled.ckpt"), *_EVAL]) == 2
    err = capsys.readouterr().err
    assert "pickled.ckpt" in err and "weights_only=True" in err


# ------------------------------------------------------------- the core hook (any plugin)
def test_core_eval_routes_other_files_to_plugin_load_weights(tmp_path, monkeypatch, capsys):
    import dataclasses

    import tiny_plugin as tiny

    foreign = tmp_path / "model.foreign"
    foreign.write_bytes(b"weights of another framework")
    tiny.register_in_process(monkeypatch)
    assert main(["eval", "tiny", "--weights", str(foreign)]) == 2  # no hook: kpt's own error
    assert "not a kpt weights file" in capsys.readouterr().err

    seen = []

    def load_weights(path, cfg):
        seen.append((path.name, cfg.model.hidden))
        return None if path.suffix == ".declined" else tiny.build_model(cfg, {})

    monkeypatch.setattr(tiny, "PLUGIN", dataclasses.replace(tiny.PLUGIN, load_weights=load_weights))
    tiny.register_in_process(monkeypatch)
    out = tmp_path / "m.json"
    assert main(["eval", "tiny", "--weights", str(foreign), "model.hidden=8", "--json",
                 str(out)]) == 0
    assert seen == [("model.foreign", 8)] and "accuracy" in json.loads(out.read_text())
    declined = tmp_path / "model.declined"
    declined.write_bytes(b"x")
    assert main(["eval", "tiny", str(declined)]) == 2  # the hook declines: kpt's error again
    assert "not a kpt weights file" in capsys.readouterr().err


def test_embed_face_passes_input_normalisation_to_onnx(tiny, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "a.png")
    args = ["embed", "face", str(tmp_path / "a.png"), "--weights", str(tiny[1] / "plain.onnx")]
    assert main([*args, "--out", str(tmp_path / "default.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "raw.npz"), "--input-mean", "0",
                 "--input-std", "1"]) == 0
    capsys.readouterr()
    default = np.load(tmp_path / "default.npz")["embeddings"]
    raw = np.load(tmp_path / "raw.npz")["embeddings"]
    assert default.shape == raw.shape and not np.allclose(default, raw, atol=1e-4)
