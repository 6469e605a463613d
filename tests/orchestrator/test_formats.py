"""Portal formats on the real files: MegaDetector 1.1 and 1.4 outputs, COCO Camera Traps, CSV round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trapline.orchestrator import formats
from trapline.orchestrator.db import Database, Settings
from trapline.orchestrator.results import image_outs
from trapline.runtime.errors import InvalidArgument

FRAMES = Path(__file__).resolve().parents[1] / "data" / "frames"
CCT20 = Path(__file__).resolve().parents[1] / "data" / "formats" / "cct20_cis_val_annotations.json"


def resolver(base: Path):
    return lambda name: (str((base / name).resolve()), str((base / name).resolve()))


def load_into_db(tmp_path: Path, records) -> Database:
    """Store imported records as an ingest would (detections taken as given, animal crops counted)."""
    db = Database(tmp_path / "o.db")
    db.migrate()
    db.create_project("p", "p", Settings(), [])
    db.add_images("p", "job", records)
    for row in db.job_images("job", "pending"):
        given = json.loads(row["given"]) if row["given"] is not None else []
        dets = [formats.Detection(c, conf, tuple(b)) for c, conf, b in given]
        crops = {i: f"file:///crops/{row['id']}-{i}.jpg" for i, d in enumerate(dets)
                 if d.category == "1" and d.conf >= 0.2}
        db.record_detections(row["id"], row["width"] or 640, row["height"] or 480, dets, crops, "p", 0.2, "given")
    db.set_image_status([r["id"] for r in db.images("p")], "done")
    return db


@pytest.mark.parametrize("subset,version", [("md_test_images", "1.1"), ("cct_sample", "1.4")])
def test_megadetector_import_then_export_keeps_files_detections_and_validates(tmp_path, subset, version):
    path = FRAMES / subset / "megadetector.json"
    doc = json.loads(path.read_text())
    assert doc["info"]["format_version"] == version
    records = formats.read_megadetector(doc, resolver(path.parent))
    assert [r.file for r in records] == [im["file"] for im in doc["images"]]
    db = load_into_db(tmp_path, records)
    outs, _ = image_outs(db, "p")
    out = formats.write_megadetector(outs, ["deer", "fox"])
    assert formats.check_megadetector(out) == [], "our MegaDetector export breaks the format's rules"
    assert out["info"]["format_version"] == "1.4"
    for before, after in zip(doc["images"], out["images"]):
        assert after["file"] == before["file"]
        assert len(after["detections"]) == len(before["detections"])
        for a, b in zip(after["detections"], before["detections"]):
            assert a["category"] == b["category"]
            assert a["conf"] == pytest.approx(b["conf"], abs=1e-4)
            assert a["bbox"] == pytest.approx([min(max(v, 0), 1) for v in b["bbox"]], abs=1e-4)
    # re-importing the export gives the same images and detections
    again = formats.read_megadetector(out, resolver(path.parent))
    assert [(r.file, [(d.category, round(d.conf, 4)) for d in r.given]) for r in again] == \
        [(r.file, [(d.category, round(d.conf, 4)) for d in r.given]) for r in records]


def test_megadetector_export_carries_classifications_for_labelled_crops(tmp_path):
    path = FRAMES / "md_test_images" / "megadetector.json"
    db = load_into_db(tmp_path, formats.read_megadetector(json.loads(path.read_text()), resolver(path.parent)))
    crop_ids = db.unlabelled_crop_ids("p")
    assert crop_ids, "the 1.1 sample has animal detections above 0.2"
    db.store_labels("p", "", "ana", [(crop_ids[0], "fox")])
    db.put_predictions(crop_ids[1:], ["deer"] * (len(crop_ids) - 1), [0.7] * (len(crop_ids) - 1), "clf-1")
    out = formats.write_megadetector(image_outs(db, "p")[0], ["deer", "fox"])
    assert formats.check_megadetector(out) == []
    classified = [d["classifications"] for im in out["images"] for d in im["detections"] if "classifications" in d]
    assert len(classified) == len(crop_ids)
    assert [["1", 1.0]] in classified and [["0", 0.7]] in classified
    assert out["classification_categories"] == {"0": "deer", "1": "fox"}


def test_megadetector_checker_catches_broken_documents():
    bad = {"info": {"format_version": "1.3"}, "detection_categories": {"1": "animal"}, "classification_categories": {},
           "images": [{"file": "a.jpg", "detections": [{"category": "7", "conf": 1.5, "bbox": [0.9, 0, 0.5, 1],
                                                      "classifications": [["3", 0.5]]}]},
                      {"file": "a.jpg", "failure": "x", "detections": [{}]}]}
    problems = "\n".join(formats.check_megadetector(bad))
    for needle in ("older than 1.4", "not in detection_categories", "not in [0, 1]", "normalized box",
                   "classification", "listed twice", "failed image"):
        assert needle in problems


def test_megadetector_import_rejects_unknown_categories_and_bad_boxes():
    with pytest.raises(InvalidArgument, match="detection_categories"):
        formats.read_megadetector({"images": [{"file": "a.jpg", "detections": [{"category": "9", "conf": 1,
                                                                                 "bbox": [0, 0, 1, 1]}]}]},
                                  resolver(Path("/")))
    with pytest.raises(InvalidArgument, match="bbox"):
        formats.read_megadetector({"images": [{"file": "a.jpg", "detections": [{"category": "1", "conf": 1,
                                                                                 "bbox": [0, 0, 1]}]}]},
                                  resolver(Path("/")))


def test_coco_import_keeps_location_sequence_date_and_hides_labels(tmp_path):
    doc = json.loads(CCT20.read_text())
    records = formats.read_coco(doc, resolver(tmp_path))
    assert len(records) == len(doc["images"]) == 3484
    first = records[0]
    assert (first.location, first.seq_id, first.datetime) == ("33", "6f0a3ccf-5567-11e8-92fb-dca9047ef277",
                                                              "2012-05-08 19:23:36")
    assert sum(len(r.ground_truth) for r in records) == len(doc["annotations"])
    assert first.given is None, "COCO labels must never become detections or labels the loop sees"
    db = load_into_db(tmp_path, records[:200])
    assert db.label_count("p") == 0 and db.crop_count("p") == 0
    assert sum(len(v) for v in db.ground_truth("p").values()) == sum(len(r.ground_truth) for r in records[:200])
    out = formats.write_coco(image_outs(db, "p")[0], ["bobcat"])
    by_id = {im["id"]: im for im in doc["images"]}
    for im in out["images"]:
        assert im == by_id[im["id"]], "COCO export changed an image's fields"
    assert {a["category_id"] for a in out["annotations"]} == {0}  # no detections yet: every image empty


def test_coco_export_has_one_annotation_per_crop_with_box_in_pixels(tmp_path):
    path = FRAMES / "cct_sample" / "megadetector.json"
    db = load_into_db(tmp_path, formats.read_megadetector(json.loads(path.read_text()), resolver(path.parent)))
    crops = db.unlabelled_crop_ids("p")
    db.store_labels("p", "", "ana", [(crops[0], "coyote")])
    out = formats.write_coco(image_outs(db, "p")[0], ["coyote"])
    anns = [a for a in out["annotations"] if "bbox" in a]
    assert len(anns) == len(crops)
    names = {c["id"]: c["name"] for c in out["categories"]}
    human = [a for a in anns if a["human"]]
    assert len(human) == 1 and names[human[0]["category_id"]] == "coyote"
    assert all(0 <= a["bbox"][0] <= 640 for a in anns)


def test_csv_round_trip_keeps_images_and_counted_detections(tmp_path):
    path = FRAMES / "cct_sample" / "megadetector.json"
    db = load_into_db(tmp_path, formats.read_megadetector(json.loads(path.read_text()), resolver(path.parent)))
    outs = image_outs(db, "p")[0]
    text = formats.write_csv(outs)
    rows = text.splitlines()
    assert rows[0].split(",") == formats.CSV_COLUMNS
    assert len(rows) - 1 == sum(max(1, im.count) for im in outs)
    again = formats.read_csv(text, resolver(path.parent))
    assert [r.file for r in again] == [im.file for im in outs]
    for rec, im in zip(again, outs):
        assert len(rec.given) == im.count
        for d, i in zip(rec.given, sorted(im.crops)):
            assert d.bbox == pytest.approx(im.detections[i].bbox, abs=1e-4)


def test_csv_without_file_column_is_rejected():
    with pytest.raises(InvalidArgument, match="'file'"):
        formats.read_csv("name,x\na,b\n", resolver(Path("/")))


@pytest.mark.parametrize("count,expected", [(0, "0"), (1, "1-10"), (10, "1-10"), (11, "11-50"), (51, "51+")])
def test_count_bins_follow_the_paper(count, expected):
    assert formats.count_bin(count) == expected


def test_crops_cut_from_given_boxes_match_the_detectors_own_rule():
    detector_crops = pytest.importorskip("trapline.detector.crops")
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from trapline.orchestrator.storage import crop_jpeg

    path = FRAMES / "md_test_images" / "megadetector.json"
    doc = json.loads(path.read_text())
    checked = 0
    for entry in doc["images"][:3]:
        with Image.open(path.parent / entry["file"]) as raw:
            image = ImageOps.exif_transpose(raw).convert("RGB")
        for d in entry["detections"]:
            ours = np.asarray(Image.open(io.BytesIO(crop_jpeg(image, d["bbox"]))))
            theirs = np.asarray(Image.open(io.BytesIO(detector_crops.encode_jpeg(
                detector_crops.crop_box(np.asarray(image), d["bbox"])))))
            assert ours.shape == (256, 256, 3)
            assert np.array_equal(ours, theirs), "a given box is cut differently from the detector's crops"
            checked += 1
    assert checked
