"""The embedder service: a thin gRPC layer over :mod:`trapline.embedder.engine` (ONNX Runtime, no torch).

Settings (env prefix ``TRAPLINE_EMBEDDER_``, see :class:`EmbedderSettings`): port, data_dir, model_store
(URI of the model store shared with the trainer), model_version, device, threads, batch_size.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from trapline.api.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from trapline.defaults import PORTS
from trapline.runtime import App, Registration, ServiceSettings, run
from trapline.runtime.errors import InvalidArgument, ResourceExhausted

from .engine import Embedder
from .modelstore import ModelStore, StoredVersion, open_store
from .tensors import to_tensor

log = logging.getLogger("trapline.embedder")

#: Versions shipped with the code (the default model); seeded into an empty store at start.
BUNDLED = Path(__file__).parent / "default_model"
DEFAULT_VERSION = "lite0-triplet-v1"


class EmbedderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TRAPLINE_EMBEDDER_", extra="ignore", validate_default=True)

    port: int = Field(PORTS["embedder"], ge=0, le=65535)
    data_dir: Path = Field(Path("var/embedder"), description="Embedder state (the active version).")
    model_store: str = Field(
        "", description="URI of the model store (a folder or file:// URI) shared with the trainer; "
        "empty: <data_dir>/../models, which is what `trapline up` gives both services.")
    model_version: str = Field("", description="Version to activate at start; empty: the last one activated, "
                               f"else the bundled default ({DEFAULT_VERSION}).")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="auto: CUDA when ONNX Runtime has it.")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0: its default.")
    batch_size: int = Field(64, ge=1, le=1024, description="Crops per ONNX Runtime call.")
    max_crops: int = Field(2048, ge=1, description="Most crops accepted in one Embed request.")
    seed_bundled: bool = Field(True, description="Copy the bundled default model into the store when missing.")

    def store_uri(self) -> str:
        return self.model_store or str(Path(self.data_dir).parent / "models")


def seed_bundled(store: ModelStore, bundled: Path = BUNDLED) -> list[str]:
    """Publish bundled versions that the store lacks (atomic, so concurrent starts are safe)."""
    added = []
    if not bundled.is_dir():
        return added
    for folder in sorted(p for p in bundled.iterdir() if (p / "manifest.json").is_file()):
        if not store.has(folder.name):
            try:
                store.import_folder(folder)
                added.append(folder.name)
            except Exception as exc:  # AlreadyExists from a concurrent start is fine
                log.info("bundled version %s not imported: %s", folder.name, exc)
    return added


def version_message(v: StoredVersion, active: str) -> embedder_pb2.ModelVersion:
    m = v.manifest
    metrics = {k: float(x) for k, x in (m.get("metrics") or {}).items() if isinstance(x, (int, float))}
    return embedder_pb2.ModelVersion(
        version=v.version, parent_version=m.get("parent_version", ""), dimension=int(m.get("dimension", 0)),
        loss=str((m.get("training") or {}).get("loss", "")), sha256=m.get("sha256", ""), active=v.version == active,
        uri=v.uri, metrics=metrics)


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self, app: "EmbedderApp") -> None:
        self.app = app

    async def Embed(self, request, context):  # noqa: N802 - gRPC method name
        crops = list(request.crops)
        if not crops:
            raise InvalidArgument("no crops: send at least one encoded crop", field="crops")
        if len(crops) > self.app.settings.max_crops:
            raise ResourceExhausted(f"{len(crops)} crops in one request; the limit is {self.app.settings.max_crops}",
                                    field="crops")
        vectors, version = await asyncio.to_thread(self.app.embedder.embed, crops, request.model_version)
        return embedder_pb2.EmbedResponse(vectors=to_tensor(vectors), model_version=version)

    async def ListModels(self, request, context):  # noqa: N802
        versions = await asyncio.to_thread(self.app.store.versions)
        active = self.app.embedder.active.version if self.app.embedder.active else ""
        return embedder_pb2.ListModelsResponse(models=[version_message(v, active) for v in versions])

    async def LoadModel(self, request, context):  # noqa: N802
        if not request.version:
            raise InvalidArgument("name the version to load", field="version")
        model = await asyncio.to_thread(self.app.activate, request.version)
        return embedder_pb2.LoadModelResponse(model=version_message(model.stored, model.version),
                                              providers=model.providers)


class EmbedderApp(App[EmbedderSettings]):
    store: ModelStore
    embedder: Embedder

    def registrations(self):
        return [Registration(EmbedderServicer(self), embedder_pb2_grpc.add_EmbedderServiceServicer_to_server,
                             "trapline.embedder.v1.EmbedderService")]

    @property
    def state_file(self) -> Path:
        return Path(self.settings.data_dir) / "active.json"

    def activate(self, version: str):
        model = self.embedder.load(version)
        state = Path(self.settings.data_dir)
        state.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": version}))
        tmp.replace(self.state_file)
        return model

    def _start(self) -> None:
        s = self.settings
        self.store = open_store(s.store_uri())
        if s.seed_bundled:
            seed_bundled(self.store)
        self.embedder = Embedder(self.store, device=s.device, threads=s.threads, batch_size=s.batch_size)
        version = s.model_version
        if not version and self.state_file.is_file():
            version = json.loads(self.state_file.read_text()).get("version", "")
        version = version or (DEFAULT_VERSION if self.store.has(DEFAULT_VERSION) else "")
        if not version and self.store.versions():
            version = self.store.versions()[-1].version
        if not version:
            raise RuntimeError(f"model store {self.store.uri} is empty and no bundled model was found")
        model = self.activate(version)
        log.info("embedder ready: %s from %s on %s", version, self.store.uri, model.providers)

    async def startup(self) -> None:
        await asyncio.to_thread(self._start)


def main() -> None:
    run(EmbedderApp, EmbedderSettings)


if __name__ == "__main__":
    main()
