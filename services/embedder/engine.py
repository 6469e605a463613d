"""The embedding engine on ONNX Runtime (never torch): crops in, L2-normalized float32 vectors out.

``OnnxEmbeddingModel`` wraps one version's session. ``Embedder`` holds the active version and a small
cache of loaded ones; :meth:`Embedder.load` switches the active version by swapping one reference, so
a call that already picked its model finishes on it (the old session lives until its last user is done).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from trapline.runtime.errors import FailedPrecondition, InvalidArgument

from .modelstore import ModelStore, StoredVersion
from .preprocess import preprocess_batch

log = logging.getLogger("trapline.embedder")


#: Set once a session asked for CUDA and did not get it (libraries missing): later sessions ask for CPU only.
_cuda_unusable = False


def choose_providers(device: str = "auto") -> list[str]:
    """CUDA first when ONNX Runtime offers it (and ``device`` allows), always CPU as the fallback."""
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available and not _cuda_unusable:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("CUDA requested but ONNX Runtime offers only %s; using CPU", available)
    return ["CPUExecutionProvider"]


class OnnxEmbeddingModel:
    """One model version on ONNX Runtime. ``run`` is thread-safe (ORT sessions are)."""

    def __init__(self, stored: StoredVersion, *, device: str = "auto", threads: int = 0, batch_size: int = 64) -> None:
        self.stored = stored
        self.manifest = stored.manifest
        self.version = stored.version
        self.preprocessing = self.manifest["preprocessing"]
        self.dimension = int(self.manifest.get("dimension", 256))
        self.batch_size = batch_size
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(stored.model_path), opts, providers=choose_providers(device))
        except Exception as exc:
            # CUDA present but unusable (driver, memory): fall back to the CPU rather than refuse to serve.
            log.warning("could not create session with CUDA (%s); retrying on CPU", exc)
            self.session = ort.InferenceSession(str(stored.model_path), opts, providers=["CPUExecutionProvider"])
        #: What the session really uses (get_providers), not what was asked for.
        self.providers: list[str] = self.session.get_providers()
        global _cuda_unusable
        if "CUDAExecutionProvider" in choose_providers(device) and not self.on_cuda:
            _cuda_unusable = True
            log.warning("ONNX Runtime lists CUDA but could not use it (see its message above); running on CPU")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def on_cuda(self) -> bool:
        return "CUDAExecutionProvider" in self.providers

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, 3, S, S] -> L2-normalized float32 [n, dimension], in batches of ``batch_size``."""
        out = np.empty((len(batch), self.dimension), np.float32)
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.session.run([self.output_name], {self.input_name: chunk})[0]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed(self, crops: Sequence[bytes]) -> np.ndarray:
        """Encoded crops -> vectors; InvalidArgument for an empty batch or a crop that is not an image."""
        if len(crops) == 0:
            raise InvalidArgument("no crops: send at least one encoded crop", field="crops")
        return self.run(preprocess_batch(crops, self.preprocessing))


class Embedder:
    """Active version + a cache of loaded versions from one model store."""

    def __init__(self, store: ModelStore, *, device: str = "auto", threads: int = 0, batch_size: int = 64,
                 cache_size: int = 2) -> None:
        self.store = store
        self.device = device
        self.threads = threads
        self.batch_size = batch_size
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[str, OnnxEmbeddingModel] = OrderedDict()
        self._lock = threading.Lock()
        self._active: OnnxEmbeddingModel | None = None

    @property
    def active(self) -> OnnxEmbeddingModel | None:
        return self._active

    def model(self, version: str = "") -> OnnxEmbeddingModel:
        """The active model (``version`` empty) or a named one, loaded on first use (NotFound if unknown)."""
        active = self._active
        if not version or (active is not None and active.version == version):
            if active is None:
                raise FailedPrecondition("no active model version; LoadModel one first")
            return active
        return self._get(version, field="model_version")

    def _get(self, version: str, field: str = "version") -> OnnxEmbeddingModel:
        with self._lock:
            cached = self._cache.get(version)
            if cached is not None:
                self._cache.move_to_end(version)
                return cached
        stored = self.store.verify(version) if self.store.has(version) else self.store.get(version, field)
        model = OnnxEmbeddingModel(stored, device=self.device, threads=self.threads, batch_size=self.batch_size)
        with self._lock:
            self._cache[version] = model
            while len(self._cache) > self.cache_size:
                old, _ = self._cache.popitem(last=False)  # callers still holding it finish on it
                log.info("evicted model %s from the cache", old)
        return model

    def load(self, version: str) -> OnnxEmbeddingModel:
        """Make ``version`` active. The previous model object stays valid for calls already using it."""
        model = self._get(version)
        self._active = model  # one reference swap: atomic for every reader
        log.info("active model version: %s (providers %s)", version, model.providers)
        return model

    def embed(self, crops: Sequence[bytes], version: str = "") -> tuple[np.ndarray, str]:
        model = self.model(version)  # picked once: a switch during this call does not affect it
        return model.embed(crops), model.version
