"""``inspection-train predict MODEL_DIR IMAGES...``: the server's verdicts, offline.

Each image goes through the server's own code, in the server's order: the
artifact loaded and verified by service.artifact.load_artifact (the newest
version under ``models/<name>``, or the version given), the bytes prepared by
service.preprocessing.prepare, the graph run by onnxruntime, the thresholds
applied by service.decision.decide, the overlay drawn by service.heatmap. No
torch: the verdicts are the ones the server would answer for the same files.

Writes ``predictions.csv`` (one row per image: verdict, the rule's score,
e0 and its threshold, the nine tile errors, defective tiles, the overlay's
file, and for an image the server would refuse, the reason instead) and one
overlay PNG per image under ``--out``. Folders among IMAGES are searched for
images, subfolders too. The exit status is 0 when every image was inspected,
1 when some could not be (their rows say why), 2 for a model that does not load.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_export.data import IMAGE_EXTS, list_images
from model_export.sources import refusal
from service.artifact import ArtifactError, LoadedArtifact, load_artifact
from service.contract import INPUT_NAME, OUTPUT_NAMES
from service.decision import Decision, decide
from service.heatmap import overlay, to_png
from service.image_header import DEFAULT_MAX_PIXELS
from service.preprocessing import prepare
from service.rejection import InputRejected
from service.schemas import InputInfo

CSV_NAME = "predictions.csv"
TILE_COLUMNS = [f"e{k}" for k in range(1, 10)]
COLUMNS = [
    "image", "verdict", "score", "e0", "eps0", *TILE_COLUMNS, "defective_tiles",
    "input", "matches_calibration", "overlay", "error",
]  # fmt: skip


@dataclass(frozen=True)
class Prediction:
    image: Path
    decision: Decision | None
    overlay_png: bytes | None
    input: InputInfo | None
    error: str | None


def expand(inputs: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[Prediction]]:
    """(image file, a name for its overlay) for the files named and the images
    found under the folders named (the name: its path under that folder); and
    an error row for each argument that is neither."""
    images: list[tuple[Path, str]] = []
    problems: list[Prediction] = []
    for item in inputs:
        if item.is_dir():
            found = list_images(item)
            if not found:
                why = f"a folder with no images ({', '.join(IMAGE_EXTS)}), subfolders too"
                problems.append(Prediction(item, None, None, None, why))
            images += [(p, p.relative_to(item).with_suffix("").as_posix()) for p in found]
        elif item.is_file():
            images.append((item, item.stem))
        else:
            problems.append(Prediction(item, None, None, None, "no such file or folder"))
    return images, problems


def predict_one(
    art: LoadedArtifact, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Prediction:
    """One image as the server inspects it (one image a run, as on its CPU path)."""
    meta = art.metadata
    try:
        data = path.read_bytes()
        prepared = prepare(data, meta.input, meta.grid, max_pixels)
    except (InputRejected, OSError) as exc:
        return Prediction(path, None, None, None, refusal(exc))
    e0, tiles, amap = art.session.run(list(OUTPUT_NAMES), {INPUT_NAME: prepared.tensor[None]})
    d = decide(float(e0[0]), np.asarray(tiles[0]), meta.thresholds)
    png = to_png(
        overlay(prepared.rgb, amap[0], meta.thresholds.eps0, d.defective_tiles,
                meta.grid.rows, meta.grid.cols)
    )  # fmt: skip
    seen = InputInfo.judge(prepared.codec, meta.calibration.codec)
    return Prediction(path, d, png, seen, None)


def _overlay_name(label: str, taken: set[str]) -> str:
    """``label`` (``kind/name``) as a file name, ``kind__name.png``, unique in ``taken``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace("/", "__")) or "image"
    name, n = f"{stem}.png", 2
    while name in taken:
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name)
    return name


def _row(p: Prediction, overlay_file: str, eps0: float) -> dict[str, object]:
    row: dict[str, object] = {"image": str(p.image)}
    if p.decision is None or p.input is None:
        return {**row, "verdict": "error", "error": p.error}
    d, seen = p.decision, p.input
    codec = seen.format if seen.jpeg_quality is None else f"{seen.format}:{seen.jpeg_quality}"
    row.update(
        verdict=d.verdict,
        score=f"{d.score:.6g}",
        e0=f"{d.image_error:.6g}",
        eps0=f"{eps0:.6g}",
        defective_tiles=" ".join(str(k) for k in d.defective_tiles),
        input=codec,
        matches_calibration=str(seen.matches_calibration).lower(),
        overlay=overlay_file,
        error="",
    )
    row.update({c: f"{e:.6g}" for c, e in zip(TILE_COLUMNS, d.tile_errors, strict=True)})
    return row


def run(model_dir: Path, inputs: Sequence[Path], out: Path) -> tuple[Path, list[Prediction]]:
    """Predict every image; write the CSV and the overlays under ``out``.
    ArtifactError where the model does not load, ValueError where there is no image."""
    art = load_artifact(model_dir, providers=("CPUExecutionProvider",))
    images, preds = expand(inputs)
    if not images:
        why = "\n  ".join(f"{p.image}: {p.error}" for p in preds)
        raise ValueError(f"no images to inspect:\n  {why}")
    out.mkdir(parents=True, exist_ok=True)
    eps0 = art.metadata.thresholds.eps0
    taken: set[str] = set()
    with (out / CSV_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for p in preds:  # the arguments that named no image
            writer.writerow(_row(p, "", eps0))
        for path, label in images:
            p = predict_one(art, path)
            preds.append(p)
            name = ""
            if p.overlay_png is not None:
                name = _overlay_name(label, taken)
                (out / name).write_bytes(p.overlay_png)
            writer.writerow(_row(p, name, eps0))
    return art.path, preds


def main(model_dir: Path, images: Sequence[Path], out: Path) -> int:
    try:
        version, preds = run(model_dir, images, out)
    except ArtifactError as exc:
        print(f"inspection-train predict: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"inspection-train predict: {exc}", file=sys.stderr)
        return 2
    failed = [p for p in preds if p.decision is None]
    bad = [p for p in preds if p.decision is not None and p.decision.verdict == "defective"]
    mismatched = [p for p in preds if p.input is not None and not p.input.matches_calibration]
    print(
        f"{version}: {len(preds) - len(failed)} images inspected, {len(bad)} defective; "
        f"{len(failed)} could not be read; wrote {out / CSV_NAME} and an overlay per image"
    )
    if mismatched:
        print(
            f"note: {len(mismatched)} images are not encoded as the thresholds were calibrated "
            f"for ({mismatched[0].input.calibrated_for if mismatched[0].input else ''}); "
            "their verdicts are the server's, but the promised false-reject rate does not apply",
            file=sys.stderr,
        )
    for p in failed:
        print(f"error: {p.image}: {p.error}", file=sys.stderr)
    return 1 if failed else 0
