"""``--device``: where the trainer computes, decided in model_export/device.py.

No GPU exists on the machines these tests run on, so nothing here needs one:
the resolution is checked with torch's answer patched, and that every tensor
the families create follows the device of their input is checked on torch's
``meta`` device (shapes only, no data), with a dispatch mode that fails any
operation mixing a meta tensor with a CPU one, as CUDA would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model_export import cli, cli_args, pwae
from model_export import ot_prototypes as ot
from model_export.device import (
    DeviceUnavailable,
    describe_device,
    describe_platform,
    module_device,
    resolve_device,
    throughput,
)
from model_export.evaluation import score_tensors
from tests.helpers.deploy import REPO
from tests.helpers.synthetic import write_category

META = torch.device("meta")


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --- resolution ------------------------------------------------------------------


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")  # auto is the default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")


def test_cpu_is_the_cpu_even_where_cuda_is(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert describe_device(torch.device("cpu")) == "cpu"


def test_the_platform_names_torch_the_processor_its_kernels_and_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    text = describe_platform(torch.device("cpu"))
    assert text.startswith(f"torch {torch.__version__}, ")
    assert text.endswith(", AVX2 kernels, 3 threads")
    processor = text.removeprefix(f"torch {torch.__version__}, ").removesuffix(
        ", AVX2 kernels, 3 threads"
    )
    assert processor and processor != "unknown processor"


def test_cuda_without_cuda_is_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(DeviceUnavailable, match=r"--device cuda .* CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailable, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_the_trainer_exits_with_the_sentence_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _no_cuda(monkeypatch)
    for stage in ("train", "calibrate", "evaluate", "run"):
        with pytest.raises(SystemExit) as exc:
            cli.main([stage, "--data", str(tmp_path), "--work", str(tmp_path), "--device", "cuda"])
        assert exc.value.code == 2  # argparse's usage error, before anything is read
        err = capsys.readouterr().err
        assert "CUDA is not available" in err and "--device cpu" in err
        assert "Traceback" not in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        cli_args.parser().parse_args(["train", "--work", "w", "--device", "gpu"])
    assert cli_args.parser().parse_args(["train", "--work", "w"]).device == "auto"


def test_the_training_job_asks_for_the_gpu_it_requests() -> None:
    job = yaml.safe_load((REPO / "k8s" / "training" / "job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = cli_args.parser().parse_args(container["args"])
    assert args.device == "cuda"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1


# --- every tensor follows the input's device --------------------------------------


class OneDevice(TorchDispatchMode):
    """Fails any operation that mixes a meta tensor with a CPU one (a 0-d CPU
    tensor, a scalar, may mix, as on CUDA); reading a meta scalar (``.item()``,
    ``float()``) gives 0 so that loss sums and logs run through."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and tensors[0].is_meta:
            return 0.0 if tensors[0].is_floating_point() else 0
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.ndim == 0)}
        if "meta" in devices and len(devices) > 1:
            shapes = [(t.device.type, tuple(t.shape)) for t in tensors]
            raise AssertionError(f"{func} mixes devices: {shapes}")
        return func(*args, **kwargs)


def _images(n: int) -> list[torch.Tensor]:
    return [torch.randn(3, 300, 300, generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.mark.parametrize(
    "config",
    [
        pwae.PWAEConfig(
            permutations=24,
            epochs=1,
            batch_size=2,
            error_space="feature",
            error_normalisation="zscore",
        ),
        # The paper's recipe (prior on the whole map, raw error, tile means),
        # with the encoder fine-tuned so batches go through it.
        pwae.PAPER.model_copy(
            update={"permutations": 24, "epochs": 1, "batch_size": 2, "freeze_encoder": False}
        ),
    ],
    ids=["feature-error", "paper-finetuned"],
)
def test_pwae_training_and_scoring_stay_on_the_input_device(config: pwae.PWAEConfig) -> None:
    records: list[dict[str, Any]] = []
    x = torch.randn(2, 3, 300, 300).to(META)
    with OneDevice():
        model, log = pwae.fit(config, _images(4), device=META, on_epoch=records.append)
        with torch.no_grad():
            outputs = model(x)
    assert module_device(model) == META
    assert all(b.device == META for b in model.buffers())
    assert all(o.device == META for o in outputs)
    # The frozen encoder's feature pass (epoch 0), then the epoch.
    assert [r["epoch"] for r in records] == ([0, 1] if config.freeze_encoder else [1])
    assert log["history"][-1]["images"] == 4


def test_pwae_priors_and_projections_follow_the_device() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.arange(1.0, 4.0).view(-1, 1, 1).to(META)
    assert pwae.sample_student_t((3, 2, 5), 5.0, mu, 1.0, gen).device == META
    assert pwae.random_projections(5, 8, gen, META).device == META
    # Drawn from the same CPU generator, whatever the device: the same numbers.
    cpu = pwae.random_projections(5, 8, torch.Generator().manual_seed(1))
    moved = pwae.random_projections(5, 8, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(cpu, moved)


def test_ot_prototypes_fitting_and_scoring_stay_on_the_input_device() -> None:
    config = ot.OTPrototypesConfig(
        members=(ot.MemberConfig("s16", 0.5, 2), ot.MemberConfig("s8", 0.0, 1)),
        epochs=1,
        prototypes_per_problem=64,
    )
    records: list[dict[str, Any]] = []
    with OneDevice(), torch.no_grad():
        model, _ = ot.fit(config, _images(3), device=META, on_epoch=records.append)
        outputs = model(torch.randn(2, 3, 300, 300).to(META))
    assert all(o.device == META for o in outputs)
    assert all(b.device == META for b in model.buffers())
    # The shared trainer's records: the feature pass, then one per epoch of
    # both members (each image counted once per member).
    assert [(r.get("stage"), r["epoch"], r["images"]) for r in records] == [
        ("features", 0, 3),
        (None, 1, 6),
    ]
    assert ot.grid_positions(3, 4, META).device == META


def test_scoring_moves_the_images_to_the_models_device() -> None:
    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1, device=META))
            self.seen: list[torch.device] = []

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            self.seen.append(x.device)
            n = x.shape[0]  # answers from the CPU, as a real device's come back
            return torch.ones(n), torch.ones(n, 9), torch.ones(n, 300, 300)

    probe = Probe()
    errors, maps = score_tensors(probe, _images(3), batch=2)
    assert probe.seen == [META, META]
    assert errors.shape == (3, 10) and maps.shape == (3, 300, 300)


# --- on the CPU: unchanged, and it says so ------------------------------------------


def test_a_short_training_with_device_cpu_logs_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_category(tmp_path / "data", n_train=5, n_test_good=1, n_test_defective=1)
    work = tmp_path / "work"
    cli.main(
        ["train", "--family", "pwae", "--data", str(data), "--work", str(work),
         "--device", "cpu", "--set", "epochs=2", "--set", "batch_size=2",
         "--set", "permutations=24", "--holdout", "0.2"]  # 4 fit, 1 held out
    )  # fmt: skip
    out = capsys.readouterr().out
    platform = describe_platform(torch.device("cpu"))
    assert out.startswith(f"training pwae on cpu ({platform})")
    assert "pwae epoch 1/2: 4 images in" in out and "pwae epoch 2/2: 4 images in" in out
    assert "images/s" in out
    ckpt = torch.load(work / "checkpoint.pt", weights_only=False)
    assert ckpt["device"] == "cpu" and ckpt["images_per_s"] > 0
    assert ckpt["platform"] == platform
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    history = ckpt["log"]["history"]
    assert [h["images"] for h in history] == [4, 4]
    assert all(h["images_per_s"] > 0 for h in history)


def test_throughput_record() -> None:
    import time

    record = throughput(torch.device("cpu"), time.perf_counter() - 2.0, 10, epoch=3)
    assert record["epoch"] == 3 and record["images"] == 10
    assert record["seconds"] >= 2.0
    assert np.isclose(record["images_per_s"], 10 / record["seconds"])
