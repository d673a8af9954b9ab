"""What a line sees of the calibrated rule: every test image posted to a real server.

    python -m bench.line_verdicts \\
        models/bottle-pwae=../shared/datasets/mvtec_ad/bottle \\
        models/bottle-otproto=../shared/datasets/mvtec_ad/bottle \\
        --out line_verdicts

For each ARTIFACT=CATEGORY pair a server is started on the artifact (its
newest version, or the version named), every image of the category's test
split is encoded as the camera would send it (the codec the thresholds were
calibrated for, unless the pair ends in ``@CODEC``, e.g.
``models/bottle-pwae=../shared/datasets/mvtec_ad/bottle@jpeg:90``) and posted to
``/v1/inspect``, and the answers are counted: good parts rejected against
the false-reject rate the calibration promised (and the chance of so many
false rejects if the test's good parts were like the calibration images:
service.calibration.rejects_at_least), defective parts detected,
and the AUROC of the answered score max_k(ek/epsk) next to them. The test
split only measures here; nothing is fitted on it.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import OUT_HELP, print_table, write_json
from service.artifact import read_metadata, resolve_version_dir
from service.calibration import conformal_rank, rejects_at_least
from service.codec import apply_codec
from service.contract import Codec
from tests.helpers.server import run_server

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "bmp": "image/bmp", "tiff": "image/tiff"}


def test_images(category: Path) -> list[tuple[Path, int]]:
    """(image, 1 if defective) for the category's test split, good first."""
    out = []
    for d in sorted((category / "test").iterdir(), key=lambda p: (p.name != "good", p.name)):
        if d.is_dir():
            out += [(p, int(d.name != "good")) for p in sorted(d.iterdir())
                    if p.suffix.lower() in IMAGE_EXTS]  # fmt: skip
    return out


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUROC, ties counted half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def measure(version_dir: Path, category: Path, codec: Codec | None) -> dict[str, Any]:
    meta = read_metadata(version_dir)
    cal = meta.calibration
    sent = codec or cal.codec
    items = test_images(category)
    verdicts, scores, labels = [], [], []
    with (
        tempfile.TemporaryDirectory() as logs,
        run_server(version_dir, Path(logs)) as server,
        httpx.Client(base_url=server.base, timeout=60) as client,
    ):
        for path, label in items:
            body = apply_codec(path.read_bytes(), sent)
            r = client.post(
                "/v1/inspect", content=body, headers={"content-type": MEDIA[sent.format]}
            )
            if r.status_code != 200:
                raise SystemExit(f"{path}: {r.status_code} {r.text}")
            answer = r.json()
            verdicts.append(answer["verdict"] == "defective")
            scores.append(max([answer["image"]["score"], *(t["score"] for t in answer["tiles"])]))
            labels.append(label)
    flagged, y, s = np.array(verdicts), np.array(labels), np.array(scores)
    good, bad = y == 0, y == 1
    chance = None  # artifacts from before the conformal calibration promised nothing
    if cal.promised_fpr is not None and cal.holdout_images:
        n = cal.holdout_images
        chance = rejects_at_least(
            int(flagged[good].sum()), int(good.sum()), n, conformal_rank(n, cal.target_fpr)
        )
    return {
        "model": f"{meta.name}/{meta.version}",
        "family": meta.family,
        "category": str(category),
        "codec_sent": str(sent),
        "calibrated_for": str(cal.codec),
        "calibration_images": cal.holdout_images,
        "target_fpr": cal.target_fpr,
        "promised_fpr": cal.promised_fpr,
        "fpr_upper_90": cal.fpr_upper_90,
        "good_images": int(good.sum()),
        "good_rejected": int(flagged[good].sum()),
        "false_reject_rate": float(flagged[good].mean()) if good.any() else float("nan"),
        # How likely so many false rejects are if the test's good parts were
        # like the calibration images: small means drift, not an unlucky draw.
        "chance_of_as_many_rejects": chance,
        "defective_images": int(bad.sum()),
        "defective_detected": int(flagged[bad].sum()),
        "detection_rate": float(flagged[bad].mean()) if bad.any() else float("nan"),
        "image_auroc": auroc(y, s),
        # What the drift alert watches: the median score of the good parts
        # against the calibration images' median (alerts.yml fires at 1.25x).
        "good_median_score": float(np.median(s[good])) if good.any() else float("nan"),
        "reference_score": cal.reference_score,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [
        [
            r["model"], Path(r["category"]).name, r["codec_sent"], r["calibrated_for"],
            f"{r['good_rejected']}/{r['good_images']} ({_pct(r['false_reject_rate'])})",
            f"{_pct(r['promised_fpr'])} / {_pct(r['fpr_upper_90'])}",
            _pct(r.get("chance_of_as_many_rejects")),
            f"{r['defective_detected']}/{r['defective_images']} ({_pct(r['detection_rate'])})",
            f"{r['image_auroc']:.3f}",
            "-" if r["reference_score"] is None
            else f"{r['good_median_score'] / r['reference_score']:.2f}",
        ]
        for r in results
    ]  # fmt: skip


HEADERS = [
    "model", "category", "sent as", "calibrated for", "good rejected",
    "promised (expected / 90%)", "chance of as many if alike", "defective detected",
    "image AUROC",
    "good median / calibration median",
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "pairs", nargs="+", metavar="ARTIFACT=CATEGORY[@CODEC]",
        help="a model (version) directory, the category directory of its test split and, "
        "optionally, the codec to send the images as (default: the calibrated one)",
    )  # fmt: skip
    ap.add_argument("--out", default="line_verdicts", help=OUT_HELP)
    args = ap.parse_args(argv)
    results = []
    for pair in args.pairs:
        artifact, sep, rest = pair.partition("=")
        category, _, codec = rest.partition("@")
        if not sep or not category:
            ap.error(f"{pair!r}: expected ARTIFACT=CATEGORY[@CODEC]")
        sent = Codec.parse(codec) if codec else None
        results.append(measure(resolve_version_dir(Path(artifact)), Path(category), sent))
        print_table(HEADERS, table_rows(results[-1:]))
    print()
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "---|" * len(HEADERS))
    for row in table_rows(results):
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"wrote {write_json(args.out, {'results': results})}")


if __name__ == "__main__":
    main()
