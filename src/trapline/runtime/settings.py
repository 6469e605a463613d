"""Typed settings shared by every service (pydantic-settings).

Each service subclasses :class:`ServiceSettings` with its own env prefix, e.g.::

    class DetectorSettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="TRAPLINE_DETECTOR_")
        port: int = 50051

so ``TRAPLINE_DETECTOR_PORT=6000`` overrides the port. Settings are validated at start; an invalid value
stops the service with a message naming the variable (see :func:`load_settings`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class SettingsError(SystemExit):
    """Raised (as a clean exit with status 2) when settings do not validate."""


class ServiceSettings(BaseSettings):
    """Settings every Trapline service has. Subclasses set ``env_prefix`` and add their own fields."""

    model_config = SettingsConfigDict(env_prefix="TRAPLINE_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 to serve other hosts.")
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one (tests).")
    max_message_mb: float = Field(
        64.0, gt=0, le=2047, description="Largest message accepted or sent, MiB (explicit; gRPC's default is 4)."
    )
    grace_seconds: float = Field(10.0, ge=0, description="On SIGTERM, how long in-flight calls may run on.")
    log_level: str = Field("INFO", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    data_dir: Path = Field(
        Path("var"),
        description="Folder for this service's state (stores, model versions, databases). Subclasses set a "
        "per-service default, e.g. var/selector; `trapline up` sets <data-dir>/<service>.",
    )

    # Transport security (off by default: services listen on localhost).
    tls_cert_file: Path | None = Field(None, description="PEM server certificate; enables TLS with tls_key_file.")
    tls_key_file: Path | None = Field(None, description="PEM private key of the server certificate.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."
    )

    # Bearer-token check (off by default). Health and reflection stay open.
    auth_tokens: str = Field("", description="Comma-separated accepted bearer tokens.", repr=False)
    auth_tokens_file: Path | None = Field(None, description="File with one accepted bearer token per line.")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * MiB)

    @model_validator(mode="after")
    def _check_tls_and_auth(self) -> "ServiceSettings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self

    def accepted_tokens(self) -> frozenset[str]:
        """The bearer tokens to accept; empty means the check is off."""
        tokens = {t.strip() for t in self.auth_tokens.split(",") if t.strip()}
        if self.auth_tokens_file is not None:
            lines = Path(self.auth_tokens_file).read_text().splitlines()
            tokens.update(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        return frozenset(tokens)


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build settings from the environment (plus overrides); on error exit with a message naming the variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        lines = [f"invalid settings for {cls.__name__}:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(settings)"
            var = f"{prefix}{loc}".upper() if err["loc"] else prefix + "*"
            lines.append(f"  {var}: {err['msg']}")
        raise SettingsError("\n".join(lines)) from None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
