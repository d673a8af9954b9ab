"""``python -m service`` / ``inspection-server``: the server under uvicorn.

With no settings it serves the embedded default model on 127.0.0.1:8000.
Flags override the INSPECTION_* environment variables (and .env).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from service import logs
from service.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="inspection-server", description="Run the inspection server.")
    ap.add_argument("--host", help="address to bind (INSPECTION_HOST, default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (INSPECTION_PORT, default 8000)")
    ap.add_argument("--model-dir", type=Path, help="model directory; its newest version is served")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logs.configure(settings.log_level)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON logging configured above
        timeout_keep_alive=int(settings.keep_alive_s),
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        access_log=False,
    )


if __name__ == "__main__":
    main()
