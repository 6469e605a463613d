"""A minimal app for testing the runtime itself: EmbedderService whose Embed behaves as the first crop says.

b"ok" -> returns; b"slow:<seconds>" -> sleeps then returns; b"invalid" -> InvalidArgument on a field;
b"missing" -> NotFound; b"crash" -> an unexpected exception; b"big:<bytes>" -> a response of that size.
Run as a process with ``python -m tests.runtime.app_under_test`` (settings prefix TRAPLINE_TESTAPP_).
"""

from __future__ import annotations

import asyncio

from pydantic_settings import SettingsConfigDict

from trapline.api.common.v1 import common_pb2
from trapline.api.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from trapline.runtime import App, Registration, ServiceSettings, errors, run


class ProbeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TRAPLINE_TESTAPP_")
    startup_delay: float = 0.0
    fail_startup: bool = False


class _Servicer(embedder_pb2_grpc.EmbedderServiceServicer):
    async def Embed(self, request, context):  # noqa: N802 - gRPC method name
        command = request.crops[0].decode() if request.crops else "ok"
        if command.startswith("slow:"):
            await asyncio.sleep(float(command.split(":", 1)[1]))
        elif command == "invalid":
            raise errors.InvalidArgument("crop is not an image", field="crops[0]")
        elif command == "missing":
            raise errors.NotFound("model version 'v9' not found")
        elif command == "crash":
            raise RuntimeError("secret internal detail /etc/passwd line 42")
        elif command.startswith("big:"):
            data = b"x" * int(command.split(":", 1)[1])
            return embedder_pb2.EmbedResponse(vectors=common_pb2.Tensor(data=data), model_version="big")
        return embedder_pb2.EmbedResponse(model_version="test")

    async def ListModels(self, request, context):  # noqa: N802
        return embedder_pb2.ListModelsResponse()


class ProbeApp(App[ProbeSettings]):
    def registrations(self):
        return [Registration(_Servicer(), embedder_pb2_grpc.add_EmbedderServiceServicer_to_server,
                             "trapline.embedder.v1.EmbedderService")]

    async def startup(self) -> None:
        await asyncio.sleep(self.settings.startup_delay)
        if self.settings.fail_startup:
            raise FileNotFoundError("model file /models/missing.onnx not found")


def main() -> None:
    run(ProbeApp, ProbeSettings)


if __name__ == "__main__":
    main()
