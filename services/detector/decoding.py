"""Safe image decoding: bytes in, an RGB uint8 array out, or a per-image failure string.

Camera-trap folders hold every kind of odd file: truncated JPEGs from full cards, zero-byte files,
thumbnails databases, CMYK exports, single-channel IR night frames, 16-bit PNGs, phone frames with an
EXIF orientation, and the occasional huge panorama. None of these may take a batch down: each becomes a
:class:`ImageFailure` whose message is reported as the image's ``failure``, as in MegaDetector's format.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

#: Default pixel limit (width x height): 50 MP; MegaDetector-era trail cameras top out around 40 MP.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageFailure(Exception):
    """An image that cannot be used; ``str(exc)`` is the per-image failure message."""


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) single channel, e.g. a 16-bit PNG from a thermal camera: scale to 8 bits by
        # the type's range (values above 255 mean the full 16-bit range is in use).
        a = np.asarray(im).astype(np.float32)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(float(a.max(initial=0)), 1e-6)
        g = np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "L":
        g = np.asarray(im, np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")
    if mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, LA, RGBA (alpha dropped), P, 1
    return np.asarray(im, np.uint8)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded bytes to an RGB ``uint8`` array [H, W, 3] with the EXIF orientation applied.

    Raises :class:`ImageFailure` for anything that is not a whole, readable image within ``max_pixels``.
    """
    if not data:
        raise ImageFailure("Failure image access: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageFailure(f"Failure image access: image over the pixel limit ({exc})") from None
    except Exception:
        raise ImageFailure("Failure image access: not a recognised image format") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageFailure("Failure image access: image has no pixels")
    if w * h > max_pixels:
        raise ImageFailure(f"Failure image access: {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd EXIF/ICC; those frames are still fine
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a corrupt EXIF block does not make the pixels unusable
                pass
            return np.ascontiguousarray(_to_rgb(im))
    except Image.DecompressionBombError as exc:
        raise ImageFailure(f"Failure image access: image over the pixel limit ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).split("(")[0].strip() or type(exc).__name__
        raise ImageFailure(f"Failure image access: truncated or corrupt image ({msg})") from None
    except Exception as exc:  # any other decoder error is still this image's problem only
        raise ImageFailure(f"Failure image access: undecodable image ({type(exc).__name__})") from None
