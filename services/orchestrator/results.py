"""Per-image results from the database: detections, count, and each crop's species (human label, else the
model's prediction with its confidence). The same view feeds GetResults and every export format."""

from __future__ import annotations

import json

from .db import Database, Detection
from .formats import CropOut, ImageOut

FINISHED = ("done", "failed")


def image_outs(db: Database, project: str, after_id: int = 0, limit: int = 10_000_000) -> tuple[list[ImageOut], int]:
    """Finished images (done or failed) of a project in ingest order, after image id ``after_id``; and the id
    to continue after (0 when this was the last page)."""
    raw = db.images(project, after_id, limit)
    next_after = raw[-1]["id"] if len(raw) == limit else 0
    rows = [r for r in raw if r["status"] in FINISHED]
    dets, crops = db.image_details([r["id"] for r in rows])
    out = []
    for r in rows:
        im = ImageOut(image_id=r["id"], file=r["file"], uri=r["uri"], source_id=r["source_id"], width=r["width"],
                      height=r["height"], location=r["location"], seq_id=r["seq_id"], datetime=r["datetime"],
                      extra=json.loads(r["extra"]), failure=r["failure"], threshold=r["threshold"],
                      detections=[Detection(d["category"], d["conf"], (d["x"], d["y"], d["w"], d["h"]))
                                  for d in dets[r["id"]]])
        for c in crops[r["id"]]:
            if c["hlabel"]:
                im.crops[c["idx"]] = CropOut(c["id"], c["hlabel"], 1.0, True)
            else:
                im.crops[c["idx"]] = CropOut(c["id"], c["plabel"] or "", float(c["pconf"] or 0.0), False)
        out.append(im)
    return out, next_after
