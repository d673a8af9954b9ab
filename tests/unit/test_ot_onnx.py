"""The OT-prototype ensemble exports to one ONNX graph that matches torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_export.ot_prototypes import MemberConfig, OTPrototypesConfig, fit, to_onnx
from service.contract import OUTPUT_NAMES
from service.preprocessing import prepare
from service.tiler import tile_maxima
from tests.helpers.synthetic import encode_png, good_image, inject_defect


@pytest.fixture(scope="module")
def fitted() -> tuple[torch.nn.Module, bytes]:
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(prepare(encode_png(good_image(rng))).tensor) for _ in range(4)]
    config = OTPrototypesConfig(
        # Every scale (two taps and one), a global and a local member: every
        # path of the graph. At epsilon 0.05, 10 iterations converge.
        members=(
            MemberConfig("s8", 0.0, 1),
            MemberConfig("s16", 0.5, 2),
            MemberConfig("s32", 0.0, 2),
        ),
        epsilon=0.05,
        sinkhorn_iterations=10,
    )
    model, log = fit(config, images)
    assert max(log["marginal_errors"]) < 1e-2
    return model, to_onnx(model)


def test_graph_is_valid_and_follows_the_contract(fitted: tuple[torch.nn.Module, bytes]) -> None:
    _, blob = fitted
    graph = onnx.load_from_string(blob)
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == list(OUTPUT_NAMES)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_torch(fitted: tuple[torch.nn.Module, bytes], batch: int) -> None:
    model, blob = fitted
    rng = np.random.default_rng(batch)
    imgs = [good_image(rng) for _ in range(batch)]
    imgs[-1] = inject_defect(imgs[-1], rng, "scratch")[0]
    x = np.stack([prepare(encode_png(im)).tensor for im in imgs])
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x})
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    # e0 and e1..e9 are the map's maxima, over the image and over each tile.
    e0, tiles, amap = got
    np.testing.assert_allclose(e0, amap.reshape(batch, -1).max(1), rtol=1e-6)
    np.testing.assert_allclose(tiles, tile_maxima(amap), rtol=1e-6)
    assert (amap >= 0).all()
