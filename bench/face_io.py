"""Face RecordIO read + decode throughput against plain ``cv2.imdecode`` of the same JPEG bytes.

Writes a temporary insightface-layout ``train.rec`` of synthetic 112×112 faces (JPEG q95, as
``pack_img``), then times, interleaved over several rounds:

* ``imdecode``: ``cv2.imdecode`` of the JPEG bytes already in memory (the floor);
* ``imdecode+rgb``: the same plus the BGR → RGB conversion every RGB reader needs;
* ``recordio``: kpt's reader: seek by ``.idx`` offset, read the framed record, parse the IRHeader,
  decode, convert to RGB (``InsightFaceRec.__getitem__``).

The file is read once before timing, so it is in the page cache for every round (as in training
after the first epoch). Variants alternate in blocks of 100 images and are timed in process CPU
time, so a busy shared machine slows them alike. Reports images/s (CPU time) per variant and the ratio recordio / imdecode (the target
is within 10%, i.e. a ratio ≥ 0.9).

With ``--synthetic`` it also times the synthetic face renderer (images/s of process CPU time,
batches of 256, both splits, one thread).

Example::

    python bench/face_io.py --images 2000 --rounds 5 --synthetic
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from kpt_plugins.face.data.recordio import InsightFaceRec, encode_image, write_insightface_rec
from kpt_plugins.face.synthetic.render import render_faces


def build(root: Path, images: int, per_identity: int) -> list[bytes]:
    """Write the RecordIO set; returns the JPEG payloads in item order."""
    payloads: list[bytes] = []
    for start in range(0, images, 256):
        idx = np.arange(start, min(start + 256, images))
        imgs, _ = render_faces(idx // per_identity, idx % per_identity, split="unaligned")
        for img in imgs.permute(0, 2, 3, 1).numpy():
            payloads.append(encode_image(np.ascontiguousarray(img)))
    labels = [i // per_identity for i in range(images)]
    write_insightface_rec(root, zip(labels, payloads))
    return payloads


def time_blocks(variants: dict, n: int, rounds: int, block: int = 100) -> dict[str, list[float]]:
    """CPU seconds per variant, interleaved in small blocks so load changes hit all alike.

    Returns per-round totals {name: [seconds, ...]}. CPU time of this process
    (``time.process_time``) is used because the machine may be shared: time spent descheduled
    does not count.
    """
    totals = {k: [0.0] * rounds for k in variants}
    names = list(variants)
    for r in range(rounds):
        for start in range(0, n, block):
            stop = min(start + block, n)
            for name in names if (start // block + r) % 2 == 0 else reversed(names):
                fn = variants[name]
                t0 = time.process_time()
                for i in range(start, stop):
                    fn(i)
                totals[name][r] += time.process_time() - t0
    return totals


def synthetic_rate(split: str, batches: int = 4, batch: int = 256) -> float:
    """Synthetic faces rendered per second of process CPU time (after one warm-up batch)."""
    render_faces(list(range(8)), [0] * 8, split=split)
    start = time.process_time()
    for b in range(batches):
        ids = np.arange(b * batch, (b + 1) * batch)
        render_faces(ids // 10, ids % 10, split=split)
    return batches * batch / (time.process_time() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument("--synthetic", action="store_true", help="also time the synthetic renderer")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        payloads = build(root, args.images, per_identity=20)
        rec = InsightFaceRec(root)
        (root / "train.rec").read_bytes()  # warm the page cache
        arrays = [np.frombuffer(b, np.uint8) for b in payloads]

        def imdecode(i: int):
            return cv2.imdecode(arrays[i], cv2.IMREAD_COLOR)

        def imdecode_rgb(i: int):
            return cv2.cvtColor(cv2.imdecode(arrays[i], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

        def recordio(i: int):
            return rec[i]

        assert np.array_equal(recordio(0)[0], imdecode_rgb(0))  # same bytes, same pixels
        variants = {"imdecode": imdecode, "imdecode+rgb": imdecode_rgb, "recordio": recordio}
        seconds = time_blocks(variants, len(payloads), args.rounds)
        rec.reader.close()
    rates = {k: [len(payloads) / t for t in v] for k, v in seconds.items()}
    # ratio of throughputs per round, then the median over rounds
    ratio = statistics.median(a / b for a, b in zip(rates["recordio"], rates["imdecode"]))
    ratio_rgb = statistics.median(a / b for a, b in zip(rates["recordio"], rates["imdecode+rgb"]))
    result = {
        "images": args.images,
        "rounds": args.rounds,
        **{f"{k} img/s": round(statistics.median(v), 1) for k, v in rates.items()},
        "recordio/imdecode": round(ratio, 3),
        "recordio/(imdecode+rgb)": round(ratio_rgb, 3),
        "within 10%": ratio >= 0.9,
    }
    if args.synthetic:
        for split in ("aligned", "unaligned"):
            result[f"synthetic {split} img/s"] = round(synthetic_rate(split), 1)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>26}: {v}")
    return result


if __name__ == "__main__":
    main()
