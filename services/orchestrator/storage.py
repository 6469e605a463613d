"""Where bytes live: image URIs inside the configured roots, the crop store, and cutting crops from given boxes.

Crops of detections that a portal gives us (a MegaDetector or CSV import) are cut here with the rule the
detector uses for its own (``CROP_MODE_RESIZE``, the paper's choice): the normalized box, in pixels of
the EXIF-oriented frame, resized to 256x256 with bilinear interpolation, ignoring aspect ratio, JPEG
quality 90; :func:`crop_jpeg` follows ``trapline.detector.crops.crop_box`` pixel for pixel (a test checks
it). Calling the detector instead would mean re-detecting frames the portal already detected.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from trapline.runtime.errors import InvalidArgument, NotFound, PermissionDenied

from .db import Detection

CROP_SIZE = 256
JPEG_QUALITY = 90
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})


def uri_path(uri: str, field: str) -> Path:
    """A local path from a path or file:// URI (other schemes are not supported)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise InvalidArgument(f"URI scheme {parsed.scheme!r} is not supported (a local path or file://)", field=field)
    return Path(uri)


class Roots:
    """The folders image URIs (and export destinations) may point into."""

    def __init__(self, roots: Sequence[Path | str]) -> None:
        self.roots = [Path(r).resolve() for r in roots]

    def check(self, uri: str, field: str, *, base: Path | None = None) -> Path:
        path = uri_path(uri, field)
        if not path.is_absolute() and base is not None:
            path = base / path
        path = path.resolve()
        if not any(path == r or path.is_relative_to(r) for r in self.roots):
            raise PermissionDenied(f"{uri} is outside the configured image roots "
                                   "(TRAPLINE_ORCHESTRATOR_IMAGE_ROOTS)", field=field)
        return path

    def existing_file(self, uri: str, field: str, *, base: Path | None = None) -> Path:
        path = self.check(uri, field, base=base)
        if not path.is_file():
            raise NotFound(f"no such file: {uri}", field=field)
        return path


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class CropStore:
    """Crops as JPEG files under a folder, addressed by file:// URIs (the trainer reads them by URI)."""

    def __init__(self, uri: str) -> None:
        self.root = uri_path(uri, "crop_store_uri").resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, project: str, crop_id: str, jpeg: bytes) -> str:
        folder = self.root / project
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{crop_id}.jpg"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(jpeg)
        os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        path = uri_path(uri, "crop_uri").resolve()
        if not path.is_relative_to(self.root):
            raise PermissionDenied(f"{uri} is not in the crop store")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"crop {uri} is missing from the crop store") from None


def cut_crops(image_bytes: bytes, detections: Sequence[Detection], wanted: Sequence[int],
              size: int = CROP_SIZE) -> tuple[int, int, dict[int, bytes]]:
    """Decode a frame and cut the detections at ``wanted`` indices: (width, height, {index: jpeg})."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image_bytes)) as raw:
        image = ImageOps.exif_transpose(raw).convert("RGB")
    width, height = image.size
    import numpy as np

    from trapline.detector.crops import crop_box, encode_jpeg

    pixels = np.asarray(image)  # once per frame, not once per detection
    crops = {i: encode_jpeg(crop_box(pixels, detections[i].bbox, size), quality=JPEG_QUALITY) for i in wanted}
    return width, height, crops


def crop_jpeg(image, bbox: Sequence[float], size: int = CROP_SIZE) -> bytes:
    """The detector's own crop rule (CROP_MODE_RESIZE: the normalized box clipped to the frame, widened to whole
    pixels, stretched to ``size`` x ``size`` bilinear) on a decoded RGB PIL image, as JPEG. One implementation,
    ``trapline.detector.crops``, serves the detector, the orchestrator and the trainer's model building."""
    import numpy as np

    from trapline.detector.crops import crop_box, encode_jpeg

    return encode_jpeg(crop_box(np.asarray(image), bbox, size), quality=JPEG_QUALITY)
