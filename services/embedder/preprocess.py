"""Crop decoding and preprocessing (PIL + numpy; the trainer reuses it so both sides match exactly).

A crop is an encoded image (the detector's 256x256 JPEGs; PNG and other sizes are accepted and resized).
The manifest's ``preprocessing`` says what the network expects::

    {"size": 224, "resize": "bilinear", "color": "RGB", "layout": "NCHW",
     "scale": 1/255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from trapline.runtime.errors import InvalidArgument

#: Smallest and largest side accepted for a crop, in pixels (a decompression-bomb guard at the top).
MIN_SIDE = 8
MAX_SIDE = 4096

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def decode(data: bytes, field: str = "crop") -> Image.Image:
    """Decode an encoded crop to RGB; InvalidArgument naming ``field`` when it is not a usable image."""
    if not data:
        raise InvalidArgument("empty crop: expected JPEG or PNG bytes", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:
                raise InvalidArgument(
                    f"crop is {w}x{h} px; sides must be {MIN_SIDE}..{MAX_SIDE} px (the detector's crops are 256x256)",
                    field=field)
            return image.convert("RGB")
    except InvalidArgument:
        raise
    except Exception as exc:  # PIL raises many types for corrupt input
        raise InvalidArgument(f"not a decodable image ({type(exc).__name__}): expected JPEG or PNG bytes",
                              field=field) from None


def to_tensor(image: Image.Image, pre: Mapping) -> np.ndarray:
    """RGB image -> float32 [3, size, size] as the manifest's preprocessing says."""
    size = int(pre["size"])
    if image.size != (size, size):
        image = image.resize((size, size), _RESAMPLE[pre.get("resize", "bilinear")])
    x = np.asarray(image, dtype=np.float32) * np.float32(pre.get("scale", 1 / 255.0))
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pixels_to_tensor(pixels: np.ndarray, pre: Mapping) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, size, size] (what a decoded crop goes through)."""
    return to_tensor(Image.fromarray(pixels).convert("RGB"), pre)


def preprocess_batch(crops: Sequence[bytes], pre: Mapping, field: str = "crops") -> np.ndarray:
    """Encoded crops -> float32 [n, 3, size, size]; InvalidArgument names the first bad crop."""
    size = int(pre["size"])
    out = np.empty((len(crops), 3, size, size), np.float32)
    for i, data in enumerate(crops):
        out[i] = to_tensor(decode(data, f"{field}[{i}]"), pre)
    return out
