"""Helpers for tests: serve an app on a real in-process server on port 0."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from .server import App, RunningServer, bring_up, start_server


@contextlib.asynccontextmanager
async def running_server(app: App[Any], *, ready: bool = True) -> AsyncIterator[RunningServer]:
    """Start ``app`` (port 0 unless its settings say otherwise); run its startup unless ``ready=False``."""
    running = await start_server(app)
    try:
        if ready:
            await bring_up(running)
        yield running
    finally:
        await running.stop(grace=1.0)


@contextlib.asynccontextmanager
async def serve_app(app: App[Any]) -> AsyncIterator[grpc.aio.Channel]:
    """Start ``app``, wait until it is ready, and yield an insecure channel to it."""
    async with running_server(app) as running:
        limit = app.settings.max_message_bytes
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
            yield channel
