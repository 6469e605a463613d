"""trapline: the command line for people.

  trapline up [--data-dir DIR]              start every service as a local process; Ctrl-C stops them all
  trapline health [HOST:PORT ...]           health of every service behind each address
  trapline ingest PROJECT SOURCE [--create] ingest a folder, a MegaDetector JSON or a COCO Camera Traps JSON
  trapline status [PROJECT]                 a project's progress, or the list of projects
  trapline label PROJECT                    label crops in the terminal
  trapline export PROJECT -o FILE           MegaDetector JSON (Timelapse, AddaxAI), COCO Camera Traps or CSV
  trapline simulate FEATURES.npz|COCO.json  the paper's experiments: strategies x seeds, oracle from ground truth
  trapline demo                             the whole system on the real sample frames
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ..client import aio_channel, auth_metadata
from ..defaults import PORTS
from . import experiments, portal
from ._common import CommandError

INFRA = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
STATUS_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


async def _services(channel: grpc.aio.Channel, timeout: float) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                     timeout=timeout)
    names: list[str] = []
    async for response in call:
        names.extend(s.name for s in response.list_services_response.service if s.name not in INFRA)
    return sorted(names)


async def _health_of(address: str, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    async with aio_channel(address, tls_ca=args.tls_ca, token=args.token if args.tls_ca else None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        meta = () if args.tls_ca else auth_metadata(args.token)
        try:
            names = await _services(channel, args.timeout)
        except grpc.aio.AioRpcError as exc:
            return [(address, "-", f"UNREACHABLE ({exc.code().name.lower()}: {exc.details()})")]
        for name in names or [""]:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=args.timeout,
                                            metadata=meta)
                status = STATUS_NAMES.get(response.status, str(response.status))
            except grpc.aio.AioRpcError as exc:
                status = f"{exc.code().name} ({exc.details()})"
            rows.append((address, name or "(server)", status))
    return rows


async def _health(args: argparse.Namespace) -> int:
    addresses = args.addresses or [f"127.0.0.1:{port}" for port in PORTS.values()]
    results = await asyncio.gather(*(_health_of(a, args) for a in addresses))
    rows = [row for rs in results for row in rs]
    widths = [max(len(r[i]) for r in rows + [("ADDRESS", "SERVICE", "STATUS")]) for i in range(3)]
    for row in [("ADDRESS", "SERVICE", "STATUS"), *rows]:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths)).rstrip())
    return 0 if all(r[2] == "SERVING" for r in rows) else 1


async def _up(args: argparse.Namespace) -> int:
    from ..local import LocalStack, available_services

    services = args.services or available_services()
    if not services:
        print("trapline up: no service is installed yet (pip install -e '.[all]')", file=sys.stderr)
        return 2
    stack = LocalStack(data_dir=args.data_dir.resolve(), services=services)
    print(f"starting {', '.join(services)} (data and logs in {stack.data_dir})", flush=True)
    stack.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stack.wait_serving(timeout=args.timeout)
        for service in services:
            print(f"  {service:<13} {stack.address(service):<18} SERVING")
        if args.check:
            return 0
        print("all services SERVING; Ctrl-C stops them", flush=True)
        await stop.wait()
        return 0
    except RuntimeError as exc:
        print(f"trapline up: {exc}", file=sys.stderr)
        return 1
    finally:
        codes = stack.stop()
        bad = {s: c for s, c in codes.items() if c not in (0, -signal.SIGTERM)}
        print("stopped" + (f" (non-zero exits: {bad})" if bad else ""), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trapline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    health = sub.add_parser("health", help="print the health of every service behind each address")
    health.add_argument("addresses", nargs="*", metavar="HOST:PORT",
                        help="default: " + " ".join(f"127.0.0.1:{p}" for p in PORTS.values()))
    health.add_argument("--timeout", type=float, default=3.0, help="seconds per call (default 3)")
    health.add_argument("--tls-ca", type=Path, default=None, help="CA of the servers' TLS certificates")
    health.add_argument("--token", default=None, help="bearer token (sent over TLS when --tls-ca is given)")
    health.set_defaults(func=_health)

    up = sub.add_parser("up", help="start every service as a local process (embedded Qdrant, local stores)")
    up.add_argument("--data-dir", type=Path, default=Path("var/trapline"), help="state and logs (default var/trapline)")
    up.add_argument("--services", nargs="*", default=None, help="subset to start (default: all installed)")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for SERVING (default 300)")
    up.add_argument("--check", action="store_true", help="start, wait until every service is SERVING, then stop")
    up.set_defaults(func=_up)

    portal.register(sub)
    experiments.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "sync", False):
            return args.func(args)
        return portal.run(args.func, args)
    except KeyboardInterrupt:
        return 130
    except CommandError as exc:
        print(f"trapline {args.command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"trapline {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
