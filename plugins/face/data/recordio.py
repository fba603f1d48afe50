"""MXNet RecordIO (``.rec`` + ``.idx``) and insightface's ``train.rec`` layout, without mxnet.

Framing (``dmlc/recordio.h``, mxnet 1.x): every chunk is ``uint32 magic 0xCED7230A``,
``uint32 lrec = cflag << 29 | length``, ``length`` bytes, zero padding to 4 bytes. A payload that
contains the magic at a 4-aligned offset is split there (the 4 magic bytes dropped; cflag 1 = first,
2 = middle, 3 = last part); the reader puts the magic back. ``.idx`` is text, one
``"<key>\\t<offset>\\n"`` per record; insightface writes record 0 last, so offsets must be used.

IRHeader (``mxnet/recordio.py``): ``struct '<IfQQ'`` = (flag, label, id, id2), 24 bytes; when
``flag = k > 0`` the header label is ignored and ``k`` float32 labels follow; then the image bytes.

insightface layout (``rec_builder.py``): keys 1..N images (label = class id), keys N+1..N+K one
record per identity with label [first_key, end_key), key 0 with label [N+1, N+1+K]; ``property``
is ``"K,112,112"``.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from typing_extensions import Self

from kpt.errors import DataError

__all__ = [
    "MAGIC",
    "IRHeader",
    "InsightFaceRec",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "decode_image",
    "encode_image",
    "pack_record",
    "unpack_record",
    "write_insightface_rec",
]

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_HEADER = struct.Struct("<IfQQ")
_FLAG_LABEL = struct.Struct("<If")
_FLOAT = struct.Struct("<f")
_CHUNK = struct.Struct("<II")
_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", None)
_DECODE_FLAG = cv2.IMREAD_COLOR if _RGB_FLAG is None else _RGB_FLAG
# float32 holds integers exactly only up to 2**24: larger identity ranges are unreliable.
_FLOAT32_EXACT = 1 << 24


class RecordIOError(DataError, ValueError):
    """A malformed ``.rec``/``.idx``; the message names the file, the key/offset and the fault."""


@dataclass(frozen=True)
class IRHeader:
    """Image record header. ``label`` is a float, or a float32 array (then ``flag`` = its size)."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(header: IRHeader, payload: bytes = b"") -> bytes:
    """Header (+ label array) + payload, as ``mxnet.recordio.pack``."""
    if isinstance(header.label, (int, float, np.floating, np.integer)):
        return _HEADER.pack(0, float(header.label), header.id, header.id2) + payload
    label = np.asarray(header.label, dtype="<f4").ravel()
    return _HEADER.pack(label.size, 0.0, header.id, header.id2) + label.tobytes() + payload


def unpack_record(record: bytes, what: str = "record") -> tuple[IRHeader, bytes]:
    """Inverse of :func:`pack_record`: (header, payload)."""
    if len(record) < _HEADER.size:
        raise RecordIOError(f"{what}: {len(record)} bytes, shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = _HEADER.unpack_from(record)
    start = _HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if end > len(record):
            raise RecordIOError(f"{what}: IRHeader flag {flag} needs {4 * flag} label bytes")
        return IRHeader(flag, np.frombuffer(record, "<f4", flag, start), id_, id2), record[end:]
    return IRHeader(0, label, id_, id2), record[start:]


def encode_image(rgb: np.ndarray, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 RGB → JPEG bytes (encoded from BGR like ``pack_img``)."""
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("cv2.imencode failed")
    return buf.tobytes()


def decode_image(data: bytes | np.ndarray, what: str = "image") -> np.ndarray:
    """Encoded image bytes → (H, W, 3) uint8 RGB (as ``mx.image.imdecode``)."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    try:  # cv2 raises (not returns None) on an empty buffer: a zero-byte file
        if _RGB_FLAG is not None:  # OpenCV ≥ 4.10 decodes straight to RGB (pixel-identical)
            img = cv2.imdecode(buf, _RGB_FLAG)
        else:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            img = None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    except cv2.error:
        img = None
    if img is None:
        raise RecordIOError(f"{what}: the image bytes do not decode ({len(data)} bytes)")
    return img


class RecordIOWriter:
    """Write an indexed ``.rec`` + ``.idx`` pair (mxnet ``MXIndexedRecordIO`` format).

    Example::

        with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
            w.write(1, pack_record(IRHeader(0, 3.0, 1, 0), jpeg))
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec = open(self.rec_path, "wb")  # noqa: SIM115 (held until close())
        self._idx = open(self.idx_path, "w")  # noqa: SIM115 (held until close())

    def write(self, key: int, record: bytes) -> None:
        """Append one record and its index line."""
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        parts = []
        start = 0
        # split at every 4-aligned occurrence of the magic (dmlc RecordIOWriter::WriteRecord)
        for i in range(0, (len(record) >> 2) << 2, 4):
            if record[i : i + 4] == _MAGIC_BYTES:
                parts.append(record[start:i])
                start = i + 4
        parts.append(record[start:])
        for n, part in enumerate(parts):
            if len(parts) == 1:
                cflag = 0
            else:
                cflag = 1 if n == 0 else (3 if n == len(parts) - 1 else 2)
            if len(part) > _LEN_MASK:
                raise ValueError(f"{self.rec_path}: record {key} is larger than 2^29 bytes")
            self._rec.write(struct.pack("<II", MAGIC, (cflag << 29) | len(part)))
            self._rec.write(part)
            self._rec.write(b"\0" * ((4 - len(part) % 4) % 4))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_idx(idx_path: str | Path) -> dict[int, int]:
    """``.idx`` → {key: byte offset} in file order."""
    out: dict[int, int] = {}
    with open(idx_path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            try:
                out[int(fields[0])] = int(fields[1])
            except (IndexError, ValueError) as exc:
                raise RecordIOError(
                    f"{idx_path}:{line_no}: expected '<key>\\t<offset>', got {line[:60]!r}"
                ) from exc
    return out


class RecordIOReader:
    """Random access to an indexed ``.rec`` by key.

    Safe across DataLoader worker processes: the file is (re)opened lazily in each process.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {p}")
        self.offsets = read_idx(self.idx_path)
        self.file_size = self.rec_path.stat().st_size
        self._file = None
        self._map: mmap.mmap | None = None
        self._pid = -1

    @property
    def keys(self) -> list[int]:
        return list(self.offsets)

    def _handle(self):
        # reopen in a forked DataLoader worker: a shared file position would race
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb", buffering=0)  # noqa: SIM115 (held until close())
            self._pid = os.getpid()
            try:  # read-only memory map: a record read becomes a slice, no system call
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # empty file or no mmap support: seek + read
                self._map = None
        return self._file

    def read_at(self, offset: int, what: str | int = "record") -> bytes:
        """Reassemble the record starting at byte ``offset``.

        Fast path: an unsplit record (cflag 0, nearly all of them) is one slice of the memory
        map; anything else (split records, errors) takes the chunk-by-chunk path below.
        """
        f = self._handle()
        mm = self._map
        if mm is not None and offset + 8 <= len(mm):
            magic, lrec = _CHUNK.unpack_from(mm, offset)
            end = offset + 8 + (lrec & _LEN_MASK)
            if magic == MAGIC and lrec >> 29 == 0 and end <= len(mm):
                return mm[offset + 8 : end]
        f.seek(offset)
        what = f"key {what}" if isinstance(what, int) else what  # formatted only off the fast path
        parts = []
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise RecordIOError(f"{self.rec_path}: {what} at offset {offset}: truncated file")
            magic, lrec = _CHUNK.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: {what} at offset {offset}: bad magic 0x{magic:08X} "
                    f"(expected 0x{MAGIC:08X})"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = f.read((length + 3) & ~3)
            if len(data) < length:
                raise RecordIOError(f"{self.rec_path}: {what} at offset {offset}: truncated")
            if cflag == 0:
                return data[:length] if len(parts) == 0 else b"".join(parts) + data[:length]
            parts.append(data[:length])
            if cflag == 3:
                return b"".join(parts)
            parts.append(_MAGIC_BYTES)  # cflag 1 or 2: the writer dropped a magic here

    def locate(self, key: int) -> tuple[bytes | mmap.mmap, int, int]:
        """Where record ``key`` lies, without copying it: (buffer, start, end).

        For an unsplit record this is the memory map itself (``buffer[start:end]`` is the
        record); otherwise the reassembled bytes with (0, len).
        """
        try:
            offset = self.offsets[key]
        except KeyError:
            raise KeyError(f"{self.idx_path}: no record with key {key}") from None
        mm = self._map if self._pid == os.getpid() else None
        if mm is None:
            self._handle()
            mm = self._map
        if mm is not None and offset + 8 <= len(mm):
            magic, lrec = _CHUNK.unpack_from(mm, offset)
            end = offset + 8 + (lrec & _LEN_MASK)
            if magic == MAGIC and lrec >> 29 == 0 and end <= len(mm):
                return mm, offset + 8, end
        record = self.read_at(offset, key)
        return record, 0, len(record)

    def read(self, key: int) -> bytes:
        """Record bytes (IRHeader + payload) of ``key``."""
        try:
            offset = self.offsets[key]
        except KeyError:
            raise KeyError(f"{self.idx_path}: no record with key {key}") from None
        return self.read_at(offset, key)

    def __len__(self) -> int:
        return len(self.offsets)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # an array still views the map; it is freed with that array
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:  # picklable for DataLoader workers (spawn)
        state = self.__dict__.copy()
        state["_file"], state["_map"], state["_pid"] = None, None, -1
        return state


class InsightFaceRec:
    """An insightface training set: ``train.rec``, ``train.idx`` and (optional) ``property``.

    Attributes:
        image_keys: record keys of the images, in key order.
        identity_ranges: {class id: (first_key, end_key)} when the identity records exist.
        num_classes: see :attr:`num_classes`.
    """

    def __init__(self, root: str | Path, prefix: str = "train") -> None:
        self.root = Path(root)
        self.reader = RecordIOReader(self.root / f"{prefix}.rec", self.root / f"{prefix}.idx")
        self.property = self._read_property()
        self.identity_ranges: dict[int, tuple[int, int]] = {}
        self.expected_image_keys: range | None = None  # from key 0's range, when present
        self._identity_keys: list[int] = []
        self._num_classes: int | None = None
        self.image_keys = self._image_keys()

    def _read_property(self) -> tuple[int, int, int] | None:
        path = self.root / "property"
        if not path.is_file():
            return None
        text = path.read_text().strip()
        try:
            k, h, w = (int(v) for v in text.split(","))
        except ValueError as exc:
            raise RecordIOError(
                f"{path}: expected 'num_classes,height,width', got {text!r}"
            ) from exc
        return k, h, w

    def _image_keys(self) -> list[int]:
        keys = sorted(self.reader.keys)
        if 0 not in self.reader.offsets:
            return keys
        header, _ = unpack_record(self.reader.read(0), f"{self.reader.rec_path} key 0")
        if header.flag <= 0:
            return keys
        first_id, end_id = (int(v) for v in np.asarray(header.label)[:2])
        if end_id >= _FLOAT32_EXACT and self.property:
            # float32 ranges are rounded past 2^24: the identity records are the last K keys
            end_id = max(keys) + 1
            first_id = end_id - self.property[0]
            log.warning(
                "%s: identity range beyond float32 precision; using property's class "
                "count (images 1..%d)",
                self.reader.rec_path,
                first_id - 1,
            )
        self.expected_image_keys = range(1, first_id)
        image_keys = [k for k in keys if 0 < k < first_id]
        self._identity_keys = [k for k in keys if first_id <= k < max(end_id, first_id)]
        return image_keys

    def read_identity_ranges(self) -> dict[int, tuple[int, int]]:
        """Read the identity records: {class index in key order: (first_key, end_key)}."""
        ranges = {}
        for n, key in enumerate(self._identity_keys):
            header, _ = unpack_record(self.reader.read(key), f"{self.reader.rec_path} key {key}")
            lo, hi = (int(v) for v in np.asarray(header.label)[:2])
            ranges[n] = (lo, hi)
        self.identity_ranges = ranges
        return ranges

    def __len__(self) -> int:
        return len(self.image_keys)

    @property
    def num_classes(self) -> int:
        """Identities: from ``property``, else the identity records, else the largest label + 1
        (read from the headers only, once)."""
        if self.property is not None:
            return self.property[0]
        if self._identity_keys:
            return len(self._identity_keys)
        if self._num_classes is None:
            labels = [self._locate(i)[3] for i in range(len(self))]
            self._num_classes = max(labels) + 1 if labels else 0
        return self._num_classes

    def _locate(self, index: int) -> tuple[bytes | mmap.mmap, int, int, int]:
        """(buffer, image start, image end, label) of image ``index``: the hot path of every read.

        Nothing is copied: the JPEG bytes are decoded straight from the memory-mapped file.
        """
        key = self.image_keys[index]
        buf, start, end = self.reader.locate(key)
        if end - start < _HEADER.size:
            unpack_record(bytes(buf[start:end]), f"{self.reader.rec_path} key {key}")  # raises
        flag, label = _FLAG_LABEL.unpack_from(buf, start)
        image_start = start + _HEADER.size + 4 * flag
        if flag:  # label array: the class id is its first element
            if image_start > end:
                unpack_record(bytes(buf[start:end]), f"{self.reader.rec_path} key {key}")
            label = _FLOAT.unpack_from(buf, start + _HEADER.size)[0]
        if not 0 <= label < _FLOAT32_EXACT:  # also NaN: int() of it would be a bare ValueError
            raise RecordIOError(f"{self.reader.rec_path} record key {key}: label {label} is not a "
                                f"class index (a whole number >= 0)")
        return buf, image_start, end, int(label)

    def read_item(self, index: int) -> tuple[bytes, int]:
        """(encoded image bytes, integer label) of the ``index``-th image."""
        buf, start, end, label = self._locate(index)
        return bytes(buf[start:end]), label

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """(H, W, 3) uint8 RGB image and its integer label."""
        buf, start, end, label = self._locate(index)
        try:
            img = cv2.imdecode(np.frombuffer(buf, np.uint8, end - start, start), _DECODE_FLAG)
        except cv2.error:  # an empty payload
            img = None
        if img is None:
            raise RecordIOError(
                f"{self.reader.rec_path} image {index} (key {self.image_keys[index]}): the image "
                f"bytes do not decode ({end - start} bytes)"
            )
        return (img if _RGB_FLAG is not None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)), label

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self[i]


def write_insightface_rec(
    root: str | Path, items: Iterable[tuple[int, bytes]], image_size: tuple[int, int] = (112, 112)
) -> int:
    """Write ``train.rec``/``train.idx``/``property`` in insightface's layout.

    Args:
        root: output folder (created).
        items: (label, encoded image bytes), grouped by label (labels 0..K-1, each once as a group).
        image_size: (height, width) written to ``property``.

    Returns:
        The number of images written.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ranges: list[tuple[int, int]] = []
    seen: set[int] = set()
    key = 1
    prev = None
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for label, payload in items:
            if label != prev:
                if label in seen:
                    raise ValueError(f"write_insightface_rec: label {label} is not contiguous")
                seen.add(label)
                ranges.append((label, key))
                prev = label
            w.write(key, pack_record(IRHeader(0, float(label), key, 0), payload))
            key += 1
        num_images = key - 1
        bounds = [start for _, start in ranges] + [key]
        first_id = key
        for n in range(len(ranges)):
            w.write(key, pack_record(IRHeader(2, np.array(bounds[n : n + 2], "f4"), key, 0)))
            key += 1
        w.write(0, pack_record(IRHeader(2, np.array([first_id, key], "f4"), 0, 1)))
    (root / "property").write_text(f"{len(ranges)},{image_size[0]},{image_size[1]}\n")
    return num_images
