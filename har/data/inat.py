"""iNaturalist 2018: published split lists (those of Kang et al., "Decoupling Representation and Classifier",
used by later long-tailed work) and their generation from the official ``train2018.json`` / ``val2018.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from har.data.imagelist import SplitList
from har.errors import DataError


def inat_split_list(annotation_json: str | Path) -> SplitList:
    """Lines ``file_name category_id`` from an official COCO-style annotation file, in its ``images`` order.

    The labels are the official category ids, as in the published lists. Write the result with
    :func:`har.data.imagelist.write_split_list`; if its git id differs from the published one, compare the
    lines as sets before suspecting the annotation file, as only their order may differ.

    Raises:
        DataError: the file is missing or not valid JSON, lacks ``images`` / ``annotations`` or their fields,
            or an image has no label or several (``test2018.json`` has none: it cannot be used).
    """
    path = Path(annotation_json)
    data = _load_json(path)
    try:
        images = {image["id"]: image["file_name"] for image in data["images"]}
        pairs = [(annotation["image_id"], int(annotation["category_id"])) for annotation in data["annotations"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a COCO-style annotation file: 'images' need 'id' and 'file_name', "
                        f"'annotations' need 'image_id' and an integer 'category_id' ({type(exc).__name__}: {exc}); "
                        f"use the official train2018.json or val2018.json") from exc
    labels: dict[int, int] = {}
    for image_id, category in pairs:
        if image_id in labels or image_id not in images or category < 0:
            raise DataError(f"{path}: the annotation of image {image_id!r} (category {category}) is a second label, "
                            f"names no listed image or has a negative category; use the official train2018.json "
                            f"or val2018.json")
        labels[image_id] = category
    if not images:
        raise DataError(f"{path} lists no images; use the official train2018.json or val2018.json")
    unlabelled = [name for image_id, name in images.items() if image_id not in labels]
    if unlabelled:
        raise DataError(f"{path}: {len(unlabelled)} of {len(images)} images have no label (e.g. {unlabelled[:3]}); "
                        f"use train2018.json or val2018.json, test2018.json has no labels")
    return SplitList(list(images.values()), np.asarray([labels[i] for i in images], dtype=np.int64), str(path))


def _load_json(path: Path) -> dict:
    """The parsed annotation file; a missing or damaged file becomes a DataError that says what to fetch."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found; download the official iNaturalist 2018 annotations "
                        f"(train2018.json, val2018.json) and check the path") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); download the annotation file again") from exc
