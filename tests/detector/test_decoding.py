"""Decoding real frames and every kind of bad file: each bad one is a per-image failure, never a crash."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from trapline.detector.decoding import ImageFailure, decode_image


@pytest.mark.parametrize("kind,text", [
    ("truncated", "truncated or corrupt"),
    ("corrupt", "truncated or corrupt"),
    ("zero_byte", "zero-byte"),
    ("not_an_image", "not a recognised image"),
    ("bomb", "over the limit"),
])
def test_bad_files_become_failure_strings(bad_inputs, kind, text):
    with pytest.raises(ImageFailure) as err:
        decode_image(bad_inputs[kind])
    assert str(err.value).startswith("Failure image access"), str(err.value)
    assert text in str(err.value), f"{kind}: unexpected message {err.value!r}"


def test_pixel_limit_is_configurable(animal_jpeg):
    with pytest.raises(ImageFailure, match="over the limit of 1000"):
        decode_image(animal_jpeg, max_pixels=1000)


def test_real_frame_decodes_to_rgb_uint8(animal_jpeg):
    img = decode_image(animal_jpeg)
    w, h = Image.open(io.BytesIO(animal_jpeg)).size
    assert img.shape == (h, w, 3) and img.dtype == np.uint8


def test_cmyk_grayscale_and_16bit_frames_decode_to_rgb(odd_but_valid):
    ref = decode_image(odd_but_valid["reference"]).astype(float)
    for kind in ("cmyk", "grayscale", "png16"):
        img = decode_image(odd_but_valid[kind])
        assert img.shape == ref.shape and img.dtype == np.uint8, kind
        # Same scene: the mean brightness stays close to the original's (a 16-bit PNG read as 8 bits
        # without scaling would be saturated white, an inverted CMYK would be a negative).
        assert abs(img.mean() - ref.mean()) < 12, f"{kind}: mean {img.mean():.1f} vs {ref.mean():.1f}"
    gray = decode_image(odd_but_valid["grayscale"])
    assert np.array_equal(gray[..., 0], gray[..., 2]), "grayscale frames become three equal channels"


def test_exif_orientation_is_applied(odd_but_valid):
    ref = decode_image(odd_but_valid["reference"])
    rot = decode_image(odd_but_valid["exif_rotated"])
    assert rot.shape == (ref.shape[1], ref.shape[0], 3), "an orientation-6 frame is displayed rotated 90 degrees"
    expected = np.rot90(ref, k=-1)  # orientation 6: rotate clockwise
    assert np.abs(rot.astype(int) - expected.astype(int)).mean() < 3
