"""The model store: versions are whole or absent, immutable, checked against their sha256."""

from __future__ import annotations

import json

import pytest

from trapline.embedder.modelstore import ModelStore, open_store
from trapline.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound


def _files(tmp_path, payload=b"onnx-bytes"):
    src = tmp_path / "src.onnx"
    src.write_bytes(payload)
    return {"model.onnx": src}


def test_publish_writes_a_complete_version_with_sha256_and_no_temporary_leftovers(tmp_path):
    store = ModelStore(tmp_path / "store")
    v = store.publish(_files(tmp_path), {"version": "v1", "parent_version": "", "preprocessing": {}})
    assert v.manifest["sha256"] == v.manifest["files"]["model.onnx"] and len(v.manifest["sha256"]) == 64
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["v1"]
    assert store.verify("v1").version == "v1"
    assert v.uri.startswith("file://") and v.uri.endswith("/v1/model.onnx")


def test_versions_are_immutable(tmp_path):
    store = ModelStore(tmp_path)
    store.publish(_files(tmp_path), {"version": "v1"})
    with pytest.raises(AlreadyExists):
        store.publish(_files(tmp_path, b"other"), {"version": "v1"})


def test_half_written_versions_are_invisible(tmp_path):
    store = ModelStore(tmp_path / "s")
    crash = tmp_path / "s" / ".tmp-deadbeef"
    crash.mkdir()
    (crash / "model.onnx").write_bytes(b"partial")
    assert store.versions() == [] and not store.has(".tmp-deadbeef")


def test_a_corrupted_model_file_fails_verification(tmp_path):
    store = ModelStore(tmp_path)
    v = store.publish(_files(tmp_path), {"version": "v1"})
    v.model_path.write_bytes(b"tampered")
    with pytest.raises(FailedPrecondition, match="sha256"):
        store.verify("v1")


def test_unknown_and_malformed_versions(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(NotFound):
        store.get("v9")
    with pytest.raises(InvalidArgument):
        store.get("../../etc/passwd")


def test_next_version_counts_up_and_uris_are_parsed(tmp_path):
    store = open_store((tmp_path / "x").as_uri())
    assert store.root == tmp_path / "x"
    assert store.next_version("ft") == "ft-0001"
    store.publish(_files(tmp_path), {"version": "ft-0001"})
    assert store.next_version("ft") == "ft-0002"
    with pytest.raises(InvalidArgument, match="not supported"):
        open_store("s3://bucket/models")
    assert json.loads((tmp_path / "x" / "ft-0001" / "manifest.json").read_text())["version"] == "ft-0001"
