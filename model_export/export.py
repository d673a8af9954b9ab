"""The one way a model becomes its ONNX graph, and the proof that the graph
computes what the model does.

:func:`to_onnx` exports a contract model (service/contract.py: input
``image``, outputs ``image_error``, ``tile_errors``, ``anomaly_map``, the
batch dimension dynamic and named "N", which the server pins with
onnxruntime's free-dimension overrides, service/runtime.py) on the CPU.
:func:`prove` runs the graph on onnxruntime's CPU provider against the torch
model on the same inputs, at the whole batch and at one image, and raises
:class:`ExportMismatch` where an output differs beyond tolerance;
:func:`export_proven` is the two together, as the trainer's export stage
runs them before it writes anything.

The exporter is torch's own recommendation, ``torch.onnx.export(...,
dynamo=True)`` (torch.export, then onnxscript): it exports both families'
graphs, with "N" as the batch dimension of the input and of every output,
and onnxruntime matches torch on both (tests/unit/test_export.py). The
legacy TorchScript exporter it replaces printed a DeprecationWarning on
every export. Measured on the default OT ensemble (2 cores, CPU): 30.8 MB
and 0.52 s on onnxruntime for two images, against the legacy exporter's
30.9 MB and 0.49 s; max |onnx - torch| 1.5e-7 for both. onnxscript's graph
optimiser (on) folds constants only up to a size limit, so the spatial cost
of a local member stays computed in the graph from its position tables, as
the legacy exporter without constant folding kept it, rather than stored as
an (h*w, m) matrix (~33 MB per fine-scale member); with the optimiser off
the graph was 32.0 MB, 40% slower on onnxruntime, and onnxruntime warned of
CastLike nodes it could not fold.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from service.contract import INPUT_NAME, OUTPUT_NAMES

# An output agrees when max |onnx - torch| <= ATOL + RTOL * max |torch| over it:
# float32 kernels that fuse or reorder (onnxruntime folds batch norms into
# convolutions) differ around 1e-6 of the output's scale; a graph that computes
# something else differs by the scale itself.
ATOL = 1e-4
RTOL = 1e-3

_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


class ExportMismatch(RuntimeError):
    """The exported graph's outputs differ from the torch model's; the message says which."""


def to_onnx(
    model: nn.Module,
    opset: int,
    image_size: tuple[int, int] = (300, 300),
) -> bytes:
    """``model`` (moved to the CPU and put in eval mode) as a contract graph."""
    model.cpu().eval()
    example = torch.zeros(1, 3, *image_size)
    # The exporter logs a warning for each torchvision op it cannot register
    # when torchvision is absent (it is, on the CPU torch build); no graph
    # here uses them, so those lines would only alarm the user.
    logging.getLogger(_REGISTRATION_LOGGER).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # torch.export's own code calls an API torch deprecates (LeafSpec);
        # nothing the user can act on, and the next torch release drops it.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("N", min=1)}},
            optimize=True,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        # The exporter writes opset 18 at least and converts down only where
        # onnx has adapters for every op; the metadata must say what the graph is.
        raise ExportMismatch(f"asked for ONNX opset {opset}, the exporter wrote {written}")
    return bytes(proto.SerializeToString())


def prove(model: nn.Module, onnx_bytes: bytes, images: torch.Tensor) -> float:
    """onnxruntime's outputs against torch's on ``images`` (N, 3, H, W): the
    whole batch, and its first image alone. The largest difference; raises
    ExportMismatch where an output's shape or values differ beyond tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    model.cpu().eval()
    worst = 0.0
    for batch in (images, images[:1]) if len(images) > 1 else (images,):
        got = session.run(None, {INPUT_NAME: batch.numpy()})
        with torch.no_grad():
            want = [t.numpy() for t in model(batch)]
        for name, g, w in zip(OUTPUT_NAMES, got, want, strict=True):
            if g.shape != w.shape:
                raise ExportMismatch(
                    f"the exported graph's {name} has shape {g.shape} where the model's has "
                    f"{w.shape} (batch of {len(batch)})"
                )
            diff = float(np.abs(g - w).max()) if g.size else 0.0
            tolerance = ATOL + RTOL * float(np.abs(w).max() if w.size else 0.0)
            if not diff <= tolerance:  # NaN fails too
                raise ExportMismatch(
                    f"the exported graph does not compute what the model does: onnxruntime's "
                    f"{name} differs from torch's by {diff:.3g} (tolerance {tolerance:.3g}) on "
                    f"a batch of {len(batch)} images"
                )
            worst = max(worst, diff)
    return worst


def export_proven(
    to_onnx: Callable[[nn.Module], bytes], model: nn.Module, images: torch.Tensor
) -> tuple[bytes, float]:
    """``to_onnx(model)``, proven on ``images`` (see :func:`prove`): the graph
    and the largest difference."""
    onnx_bytes = to_onnx(model)
    return onnx_bytes, prove(model, onnx_bytes, images)
