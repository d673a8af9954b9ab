"""Structured JSON logs, one object a line, with the request id where there is one.

Never logs image bytes: records carry sizes, reasons and timings only.

The libraries' own messages come here too: Python warnings (PIL's among
them) through ``logging.captureWarnings``; onnxruntime and OpenCV at a
severity that follows the log level; and, with ``capture_native``, whatever
native code writes to file descriptor 2 (onnxruntime's C++ logger, OpenCV's
``[ WARN:...]``, libpng and libjpeg warnings), one JSON line per line, under
a logger named after the library it looks like (``native.onnxruntime``,
``native.opencv``, ``native.libpng``, ``native.libjpeg``, else
``native.stderr``). What cannot be captured so: lines still in the pipe
when the process dies abruptly (a crash, SIGKILL), and messages written to
stdout. Python's own ``sys.stderr`` goes to the real stderr, so a traceback
at a failed start is never lost.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import os
import re
import sys
import threading
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info", capture_native: bool = False) -> None:
    if capture_native:
        _capture_native_stderr()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # Access lines duplicate our own request log, which carries the request id.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn (PIL, numpy, ...) as py.warnings records
    _native_severity(level.lower())


def _native_severity(level: str) -> None:
    """onnxruntime's and OpenCV's own loggers at the severity of ours."""
    import cv2
    import onnxruntime as ort

    # onnxruntime: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. Its info
    # is one line per graph transformation: kept for debug.
    ort.set_default_logger_severity({"debug": 1, "error": 3, "critical": 4}.get(level, 2))
    cvlog = cv2.utils.logging
    cvlog.setLogLevel(
        {
            "debug": cvlog.LOG_LEVEL_INFO,
            "error": cvlog.LOG_LEVEL_ERROR,
            "critical": cvlog.LOG_LEVEL_FATAL,
        }.get(level, cvlog.LOG_LEVEL_WARNING)
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# (pattern, library, level) for a line native code wrote to stderr.
_NATIVE = [
    (re.compile(r"\[([VIWEF]):onnxruntime:"), "onnxruntime", None),
    (re.compile(r"^\[ ?(DEBUG|INFO|WARN|ERROR|FATAL)[:\]]"), "opencv", None),
    (re.compile(r"^libpng (warning|error)"), "libpng", None),
    (re.compile(r"JPEG|^Corrupt |^Invalid SOS|^Premature end"), "libjpeg", logging.WARNING),
]
_LEVELS = {"v": logging.DEBUG, "i": logging.INFO, "w": logging.WARNING, "e": logging.ERROR}
_LEVELS |= {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}
_LEVELS |= {"warning": logging.WARNING, "error": logging.ERROR, "f": logging.CRITICAL}
_LEVELS |= {"fatal": logging.CRITICAL}


def native_record(line: str) -> tuple[str, int, str]:
    """(logger name, level, message) for a line native code wrote to stderr."""
    line = _ANSI.sub("", line).rstrip()
    for pattern, library, fixed in _NATIVE:
        m = pattern.search(line)
        if m:
            level = fixed or _LEVELS.get(m.group(1).lower(), logging.WARNING)
            return f"native.{library}", level, line
    return "native.stderr", logging.WARNING, line


def _capture_native_stderr() -> None:
    """Point fd 2 at a pipe whose lines a thread logs as JSON; Python's
    sys.stderr (and so the JSON handler) keeps the real stderr."""
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all: nothing to capture
        return
    sys.stderr = open(real, "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with open(read_end, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", "replace")
                if text.strip():
                    name, level, message = native_record(text)
                    logging.getLogger(name).log(level, message)

    thread = threading.Thread(target=pump, name="native-stderr", daemon=True)
    thread.start()

    def flush() -> None:
        # fd 2 back to the real stderr closes the pipe: the thread logs what
        # is left in it and ends.
        os.dup2(real, 2)
        thread.join(timeout=2)

    atexit.register(flush)


def log(logger: logging.Logger, level: int, message: str, **fields: object) -> None:
    logger.log(level, message, extra={"fields": fields})
