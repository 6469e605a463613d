"""Image URIs: local paths and file:// inside the configured roots only."""

from __future__ import annotations

import os

import pytest

from trapline.detector.decoding import ImageFailure
from trapline.detector.sources import ImageSources, LocalFiles
from trapline.runtime.errors import InvalidArgument, PermissionDenied


@pytest.fixture()
def roots(tmp_path, animal_jpeg):
    inside = tmp_path / "cameras"
    (inside / "site1").mkdir(parents=True)
    (inside / "site1" / "bear.jpg").write_bytes(animal_jpeg)
    outside = tmp_path / "secrets"
    outside.mkdir()
    (outside / "key.jpg").write_bytes(animal_jpeg)
    os.symlink(outside / "key.jpg", inside / "site1" / "link.jpg")
    return inside, outside


def test_paths_and_file_uris_inside_a_root_are_read(roots, animal_jpeg):
    inside, _ = roots
    src = ImageSources(LocalFiles([inside]))
    assert src.reader(str(inside / "site1" / "bear.jpg"))() == animal_jpeg
    assert src.reader(f"file://{inside}/site1/bear.jpg")() == animal_jpeg
    assert src.reader("site1/bear.jpg")() == animal_jpeg  # relative to the first root


@pytest.mark.parametrize("uri", ["{out}/key.jpg", "file://{out}/key.jpg", "{ins}/../secrets/key.jpg",
                                 "{ins}/site1/link.jpg", "/etc/passwd", "../secrets/key.jpg"])
def test_paths_outside_the_roots_are_refused(roots, uri):
    inside, outside = roots
    src = ImageSources(LocalFiles([inside]))
    with pytest.raises(PermissionDenied, match="outside the configured image roots"):
        src.reader(uri.format(out=outside, ins=inside), "images[0].source.uri")


def test_other_schemes_are_refused_until_a_fetcher_is_registered(roots, animal_jpeg):
    inside, _ = roots
    with pytest.raises(InvalidArgument, match="unsupported URI scheme 's3'"):
        ImageSources(LocalFiles([inside])).reader("s3://bucket/frame.jpg")
    src = ImageSources(LocalFiles([inside]), fetchers={"s3": lambda uri: animal_jpeg})
    assert src.reader("s3://bucket/frame.jpg")() == animal_jpeg


def test_a_missing_file_inside_a_root_is_a_per_image_failure(roots):
    inside, _ = roots
    read = ImageSources(LocalFiles([inside])).reader(str(inside / "site1" / "gone.jpg"))
    with pytest.raises(ImageFailure, match="file not found"):
        read()
