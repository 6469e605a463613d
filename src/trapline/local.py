"""Run the five services as local processes on one machine (what ``trapline up`` does).

Each service is its own process with its own port and data folder, configured only through its
documented environment variables, exactly as a deployment would run it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .defaults import PORTS

ORDER = ("detector", "embedder", "selector", "trainer", "orchestrator")


def available_services() -> list[str]:
    """Services whose server module is installed (all five once every issue has landed)."""
    return [s for s in ORDER if importlib.util.find_spec(f"trapline.{s}.server") is not None]


@dataclass
class LocalStack:
    data_dir: Path
    services: list[str] = field(default_factory=available_services)
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(PORTS))
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def address(self, service: str) -> str:
        return f"{self.host}:{self.ports[service]}"

    def env_for(self, service: str) -> dict[str, str]:
        prefix = f"TRAPLINE_{service.upper()}_"
        env = {**os.environ, **self.extra_env}
        env[prefix + "HOST"] = self.host
        env[prefix + "PORT"] = str(self.ports[service])
        env[prefix + "DATA_DIR"] = str(self.data_dir / service)
        if service == "orchestrator":
            for other in ORDER[:-1]:
                env[f"{prefix}{other.upper()}_ADDRESS"] = self.address(other)
        return env

    def start(self) -> None:
        log_dir = self.log_dir or self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for service in self.services:
            (self.data_dir / service).mkdir(parents=True, exist_ok=True)
            log = open(log_dir / f"{service}.log", "ab")
            self.procs[service] = subprocess.Popen(
                [sys.executable, "-c", f"from trapline.{service}.server import main; main()"],
                env=self.env_for(service), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    async def wait_serving(self, timeout: float = 300.0, on_wait=None) -> dict[str, str]:
        """Wait until every service says SERVING; raise RuntimeError naming any that died or timed out."""
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {s: "STARTING" for s in self.services}
        while True:
            for service in self.services:
                if status[service] == "SERVING":
                    continue
                proc = self.procs[service]
                if proc.poll() is not None:
                    raise RuntimeError(f"{service} exited with status {proc.returncode}; see its log in "
                                       f"{(self.log_dir or self.data_dir / 'logs') / (service + '.log')}")
                status[service] = await _check(self.address(service))
            if on_wait:
                on_wait(status)
            if all(v == "SERVING" for v in status.values()):
                return status
            if time.monotonic() > deadline:
                late = [s for s, v in status.items() if v != "SERVING"]
                raise RuntimeError(f"not SERVING after {timeout:.0f}s: {', '.join(late)}")
            await asyncio.sleep(0.5)

    def stop(self, grace: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every service (graceful shutdown), SIGKILL what is still running after ``grace``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        codes: dict[str, int | None] = {}
        for service, proc in self.procs.items():
            try:
                codes[service] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[service] = proc.wait()
        return codes


async def _check(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return "STARTING"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def free_ports() -> dict[str, int]:
    """A free port per service (tests and the demo run beside whatever already uses the defaults)."""
    import socket

    socks = []
    ports = {}
    for service in ORDER:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports[service] = s.getsockname()[1]
    for s in socks:
        s.close()
    return ports
