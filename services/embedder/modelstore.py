"""The model store: embedding-model versions addressed by a URI (a local folder by default).

Layout of a store folder::

    <root>/<version>/model.onnx      the network (input "images" [n,3,S,S] float32, output "embeddings" [n,d])
    <root>/<version>/manifest.json   version, parent_version, created_at, architecture, dimension,
                                     preprocessing, training (data, loss, ...), metrics, sha256 (of model.onnx),
                                     files (sha256 of every file)
    <root>/<version>/weights.npz     optional: torch weights for fine-tuning (read by the trainer only)

A version is written into ``<root>/.tmp-<random>/`` and renamed to ``<root>/<version>/`` in one step, so
a reader never sees a half-written version; a crash leaves only a ``.tmp-*`` folder, which listing ignores.
Versions are immutable: publishing an existing id is AlreadyExists.

URIs: a plain path or ``file:///abs/path``. Other schemes are rejected (none is implemented yet).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from trapline.integrity import sha256_file
from trapline.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.npz"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")



def check_version_id(version: str, field: str = "version") -> str:
    if not VERSION_RE.match(version or ""):
        raise InvalidArgument(f"{version!r} is not a version id (letters, digits, '.', '_', '-'; at most 64)",
                              field=field)
    return version


@dataclass(frozen=True)
class StoredVersion:
    """A version in the store: its folder and parsed manifest."""

    path: Path
    manifest: dict

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def weights_path(self) -> Path | None:
        p = self.path / WEIGHTS_FILE
        return p if p.is_file() else None

    @property
    def uri(self) -> str:
        return self.model_path.resolve().as_uri()


class ModelStore:
    """A local-folder model store (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return self.root.resolve().as_uri()

    def versions(self) -> list[StoredVersion]:
        """Complete versions, oldest first (by created_at, then id)."""
        out = []
        for d in self.root.iterdir():
            if d.name.startswith(".") or not (d / MANIFEST_FILE).is_file():
                continue
            try:
                out.append(StoredVersion(d, json.loads((d / MANIFEST_FILE).read_text())))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda v: (v.manifest.get("created_at", 0), v.version))

    def has(self, version: str) -> bool:
        return VERSION_RE.match(version or "") is not None and (self.root / version / MANIFEST_FILE).is_file()

    def get(self, version: str, field: str = "version") -> StoredVersion:
        check_version_id(version, field)
        d = self.root / version
        if not (d / MANIFEST_FILE).is_file():
            known = ", ".join(v.version for v in self.versions()) or "none"
            raise NotFound(f"no model version {version!r} in {self.uri} (known: {known})", field=field)
        return StoredVersion(d, json.loads((d / MANIFEST_FILE).read_text()))

    def verify(self, version: str) -> StoredVersion:
        """Get a version and check its files against the manifest's sha256 sums."""
        v = self.get(version)
        for name, digest in v.manifest.get("files", {MODEL_FILE: v.manifest.get("sha256")}).items():
            if sha256_file(v.path / name) != digest:
                raise FailedPrecondition(f"model version {version!r}: {name} does not match its sha256")
        return v

    def next_version(self, prefix: str = "ft") -> str:
        """The next free id ``<prefix>-0001``, ``<prefix>-0002``, ..."""
        n = 0
        for v in self.versions():
            m = re.match(rf"^{re.escape(prefix)}-(\d+)$", v.version)
            if m:
                n = max(n, int(m.group(1)))
        while self.has(f"{prefix}-{n + 1:04d}"):
            n += 1
        return f"{prefix}-{n + 1:04d}"

    def publish(self, files: Mapping[str, str | Path], manifest: dict) -> StoredVersion:
        """Copy ``files`` (name -> source path; must include model.onnx) in as a new version, atomically."""
        version = check_version_id(manifest.get("version", ""), "manifest.version")
        if MODEL_FILE not in files:
            raise InvalidArgument(f"a version needs {MODEL_FILE}", field="files")
        if self.has(version):
            raise AlreadyExists(f"model version {version!r} already exists in {self.uri}")
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            sums = {}
            for name, src in files.items():
                shutil.copyfile(src, tmp / name)
                sums[name] = sha256_file(tmp / name)
            manifest = {**manifest, "sha256": sums[MODEL_FILE], "files": sums}
            manifest.setdefault("created_at", time.time())
            with open(tmp / MANIFEST_FILE, "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.rename(tmp, self.root / version)  # fails if the target exists and is not empty
            except OSError:
                raise AlreadyExists(f"model version {version!r} already exists in {self.uri}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.get(version)

    def import_folder(self, folder: str | Path) -> StoredVersion:
        """Publish a version folder (model.onnx + manifest.json [+ weights.npz]) kept outside a store."""
        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = {p.name: p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE}
        stored = self.publish(files, manifest)
        if manifest.get("sha256") and stored.manifest["sha256"] != manifest["sha256"]:
            raise FailedPrecondition(f"{folder}: model.onnx does not match its manifest's sha256")
        return stored


def open_store(uri: str | Path) -> ModelStore:
    """A store from a URI: a path or ``file://`` URI (other schemes are InvalidArgument)."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = unquote(parsed.path) if parsed.scheme == "file" else text
        return ModelStore(path)
    raise InvalidArgument(f"model store URI scheme {parsed.scheme!r} is not supported (use a path or file://)",
                          field="model_store")
