"""Copies the small, attributed subset of real frames that tests and the demo use into tests/data/frames/.

Users and CI do not have the full data (../shared/data); this subset is committed. Selection is
deterministic (sorted ids, fixed per-class quotas) so re-running it reproduces the same files.

    python scripts/make_sample.py --source ../shared/data
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# set -> (per-class quota, classes to keep (None: all), extra filter on image records)
PLAN: dict[str, dict] = {
    "serengeti_fieldguide": {"quota": 3, "classes": [
        "buffalo", "cheetah", "elephant", "giraffe", "hyena_spotted", "impala", "lion_female", "warthog",
        "wildebeest", "zebra", "gazelle_thomsons", "baboon"]},
    "cct_sample": {"quota": {"empty": 6, "car": 2, "deer": 3, "opossum": 3, "raccoon": 2}},
    "serengeti_boxes": {"quota": 10, "split": "validation"},
    "carpathia": {"quota": {"bear": 1, "wolf": 1, "deer": 1, "empty": 1}},
    "chicago_fieldguide": {"quota": {"empty": 2, "coyote": 2, "deer": 2, "raccoon": 2}},
    "pw_squirrels": {"quota": 4},
    "md_test_images": {"quota": 5},
}

ATTRIBUTION = {
    "serengeti_fieldguide": "Snapshot Serengeti (CDLA-Permissive-1.0); zooniverse/Serengeti (Apache-2.0)",
    "cct_sample": "Caltech Camera Traps, LILA (CDLA-Permissive-1.0)",
    "serengeti_boxes": "Snapshot Serengeti bounding boxes (CDLA-Permissive-1.0)",
    "carpathia": "ratsakatika/camera-traps (MIT)",
    "chicago_fieldguide": "Lincoln Park Zoo UWIN; zooniverse/Snapshot-Chicago (Apache-2.0)",
    "pw_squirrels": "microsoft/CameraTraps (MIT)",
    "md_test_images": "agentmorris/MegaDetector (MIT); images from LILA sets",
    "formats/cct20_cis_val_annotations.json": "Caltech Camera Traps CCT20 cis-val annotations (CDLA-Permissive-1.0)",
}


def select(name: str, db: dict, plan: dict) -> list[dict]:
    cats = {c["id"]: c["name"] for c in db["categories"]}
    label_of: dict = {}
    for ann in db["annotations"]:
        label_of.setdefault(ann["image_id"], cats[ann["category_id"]])
    images = sorted(db["images"], key=lambda im: str(im["id"]))
    if "split" in plan:
        images = [im for im in images if im.get("split") == plan["split"]]
    quota = plan["quota"]
    if isinstance(quota, int) and "classes" not in plan and name in ("serengeti_boxes", "pw_squirrels", "md_test_images"):
        step = max(1, len(images) // quota)
        return images[::step][:quota]
    taken: collections.Counter = collections.Counter()
    chosen = []
    for im in images:
        label = label_of.get(im["id"])
        if "classes" in plan and label not in plan["classes"]:
            continue
        limit = quota if isinstance(quota, int) else quota.get(label, 0)
        if taken[label] < limit:
            taken[label] += 1
            chosen.append(im)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--dest", type=Path, default=REPO / "tests" / "data" / "frames")
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    lines = ["# Real camera-trap frames used by tests and the demo", "",
             "A small subset of public camera-trap data, copied by `python scripts/make_sample.py`.",
             "Each folder keeps the source layout: `images/`, `coco_ct.json` (COCO Camera Traps) and, where the",
             "source has it, `megadetector.json` (a real MegaDetector batch output for the same frames).", "",
             "| set | frames | licence / source |", "|---|---|---|"]
    for name, plan in PLAN.items():
        src = args.source / name
        db = json.loads((src / "coco_ct.json").read_text())
        chosen = select(name, db, plan)
        keep = {im["id"] for im in chosen}
        out = args.dest / name
        (out / "images").mkdir(parents=True)
        for im in chosen:
            shutil.copy2(src / im["file_name"], out / im["file_name"])
        sub = dict(db)
        sub["images"] = chosen
        sub["annotations"] = [a for a in db["annotations"] if a["image_id"] in keep]
        (out / "coco_ct.json").write_text(json.dumps(sub, indent=1))
        md_path = src / "megadetector.json"
        if md_path.exists():
            md = json.loads(md_path.read_text())
            files = {im["file_name"] for im in chosen}
            md["images"] = [e for e in md["images"] if e["file"] in files]
            (out / "megadetector.json").write_text(json.dumps(md, indent=1))
        lines.append(f"| {name} | {len(chosen)} | {ATTRIBUTION[name]} |")
    fmt = args.dest.parent / "formats"
    fmt.mkdir(exist_ok=True)
    shutil.copy2(args.source / "formats" / "cct20_cis_val_annotations.json", fmt)
    lines.append(f"| ../formats/cct20_cis_val_annotations.json | (no images) | {ATTRIBUTION['formats/cct20_cis_val_annotations.json']} |")
    lines += ["", "Frames larger than 1280 px on the long side were downscaled to 1280 px by the data's curators;",
              "absolute boxes in coco_ct.json refer to the stored size."]
    (args.dest / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
