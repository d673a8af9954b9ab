"""Small, real ONNX graphs that follow (or deliberately break) the contract.

Built with onnx.helper, no torch: the anomaly map is the squared distance of
each pixel from a fixed "good" colour, averaged over channels, and the errors
are its mean over the image and over each tile. That is enough for the
artifact loader and the server to run a real onnxruntime session end to end.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.artifact import write_artifact
from service.contract import (
    INPUT_NAME,
    OUTPUT_ANOMALY_MAP,
    OUTPUT_IMAGE_ERROR,
    OUTPUT_TILE_ERRORS,
    Calibration,
    InputSpec,
    ModelMetadata,
    Thresholds,
    TileGrid,
    TrainingData,
)

OPSET = 18


def colour_distance_model(
    size: int = 300,
    rows: int = 3,
    cols: int = 3,
    reference: tuple[float, float, float] = (0.0, 0.0, 0.0),
    output_names: tuple[str, str, str] = (
        OUTPUT_IMAGE_ERROR,
        OUTPUT_TILE_ERRORS,
        OUTPUT_ANOMALY_MAP,
    ),
    fail_above: float | None = None,
) -> bytes:
    """A contract-shaped graph with a dynamic batch axis; returns serialized ONNX.

    With ``fail_above``, onnxruntime raises at run time (a Gather out of
    bounds) on any batch whose largest input value exceeds it: a real
    inference error for the fault tests, reachable with a white image.
    """
    th, tw = size // rows, size // cols
    img_err, tile_err, amap = output_names
    ref = numpy_helper.from_array(np.array(reference, np.float32).reshape(1, 3, 1, 1), "ref")
    shape5 = numpy_helper.from_array(np.array([0, rows, th, cols, tw], np.int64), "shape5")
    shape3 = numpy_helper.from_array(np.array([0, rows * cols, th * tw], np.int64), "shape3")
    axes1 = numpy_helper.from_array(np.array([1], np.int64), "axes1")
    axes2 = numpy_helper.from_array(np.array([2], np.int64), "axes2")
    axes12 = numpy_helper.from_array(np.array([1, 2], np.int64), "axes12")
    guard: list[onnx.NodeProto] = []
    extra: list[onnx.TensorProto] = []
    diff = "diff"
    if fail_above is not None:
        extra = [
            numpy_helper.from_array(np.array(fail_above, np.float32), "limit"),
            numpy_helper.from_array(np.array(1000, np.int64), "far"),
            numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        ]
        guard = [
            helper.make_node("ReduceMax", [INPUT_NAME], ["mx"], keepdims=0),
            helper.make_node("Greater", ["mx", "limit"], ["over"]),
            helper.make_node("Cast", ["over"], ["over_i"], to=TensorProto.INT64),
            helper.make_node("Mul", ["over_i", "far"], ["index"]),
            helper.make_node("Gather", ["one", "index"], ["unit"]),
            helper.make_node("Mul", ["diff", "unit"], ["diff_g"]),
        ]
        diff = "diff_g"
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "ref"], ["diff"]),
        *guard,
        helper.make_node("Mul", [diff, diff], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes1"], [amap], keepdims=0),
        helper.make_node("ReduceMean", [amap, "axes12"], [img_err], keepdims=0),
        helper.make_node("Reshape", [amap, "shape5"], ["t5"]),
        helper.make_node("Transpose", ["t5"], ["t5p"], perm=[0, 1, 3, 2, 4]),
        helper.make_node("Reshape", ["t5p", "shape3"], ["t3"]),
        helper.make_node("ReduceMean", ["t3", "axes2"], [tile_err], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "colour_distance",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info(img_err, TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info(tile_err, TensorProto.FLOAT, ["N", rows * cols]),
            helper.make_tensor_value_info(amap, TensorProto.FLOAT, ["N", size, size]),
        ],
        initializer=[ref, shape5, shape3, axes1, axes2, axes12, *extra],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def metadata_for(
    model_onnx: bytes,
    name: str = "toy",
    version: int = 1,
    eps0: float = 1.0,
    tiles: tuple[float, ...] = (1.0,) * 9,
    size: int = 300,
    grid: TileGrid | None = None,
    reference_score: float | None = 0.5,
) -> ModelMetadata:
    return ModelMetadata(
        family="pwae",
        name=name,
        version=version,
        input=InputSpec(height=size, width=size),
        grid=grid or TileGrid(),
        thresholds=Thresholds(eps0=eps0, tiles=tiles),
        calibration=Calibration(
            method="fixed-for-tests",
            target_fpr=0.01,
            achieved_fpr=0.0,
            holdout_images=1,
            holdout_fraction=0.2,
            split_seed=0,
            reference_score=reference_score,  # the drift baseline; None as in older artifacts
        ),
        training_data=TrainingData(
            dataset="synthetic", category="synthetic", train_images=1, fingerprint="0" * 64
        ),
        opset=OPSET,
        onnx_sha256=hashlib.sha256(model_onnx).hexdigest(),
    )


def write_toy_artifact(
    root: Path, name: str = "toy", version: int = 1, fail_above: float | None = None, **kw: object
) -> Path:
    """models/<name>/<version>/ under ``root`` with the colour-distance graph."""
    model = colour_distance_model(fail_above=fail_above)
    return write_artifact(
        root / name / str(version), model, metadata_for(model, name, version, **kw)
    )  # type: ignore[arg-type]
