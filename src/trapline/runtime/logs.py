"""Logging with a request id on every line.

The interceptor stores the id of the call being served in a context variable; a logging filter puts it
on every record (``-`` outside a call), so one grep follows a request through a service's log.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trapline_request_id", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the current context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def configure(level: str = "INFO") -> None:
    """Configure the root logger once per process (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if getattr(handler, "_trapline", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._trapline = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
