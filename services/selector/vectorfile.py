"""An appendable float32 ``.npy`` file, memory-mapped for selection (one per embedding version).

The header has a fixed size (128 bytes), so appending rows only rewrites the shape in place; ``np.load(path,
mmap_mode="r")`` reads the file like any other ``.npy``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HEADER = 128


def _header(rows: int, dim: int) -> bytes:
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    pad = HEADER - 10 - len(text) - 1
    return b"\x93NUMPY\x01\x00" + (HEADER - 10).to_bytes(2, "little") + (text + " " * pad + "\n").encode()


class VectorFile:
    def __init__(self, path: Path, dim: int) -> None:
        self.path = Path(path)
        self.dim = dim
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(_header(0, dim))
        arr = np.load(self.path, mmap_mode="r") if self.rows_on_disk() else None
        if arr is not None and arr.shape[1] != dim:
            raise ValueError(f"{self.path}: dimension {arr.shape[1]}, expected {dim}")
        self.rows = self.rows_on_disk()
        self._map: np.ndarray | None = None

    def rows_on_disk(self) -> int:
        with open(self.path, "rb") as fh:
            head = fh.read(HEADER)
        if len(head) < HEADER or not head.startswith(b"\x93NUMPY"):
            return 0
        shape = head.decode("latin1").split("'shape': (")[1].split(")")[0]
        return int(shape.split(",")[0])

    def write(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Write ``vectors`` at row indices ``rows`` (new rows must extend the file contiguously)."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        end = max(self.rows, int(rows.max()) + 1) if len(rows) else self.rows
        with open(self.path, "r+b") as fh:
            order = np.argsort(rows, kind="stable")
            rows, vectors = rows[order], vectors[order]
            if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1:  # one contiguous block (appends)
                fh.seek(HEADER + int(rows[0]) * self.dim * 4)
                fh.write(vectors.tobytes())
            else:
                for r, v in zip(rows, vectors):
                    fh.seek(HEADER + int(r) * self.dim * 4)
                    fh.write(v.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek(0)
            fh.write(_header(end, self.dim))
            fh.flush()
            os.fsync(fh.fileno())
        self.rows = end
        self._map = None

    def write_all(self, vectors: np.ndarray) -> None:
        """Replace the whole file (rebuild from the store)."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(_header(len(vectors), self.dim))
            fh.write(vectors.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.rows = len(vectors)
        self._map = None

    def array(self) -> np.ndarray:
        """Read-only memmap of the rows (an empty array when there are none)."""
        if self.rows == 0:
            return np.empty((0, self.dim), np.float32)
        if self._map is None or len(self._map) != self.rows:
            self._map = np.memmap(self.path, dtype="<f4", mode="r", offset=HEADER, shape=(self.rows, self.dim))
        return self._map
