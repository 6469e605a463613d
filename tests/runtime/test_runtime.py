"""The shared runtime, on a real in-process server on port 0 (and a real process for SIGTERM)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from trapline.api.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from trapline.runtime import SettingsError, load_settings
from trapline.runtime.testing import running_server, serve_app

from .app_under_test import ProbeApp, ProbeSettings

REPO = Path(__file__).resolve().parents[2]
SERVICE = "trapline.embedder.v1.EmbedderService"


def make_app(**overrides) -> ProbeApp:
    return ProbeApp(ProbeSettings(port=0, **overrides))


async def embed(channel, command: bytes, metadata=None, **kw):
    stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
    return await stub.Embed(embedder_pb2.EmbedRequest(crops=[command]), metadata=metadata, **kw)


async def health_status(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_is_not_serving_until_startup_returns_then_serving():
    app = make_app()
    async with running_server(app, ready=False) as running:
        async with grpc.aio.insecure_channel(running.address) as channel:
            assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await embed(channel, b"ok")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, "calls before readiness must be UNAVAILABLE"
            from trapline.runtime import bring_up

            await bring_up(running)
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert await health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
            assert (await embed(channel, b"ok")).model_version == "test"


async def test_reflection_lists_the_service_health_and_reflection():
    async with serve_app(make_app()) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for response in responses:
            names |= {s.name for s in response.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_unexpected_exception_is_internal_with_generic_message_and_logged(caplog):
    caplog.set_level(logging.ERROR, logger="trapline.runtime")
    async with serve_app(make_app()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embed(channel, b"crash")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    assert "secret" not in err.value.details() and "Traceback" not in (err.value.debug_error_string() or "")
    assert "secret internal detail" in caplog.text, "the server log must keep the details"


async def test_invalid_argument_names_the_field_in_message_and_rich_details():
    async with serve_app(make_app()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embed(channel, b"invalid")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "crops[0]: crop is not an image"
    trailers = dict(err.value.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "crops[0]"


async def test_not_found_maps_to_not_found():
    async with serve_app(make_app()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embed(channel, b"missing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "v9" in err.value.details()


async def test_oversized_request_and_response_are_resource_exhausted():
    async with serve_app(make_app(max_message_mb=1)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embed(channel, b"x" * (2 * 1024 * 1024))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with running_server(make_app(max_message_mb=1)) as running:
        async with grpc.aio.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await embed(channel, f"big:{3 * 1024 * 1024}".encode())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_request_id_from_metadata_is_on_the_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="trapline.runtime")
    from trapline.runtime.logs import RequestIdFilter

    caplog.handler.addFilter(RequestIdFilter())
    async with serve_app(make_app()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embed(channel, b"missing", metadata=(("x-request-id", "req-abc123"),))
    assert dict(err.value.trailing_metadata())["x-request-id"] == "req-abc123"
    records = [r for r in caplog.records if "NOT_FOUND" in r.getMessage()]
    assert records and records[0].request_id == "req-abc123"


async def test_bearer_token_required_when_configured_but_health_stays_open(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("# accepted tokens\nfile-token\n")
    app = make_app(auth_tokens="env-token", auth_tokens_file=token_file)
    async with running_server(app) as running:
        async with grpc.aio.insecure_channel(running.address) as channel:
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            for metadata in (None, (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await embed(channel, b"ok", metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for token in ("env-token", "file-token"):
                ok = await embed(channel, b"ok", metadata=(("authorization", f"Bearer {token}"),))
                assert ok.model_version == "test"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=d)
    return d


async def test_tls_serves_encrypted_and_refuses_plaintext(pki):
    app = make_app(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key")
    async with running_server(app) as running:
        creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{running.port}", creds) as channel:
            assert (await embed(channel, b"ok")).model_version == "test"
        async with grpc.aio.insecure_channel(f"localhost:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await embed(channel, b"ok", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(pki):
    app = make_app(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                   tls_client_ca_file=pki / "ca.pem")
    ca = (pki / "ca.pem").read_bytes()
    async with running_server(app) as running:
        target = f"localhost:{running.port}"
        with_cert = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes())
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            assert (await embed(channel, b"ok")).model_version == "test"
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await embed(channel, b"ok", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_invalid_settings_fail_at_start_naming_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAPLINE_TESTAPP_PORT", "not-a-port")
    with pytest.raises(SettingsError) as err:
        load_settings(ProbeSettings)
    assert "TRAPLINE_TESTAPP_PORT" in str(err.value)
    monkeypatch.delenv("TRAPLINE_TESTAPP_PORT")
    with pytest.raises(SettingsError) as err:
        load_settings(ProbeSettings, tls_cert_file=tmp_path / "missing.pem", tls_key_file=tmp_path / "k.pem")
    assert "no such file" in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "tests.runtime.app_under_test"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "TRAPLINE_TESTAPP_MAX_MESSAGE_MB": "-3"}, timeout=60)
    assert proc.returncode == 2
    assert "TRAPLINE_TESTAPP_MAX_MESSAGE_MB" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sigterm_lets_in_flight_call_finish_and_refuses_new_ones():
    port = _free_port()
    env = {**os.environ, "TRAPLINE_TESTAPP_PORT": str(port), "TRAPLINE_TESTAPP_GRACE_SECONDS": "10",
           "TRAPLINE_TESTAPP_STARTUP_DELAY": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.app_under_test"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if await health_status(channel) == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, "server never became SERVING"
                await asyncio.sleep(0.1)
            in_flight = asyncio.ensure_future(embed(channel, b"slow:2"))
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await embed(channel, b"ok", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (await in_flight).model_version == "test", "the in-flight call must complete"
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read().decode()
        assert "shutting down" in out and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_failed_startup_exits_1_with_the_reason_and_no_loop_noise():
    env = {**os.environ, "TRAPLINE_TESTAPP_PORT": str(_free_port()), "TRAPLINE_TESTAPP_FAIL_STARTUP": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.runtime.app_under_test"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "could not start: model file /models/missing.onnx not found" in out
    assert "Event loop is closed" not in out
