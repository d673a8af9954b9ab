"""``python -m service`` / ``inspection-server``: the server under uvicorn.

With no settings it serves the embedded default model on 127.0.0.1:8000.
Flags override the INSPECTION_* environment variables (and .env).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from uvicorn.config import STARTUP_FAILURE

from service import logs
from service.decode_budget import limit_opencv_pixels
from service.settings import Settings  # imports no OpenCV: see limit_opencv_pixels


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="inspection-server", description="Run the inspection server.")
    ap.add_argument("--host", help="address to bind (INSPECTION_HOST, default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (INSPECTION_PORT, default 8000)")
    ap.add_argument("--model-dir", type=Path, help="model directory; its newest version is served")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    limit_opencv_pixels(settings.max_pixels)  # before anything imports cv2
    from service.app import create_app
    from service.server import build_server

    # Native libraries' stderr (onnxruntime, OpenCV, libpng, libjpeg) into the JSON log too.
    logs.configure(settings.log_level, capture_native=True)
    app = create_app(settings)
    server = build_server(app, settings)  # header deadline, connection cap, drain on SIGTERM
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C, re-raised by uvicorn after its shutdown
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run does: the model did not load, the port is taken


if __name__ == "__main__":
    main()
