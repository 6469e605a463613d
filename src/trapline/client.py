"""Client-side helpers: channels with the same size limits, TLS and bearer token options as the servers."""

from __future__ import annotations

from pathlib import Path

import grpc

MiB = 1024 * 1024


def channel_options(max_message_mb: float = 64.0) -> list[tuple[str, int]]:
    limit = int(max_message_mb * MiB)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def _credentials(tls_ca: Path | None, token: str | None, client_cert: Path | None = None,
                 client_key: Path | None = None) -> grpc.ChannelCredentials | None:
    if tls_ca is None and token is None:
        return None
    if tls_ca is None:
        raise ValueError("a bearer token is only sent over TLS; give the server's CA as well")
    creds = grpc.ssl_channel_credentials(
        tls_ca.read_bytes(),
        client_key.read_bytes() if client_key else None,
        client_cert.read_bytes() if client_cert else None,
    )
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def aio_channel(address: str, *, tls_ca: Path | None = None, token: str | None = None,
                client_cert: Path | None = None, client_key: Path | None = None,
                max_message_mb: float = 64.0) -> grpc.aio.Channel:
    """An asyncio channel. Plain text unless ``tls_ca`` is given; a token without TLS goes as metadata
    by the caller (see :func:`auth_metadata`), which is only acceptable on localhost."""
    creds = _credentials(tls_ca, token if tls_ca else None, client_cert, client_key)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=channel_options(max_message_mb))
    return grpc.aio.secure_channel(address, creds, options=channel_options(max_message_mb))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
