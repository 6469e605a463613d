"""The one service runtime: every Trapline service is an :class:`App` served by :func:`serve`.

What every service gets from here, with no code of its own:

* a ``grpc.aio`` server with explicit message-size limits;
* the standard ``grpc.health.v1`` service: NOT_SERVING from the moment the port opens until
  :meth:`App.startup` returns (models loaded, stores open), SERVING after, NOT_SERVING again on shutdown;
* server reflection (``grpcurl -plaintext HOST:PORT list``);
* the error/request-id interceptor and, when tokens are configured, the bearer-token interceptor;
* optional TLS or mutual TLS;
* graceful shutdown on SIGTERM/SIGINT: health flips to NOT_SERVING, new calls are refused, in-flight
  calls get ``grace_seconds`` to finish, then :meth:`App.shutdown` runs.

A service module then reads like this::

    class DetectorApp(App):
        async def startup(self): self.model = await asyncio.to_thread(load, self.settings.model_path)
        def registrations(self): return [Registration(DetectorServicer(self), add_..._to_server, NAME)]

    def main(): run(DetectorApp, DetectorSettings)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from . import logs
from .interceptors import AuthInterceptor, ErrorInterceptor
from .settings import ServiceSettings, SettingsError, load_settings

log = logging.getLogger("trapline.runtime")

S = TypeVar("S", bound=ServiceSettings)


class StartupError(RuntimeError):
    """The app's startup failed (a model or store could not be loaded); the process exits with status 1."""


@dataclass(frozen=True)
class Registration:
    """One gRPC service an app exposes: its servicer, the generated ``add_*_to_server`` and its full name."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    full_name: str  # e.g. "trapline.detector.v1.DetectorService"


class App(Generic[S]):
    """Base class of a Trapline service. Subclasses load their models/stores in :meth:`startup`."""

    def __init__(self, settings: S) -> None:
        self.settings = settings
        self.ready = False

    def registrations(self) -> Sequence[Registration]:
        raise NotImplementedError

    async def startup(self) -> None:
        """Load models, open stores. Health says SERVING only after this returns. Run blocking parts in threads."""

    async def shutdown(self) -> None:
        """Release resources after in-flight calls have finished."""


@dataclass
class RunningServer:
    """A started server: its address, the bound port, and handles tests and :func:`serve` use."""

    server: grpc.aio.Server
    app: App[Any]
    port: int
    address: str
    health: health_aio.HealthServicer
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace``, then shutdown."""
        grace = self.app.settings.grace_seconds if grace is None else grace
        self.app.ready = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.app.shutdown()


def _credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key = settings.tls_key_file.read_bytes()
    cert = settings.tls_cert_file.read_bytes()
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def start_server(app: App[Any]) -> RunningServer:
    """Build and start the server for ``app`` with health NOT_SERVING; does not run ``app.startup()``."""
    settings = app.settings
    interceptors: list[grpc.aio.ServerInterceptor] = []
    tokens = settings.accepted_tokens()
    if tokens:
        interceptors.append(AuthInterceptor(tokens))
    interceptors.append(ErrorInterceptor(lambda: app.ready))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    registrations = list(app.registrations())
    for reg in registrations:
        reg.add_to_server(reg.servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(reg.full_name for reg in registrations)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    credentials = _credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    running = RunningServer(server, app, port, f"{settings.host}:{port}", health, names)
    await running.set_serving(False)
    await server.start()
    return running


async def bring_up(running: RunningServer) -> None:
    """Run the app's startup, then mark it ready and SERVING."""
    await running.app.startup()
    running.app.ready = True
    await running.set_serving(True)


async def serve(app: App[Any], *, stop_event: asyncio.Event | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (or ``stop_event``), then shut down gracefully."""
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    running = await start_server(app)
    log.info("%s listening on %s (tls=%s, auth=%s)", type(app).__name__, running.address,
             app.settings.tls_cert_file is not None, bool(app.settings.accepted_tokens()))
    startup = asyncio.create_task(bring_up(running))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({startup, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if startup in done:
        if startup.exception() is not None:  # a failed startup ends the process with its error
            stopper.cancel()
            await running.server.stop(0)
            raise StartupError(f"{type(app).__name__} could not start: {startup.exception()}") from startup.exception()
        log.info("%s ready: SERVING", type(app).__name__)
        await stopper
    else:
        startup.cancel()
    log.info("shutting down: refusing new calls, %.1fs grace for in-flight ones", app.settings.grace_seconds)
    await running.stop()
    log.info("stopped")


def run(app_cls: Callable[[S], App[S]], settings_cls: type[S], argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: load settings (exit 2 with a clear message if invalid), then serve."""
    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(exc, flush=True)
        raise SystemExit(2) from None
    logs.configure(settings.log_level)
    try:
        asyncio.run(serve(app_cls(settings)))
    except KeyboardInterrupt:  # pragma: no cover - signal handler normally catches it
        pass
    except StartupError as exc:
        log.error("%s", exc, exc_info=exc.__cause__)
        raise SystemExit(1) from None
