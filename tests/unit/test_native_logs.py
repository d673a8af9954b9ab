"""The libraries' own messages land in the JSON log: onnxruntime's C++
logger, what native code writes to stderr (libpng, OpenCV), Python warnings."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from service.keys import key_id, presented_key
from service.logs import native_record

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os, sys, warnings
from service import logs
logs.configure(sys.argv[1], capture_native=True)
import onnxruntime as ort
from tests.helpers.onnx_models import colour_distance_model
ort.InferenceSession(colour_distance_model(), providers=["CPUExecutionProvider"])
os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\n")
os.write(2, b"[ WARN:0@0.031] global loadsave.cpp:241 findDecoder imread_('x')\n")
warnings.warn("a library's warning")
print("stdout untouched")
"""


def run(level: str) -> tuple[str, list[dict[str, object]]]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, level],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    return result.stdout, records  # json.loads: every stderr line is JSON, none raw


@pytest.mark.parametrize("level", ["debug", "info"])
def test_native_stderr_and_warnings_become_json_lines(level: str) -> None:
    stdout, records = run(level)
    assert stdout == "stdout untouched\n"
    by_logger: dict[str, list[dict[str, object]]] = {}
    for r in records:
        by_logger.setdefault(str(r["logger"]), []).append(r)
    assert by_logger["native.libpng"][0]["level"] == "warning"
    assert "iCCP" in str(by_logger["native.libpng"][0]["message"])
    assert by_logger["native.opencv"][0]["level"] == "warning"
    assert "a library's warning" in str(by_logger["py.warnings"][0]["message"])
    # onnxruntime's C++ logger follows the level: its info lines only at debug.
    ort_lines = by_logger.get("native.onnxruntime", [])
    if level == "debug":
        assert any("[I:onnxruntime:" in str(r["message"]) for r in ort_lines)
    else:
        assert not ort_lines


def test_native_lines_are_named_after_their_library() -> None:
    assert native_record("2026-01-01 [E:onnxruntime:, x.cc:1 f] boom")[:2] == (
        "native.onnxruntime",
        logging.ERROR,
    )
    assert native_record("\x1b[1;33m[W:onnxruntime:, y] careful\x1b[m")[2] == (
        "[W:onnxruntime:, y] careful"
    )
    assert native_record("[ERROR:0@1.2] global x.cpp something")[:2] == (
        "native.opencv",
        logging.ERROR,
    )
    assert native_record("Corrupt JPEG data: 2 extraneous bytes")[0] == "native.libjpeg"
    assert native_record("something else\n") == ("native.stderr", logging.WARNING, "something else")


def test_key_id_names_a_key_without_revealing_it() -> None:
    assert key_id("abc") == "ba7816bf"  # sha256("abc") starts ba7816bf
    assert presented_key({"x-api-key": "k1", "authorization": "Bearer k2"}) == "k1"
    assert presented_key({"authorization": "bearer  k2 "}) == "k2"
    assert presented_key({"authorization": "Basic k2"}) is None
