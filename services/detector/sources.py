"""Where image bytes come from: the request itself, or a URI the service may read.

Only local paths and ``file://`` URIs inside configured root folders are read; anything that resolves
outside them (``..``, symlinks, absolute paths elsewhere) is refused with PermissionDenied. Other schemes
(``s3://``, ``gs://``, ...) plug in as fetchers registered by scheme; none is built in yet.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

from trapline.runtime.errors import InvalidArgument, PermissionDenied

from .decoding import ImageFailure

#: A fetcher reads the bytes behind one URI of its scheme, raising ImageFailure when they cannot be read.
Fetcher = Callable[[str], bytes]


class LocalFiles:
    """Reads local files under a fixed set of root folders."""

    def __init__(self, roots: Iterable[str | Path], max_bytes: int = 256 * 1024 * 1024) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self.max_bytes = max_bytes

    def resolve(self, uri: str, field: str = "uri") -> Path:
        """Path of a local path or file:// URI, checked to lie inside a root (after resolving links)."""
        if uri.startswith("file://"):
            parsed = urlparse(uri)
            if parsed.netloc not in ("", "localhost"):
                raise InvalidArgument(f"file URI with a remote host {parsed.netloc!r} is not supported", field=field)
            raw = unquote(parsed.path)
        else:
            raw = uri
        if not raw or "\x00" in raw:
            raise InvalidArgument("empty or malformed path", field=field)
        if not self.roots:
            raise PermissionDenied("reading images by path is disabled (no image roots configured)", field=field)
        path = Path(raw)
        if not path.is_absolute():
            path = self.roots[0] / path
        resolved = path.resolve()
        if not any(resolved == r or r in resolved.parents for r in self.roots):
            raise PermissionDenied(f"{uri} is outside the configured image roots", field=field)
        return resolved

    def read(self, path: Path) -> bytes:
        try:
            size = os.path.getsize(path)
            if size > self.max_bytes:
                raise ImageFailure(f"Failure image access: file is {size} bytes, over the limit of {self.max_bytes}")
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageFailure("Failure image access: file not found") from None
        except IsADirectoryError:
            raise ImageFailure("Failure image access: path is a folder") from None
        except PermissionError:
            raise ImageFailure("Failure image access: permission denied") from None
        except OSError as exc:
            raise ImageFailure(f"Failure image access: {exc.strerror or type(exc).__name__}") from None


class ImageSources:
    """Turns a URI into a zero-argument reader, validating it up front (so a refused path fails the request
    before any work) and reading it later in a worker."""

    def __init__(self, local: LocalFiles, fetchers: Mapping[str, Fetcher] | None = None) -> None:
        self.local = local
        self.fetchers = dict(fetchers or {})

    def reader(self, uri: str, field: str = "uri") -> Callable[[], bytes]:
        scheme = urlparse(uri).scheme if "://" in uri else ""
        if scheme in ("", "file"):
            path = self.local.resolve(uri, field)
            return lambda: self.local.read(path)
        if scheme in self.fetchers:
            fetch = self.fetchers[scheme]
            return lambda: fetch(uri)
        raise InvalidArgument(
            f"unsupported URI scheme {scheme!r}: use a local path or file:// inside the image roots", field=field
        )
