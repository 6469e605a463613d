"""What every CLI command shares: connection options and turning gRPC errors into advice, never tracebacks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from ..client import aio_channel, auth_metadata
from ..defaults import PORTS

HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is the service running? Start everything with `trapline up` (or check the address).",
    grpc.StatusCode.UNAUTHENTICATED: "pass the service's bearer token with --token.",
    grpc.StatusCode.NOT_FOUND: "check the id; `trapline status` lists what exists.",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the service is slow or stuck; its log says more.",
}


class CommandError(Exception):
    """An error for people: printed as one line with what to do next; exit status 1."""


def add_connection_args(parser: argparse.ArgumentParser, service: str = "orchestrator") -> None:
    parser.add_argument("--address", default=f"127.0.0.1:{PORTS[service]}",
                        help=f"{service} address (default 127.0.0.1:{PORTS[service]})")
    parser.add_argument("--token", default=None, help="bearer token, if the service requires one")
    parser.add_argument("--tls-ca", type=Path, default=None, help="CA certificate, if the service uses TLS")


def channel(args: argparse.Namespace) -> grpc.aio.Channel:
    return aio_channel(args.address, tls_ca=args.tls_ca, token=args.token if args.tls_ca else None)


def metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return () if args.tls_ca else auth_metadata(args.token)


def explain(exc: grpc.aio.AioRpcError) -> str:
    hint = HINTS.get(exc.code(), "")
    return f"{exc.code().name.lower().replace('_', ' ')}: {exc.details()}" + (f" ({hint})" if hint else "")


def progress_bar(done: int, total: int, width: int = 30, label: str = "") -> None:
    if not sys.stderr.isatty() and done < total:
        return
    frac = done / total if total else 0.0
    bar = "#" * int(frac * width)
    end = "\n" if total and done >= total else "\r"
    sys.stderr.write(f"{label}[{bar:<{width}}] {done}/{total or '?'}{end}")
    sys.stderr.flush()
