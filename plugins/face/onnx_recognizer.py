"""Any ONNX face recogniser as a kpt face backbone: ``kpt eval face --weights model.onnx``.

:class:`OnnxRecognizer` is called like every kpt face backbone, ``model(images, keypoints)`` with
images (B, 3, H, W) RGB in [−1, 1] (the face plugin's ``(x/255 − 0.5)/0.5``), and returns the
graph's first output as the embedding (B, D). The keypoints are not passed on: they already did
their work when the faces were aligned to the ArcFace 112×112 template. The pixels are converted
back to 0–255 and normalised as the model expects, ``(x − input_mean) / input_std`` in pixel
units (``eval.input_mean`` / ``eval.input_std``; insightface's 127.5 / 127.5 by default, 0 / 1 for
models fed raw pixels), resized to the graph's input size when it is fixed and different, and
run one image at a time when the graph fixes the batch at 1.

Older and quantised exports often list graph inputs besides the image: initializers repeated as
inputs (ONNX IR < 4 required it) or inputs that no node reads. onnxruntime insists on being fed
every input that is not an initializer, so :func:`clean_graph` drops the unread ones (and, from
IR 4 on, the initializers listed as inputs) before the session is made; what is left must be one
image input.

onnxruntime is the ``onnx`` extra (``pip install 'kpt[onnx]'``); the ``onnx`` package that edits
the graph is a dependency of kpt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kpt.errors import UserError

__all__ = ["OnnxModelError", "OnnxRecognizer", "clean_graph", "load_onnx_recognizer"]

logger = logging.getLogger(__name__)

#: insightface's normalisation of its recognisers, in pixel units: (x − 127.5) / 127.5
DEFAULT_MEAN = 127.5
DEFAULT_STD = 127.5


class OnnxModelError(UserError, ValueError):
    """An ONNX file that kpt cannot run as a face recogniser (names the file and the reason)."""


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError("ONNX recognisers run with onnxruntime, which is not installed; install "
                        "it with `pip install 'kpt[onnx]'` (or `pip install onnxruntime`)") from exc
    return onnxruntime


def _graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph of its nodes (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _read_names(graph: Any) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs reads, and the graph outputs."""
    names = {out.name for out in graph.output}
    for g in _graphs(graph):
        for node in g.node:
            names.update(name for name in node.input if name)
    return names


def clean_graph(model: Any, source: str = "model") -> tuple[Any, str]:
    """Drop the graph inputs that are not the image, so that onnxruntime can run on the image alone.

    Removes inputs that no node reads (dangling) and, for IR version ≥ 4, inputs that are also
    initializers (their stored values stay; IR < 4 must keep them listed, and onnxruntime then
    treats them as constants).

    Args:
        model: an ``onnx.ModelProto``; edited in place.
        source: file name for messages.

    Returns:
        (the model, name of its image input).

    Raises:
        OnnxModelError: no input, or several inputs that nodes read besides the initializers.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    read = _read_names(graph)
    drop = [v.name for v in graph.input
            if v.name not in read or (v.name in initializers and model.ir_version >= 4)]
    keep = [(v.name, _shape_of(v)) for v in graph.input
            if v.name in read and v.name not in initializers]
    if drop:
        for i in reversed(range(len(graph.input))):  # in place: the kept inputs keep their order
            if graph.input[i].name in drop:
                del graph.input[i]
        logger.info("%s: dropped %d graph inputs that are not the image (%s)", source, len(drop),
                    ", ".join(drop[:5]) + (" ..." if len(drop) > 5 else ""))
    if not keep:
        raise OnnxModelError(f"{source}: the graph has no input left besides its initializers; "
                             f"expected one image input (B, 3, 112, 112)")
    if len(keep) > 1:
        desc = ", ".join(f"{name} {shape}" for name, shape in keep)
        raise OnnxModelError(f"{source}: the graph reads {len(keep)} inputs ({desc}); kpt feeds "
                             f"a face recogniser one image input (B, 3, 112, 112)")
    return model, keep[0][0]


def _shape_of(value: Any) -> list[int | str]:
    """The declared shape of a graph input: ints, or names / '?' for free dimensions."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


class OnnxRecognizer(nn.Module):
    """An ONNX face recogniser run by onnxruntime, called like a kpt face backbone.

    Args:
        path: the ``.onnx`` file.
        input_mean: subtracted from the 0–255 pixels (per model: insightface 127.5; 0 for raw).
        input_std: the pixels are divided by this after the mean (insightface 127.5; 1 for raw).
        providers: onnxruntime execution providers (default: CUDA when available, then CPU).

    Raises:
        OnnxModelError: unreadable file, or a graph without exactly one image input.
        UserError: onnxruntime is not installed.
    """

    def __init__(self, path: str | Path, input_mean: float = DEFAULT_MEAN,
                 input_std: float = DEFAULT_STD, providers: list[str] | None = None) -> None:
        super().__init__()
        ort = _import_onnxruntime()
        import onnx

        self.path = Path(path)
        if input_std == 0:
            raise OnnxModelError(f"{self.path}: eval.input_std is 0; expected the pixel scale the "
                                 f"model was trained with (insightface 127.5, raw pixels 1)")
        self.input_mean, self.input_std = float(input_mean), float(input_std)
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: no such ONNX file")
        try:
            proto = onnx.load(str(self.path))
        except Exception as exc:  # onnx raises DecodeError and others for a foreign file
            raise OnnxModelError(f"{self.path}: not a readable ONNX model ({type(exc).__name__}: "
                                 f"{exc})") from exc
        proto, self.input_name = clean_graph(proto, str(self.path))
        image = next(v for v in proto.graph.input if v.name == self.input_name)
        shape = _shape_of(image)
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise OnnxModelError(f"{self.path}: image input {self.input_name!r} has shape "
                                 f"{shape}; expected (B, 3, H, W)")
        self.input_shape = shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.size = (shape[2], shape[3]) if all(isinstance(s, int) and s > 0
                                                for s in shape[2:]) else None
        elem = image.type.tensor_type.elem_type
        self.dtype = np.float16 if elem == onnx.TensorProto.FLOAT16 else (
            np.float64 if elem == onnx.TensorProto.DOUBLE else np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in available] or available
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), options,
                                                providers=providers)
        except Exception as exc:  # onnxruntime's errors have no common base class
            raise OnnxModelError(f"{self.path}: onnxruntime cannot load the graph "
                                 f"({type(exc).__name__}: {exc})") from exc
        logger.info("ONNX recogniser %s: input %s %s, normalisation (x − %g) / %g", self.path,
                    self.input_name, shape, self.input_mean, self.input_std)

    @property
    def uses_keypoints(self) -> bool:
        """The keypoints only align the faces before the model sees them."""
        return False

    def model_input(self, images: Tensor) -> np.ndarray:
        """images (B, 3, H, W) in [−1, 1] → what the graph is fed: (B, 3, h, w) in its dtype."""
        x = images.detach().float().cpu()
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        pixels = x * 127.5 + 127.5  # back to 0–255 (the plugin feeds (x/255 − 0.5)/0.5)
        return ((pixels - self.input_mean) / self.input_std).numpy().astype(self.dtype)

    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """images (B, 3, H, W) RGB in [−1, 1], keypoints ignored → embeddings (B, D) float32."""
        x = self.model_input(images)
        step = self.fixed_batch or len(x)
        outputs = [self.session.run(None, {self.input_name: x[i:i + step]})[0]
                   for i in range(0, len(x), step)]
        emb = torch.from_numpy(np.concatenate(outputs).astype(np.float32))
        return emb.reshape(len(x), -1).to(images.device)


def load_onnx_recognizer(path: str | Path, cfg: Any = None) -> OnnxRecognizer:
    """:class:`OnnxRecognizer` for ``path`` with ``cfg.eval.input_mean`` / ``input_std`` when the
    config has them (the face plugin's), else insightface's 127.5 / 127.5."""
    ev = getattr(cfg, "eval", None)
    return OnnxRecognizer(path, float(getattr(ev, "input_mean", DEFAULT_MEAN)),
                          float(getattr(ev, "input_std", DEFAULT_STD)))
