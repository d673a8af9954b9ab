"""Which torch device the trainer computes on: the one place it is decided.

``--device auto`` (the default) takes CUDA where torch sees a GPU and the CPU
elsewhere; ``cuda`` insists on the GPU and stops with a sentence when there
is none (a training Job that asked for a GPU must not quietly spend hours on
the CPU); ``cpu`` is the path every figure in docs/ was measured on, and it
stays exactly as it was: same operations, same seeds, same numbers.

Every random draw of both families comes from a seeded CPU generator and is
moved to the device afterwards, so a seed picks the same batches,
permutations, priors and projections on either device, and the trainer's
resumable state (model_export/trainer.py) can move between them. ONNX export
always runs on the CPU.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Literal, get_args

import torch
from torch import nn

from model_export.processor import processor_name

DeviceName = Literal["auto", "cpu", "cuda"]
DEVICE_NAMES: tuple[str, ...] = get_args(DeviceName)
DEVICE_HELP = (
    "where torch trains, calibrates and evaluates: auto (cuda when torch sees a GPU, "
    "else cpu; the default), cpu, or cuda (stops if there is no GPU). Export always runs on cpu"
)


class DeviceUnavailable(RuntimeError):
    """The device asked for does not exist here; the message says why in a sentence."""


def resolve_device(name: DeviceName | str = "auto") -> torch.device:
    """``auto``/``cpu``/``cuda`` -> the torch device to use.

    Raises DeviceUnavailable for ``cuda`` without a CUDA device and for any
    other name; the command-line tools turn it into an exit with its message.
    """
    if name not in DEVICE_NAMES:
        raise DeviceUnavailable(f"unknown device {name!r}; choose from {', '.join(DEVICE_NAMES)}")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cpu")
    build = torch.version.cuda
    why = (
        "this torch is a CPU-only build"
        if build is None
        else f"this torch is built for CUDA {build} but sees no GPU (driver, or the container "
        "was given none)"
    )
    raise DeviceUnavailable(
        f"--device cuda was asked for, but CUDA is not available: {why}; "
        "use --device cpu or --device auto to train on the CPU"
    )


def describe_device(device: torch.device) -> str:
    """What a log line and the artifact's metadata say: ``cpu`` or ``cuda (<GPU name>)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def describe_platform(device: torch.device) -> str:
    """What the numbers of a training depend on besides its seed: torch's build,
    and the processor with the kernels torch picked for it and its threads
    (or the GPU with the CUDA build).

    A seeded training repeats to the last digit on the same platform; on
    another processor torch may pick other vectorised kernels (AVX2 against
    AVX-512), whose float sums round differently, and the model differs in
    the last digits and what follows from them. The artifact records this
    (``model_info.train_platform``) so a re-run that does not match can be
    told apart from one that should.
    """
    if device.type == "cuda":
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {describe_device(device)}"
    kernels = torch.backends.cpu.get_cpu_capability()
    return (
        f"torch {torch.__version__}, {processor_name()}, {kernels} kernels, "
        f"{torch.get_num_threads()} threads"
    )


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU if it has none)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read next is true (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(device: torch.device, started: float, images: int, **fields: Any) -> dict[str, Any]:
    """An epoch's record: ``fields``, and the ``images`` done since ``started``
    (time.perf_counter()), the seconds and images/s, once ``device`` is done."""
    synchronize(device)
    seconds = time.perf_counter() - started
    return {**fields, "images": images, "seconds": seconds, "images_per_s": images / seconds}
