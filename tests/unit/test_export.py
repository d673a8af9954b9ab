"""The one export helper (model_export/export.py): both families' graphs by
torch's recommended exporter, with the batch dimension "N", and a proof
against torch that fails where the graph computes something else."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from model_export import ot_prototypes as ot
from model_export import pwae
from model_export.export import ExportMismatch, export_proven, prove, to_onnx
from service.contract import INPUT_NAME, OUTPUT_NAMES
from service.tiler import tile_maxima

SIZE = (24, 24)


class Contract(nn.Module):
    """A tiny contract model: a 1x1 convolution's map and its maxima."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, 1)

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)[:, 0] ** 2

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        amap = self.anomaly_map(image)
        return amap.flatten(1).max(1).values, tile_maxima(amap, 3, 3), amap


class ExportsSomethingElse(Contract):
    """Computes one map in torch and writes another into its graph."""

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        amap = super().anomaly_map(image)
        return amap * 1.01 if torch.compiler.is_exporting() else amap


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(n))


def test_a_graph_that_agrees_is_proven_and_has_a_batch_dimension_n() -> None:
    model = Contract()
    blob, diff = export_proven(lambda m: to_onnx(m, 18, SIZE), model, _images(3))
    assert diff < 1e-5
    graph = onnx.load_from_string(blob).graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    for value in (*graph.input, *graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "N", value.name


def test_a_graph_that_computes_something_else_fails_the_proof() -> None:
    model = ExportsSomethingElse()
    with pytest.raises(ExportMismatch, match="does not compute what the model does"):
        export_proven(lambda m: to_onnx(m, 18, SIZE), model, _images(2))


def test_weights_changed_after_the_export_fail_the_proof() -> None:
    model = Contract()
    blob = to_onnx(model, 18, SIZE)
    assert prove(model, blob, _images(2)) < 1e-5
    with torch.no_grad():
        model.conv.bias.add_(0.5)  # type: ignore[union-attr]
    outputs = r"onnxruntime.s (image_error|tile_errors|anomaly_map) differs"
    with pytest.raises(ExportMismatch, match=outputs):
        prove(model, blob, _images(2))


@pytest.mark.parametrize(
    ("family", "bound"),
    [
        ("pwae", 1e-4),
        # The feature-space error, its second network in the graph too; its
        # squared feature differences are larger than pixel ones, as are
        # float32's rounding differences in them.
        ("pwae-feature", 1e-3),
        # The encoder's features against the feature decoder's: no pixel decoder in the graph.
        ("pwae-feature_reconstruction", 1e-3),
        ("ot_prototypes", 1e-4),
    ],
)
def test_both_families_export_and_agree_with_torch(family: str, bound: float) -> None:
    torch.manual_seed(0)
    if family.startswith("pwae"):
        space = family.removeprefix("pwae-") if "-" in family else "pixel"
        model: nn.Module = pwae.PWAE(
            pwae.PWAEConfig(permutations=24, error_space=space, error_normalisation="zscore")
        )
        to = pwae.to_onnx
    else:
        model = ot.OTPrototypesModel(
            ot.OTPrototypesConfig(
                members=(ot.MemberConfig("s8", 0.0, 1), ot.MemberConfig("s16", 0.5, 2))
            )
        )
        for member in model.prototype_members():  # type: ignore[operator]
            member.prototypes.normal_()
        to = ot.to_onnx  # type: ignore[assignment]
    images = torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(1))
    blob, diff = export_proven(to, model, images)  # type: ignore[arg-type]
    assert diff < bound
    dims = [
        o.type.tensor_type.shape.dim[0].dim_param for o in onnx.load_from_string(blob).graph.output
    ]
    assert dims == ["N", "N", "N"]
    if family == "pwae-feature_reconstruction":
        # Served without the pixel decoder: no image is reconstructed for the score.
        names = {i.name for i in onnx.load_from_string(blob).graph.initializer}
        assert any(n.startswith("feature_decoder.") for n in names)
        assert not any(n.startswith(("decoder.", "perceptual.")) for n in names)
