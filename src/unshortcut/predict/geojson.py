"""Predictions as QuPath GeoJSON: one tile per patch, or merged tumor contours.

QuPath's GeoJSON import is the reference: one ``FeatureCollection``; coordinates in
level-0 pixels (x the column, y the row, from the top-left corner of the image);
per feature ``properties.objectType`` (``tile`` for patches, ``annotation`` for
contours), ``classification`` ``{"name", "color"}`` and numeric ``measurements``
(QuPath 0.4+ reads them as a name -> value object). The patch's group goes into
``name``, which QuPath shows beside the object, because measurements must be numbers.

A tile is the patch's square, so a file read back as annotations (``patchify``'s
``annotations/``, tumor class ``Tumor``) reproduces exactly the patches predicted
tumor on the same grid: the square's edges are the patch's edges, and a pixel counts
when its centre lies inside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely

from unshortcut.atomic import atomic_write_text

TUMOR_CLASS = "Tumor"
OTHER_CLASS = "Other"
#: QuPath's default colours of its Tumor and Other classes (packed RGB as [r, g, b]).
CLASS_COLORS = {TUMOR_CLASS: [200, 0, 0], OTHER_CLASS: [0, 200, 0]}
#: Per-patch measurements in the GeoJSON, from the predictions table's columns.
TILE_MEASUREMENTS = {
    "tumor_probability": "score",
    "tissue_ratio": "tissue_ratio",
    "group_val_accuracy": "group_val_accuracy",
    "worst_group_val_accuracy": "worst_group_val_accuracy",
}


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined measurement is left out by QuPath when null."""
    return None if math.isnan(value) else round(float(value), 6)


def _classification(tumor: bool) -> dict[str, Any]:
    name = TUMOR_CLASS if tumor else OTHER_CLASS
    return {"name": name, "color": CLASS_COLORS[name]}


def tile_features(table: pd.DataFrame) -> list[dict[str, Any]]:
    """One ``tile`` feature per row of a predictions table (x, y, size in level-0 px)."""
    x, y, size = (table[c].to_numpy(np.int64) for c in ("x", "y", "size"))
    columns = {name: table[column].to_numpy(float) for name, column in TILE_MEASUREMENTS.items()}
    tumor = table["prediction"].to_numpy() == 1
    groups = table["group"].astype(str).to_numpy()
    features = []
    for i in range(len(table)):
        x0, y0, x1, y1 = int(x[i]), int(y[i]), int(x[i] + size[i]), int(y[i] + size[i])
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        measurements = {name: _number(values[i]) for name, values in columns.items()}
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": groups[i],
                    "classification": _classification(bool(tumor[i])),
                    "measurements": measurements,
                },
            }
        )
    return features


def contour_features(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The union of the patches predicted tumor, one ``annotation`` per connected piece,
    with the number of patches inside it and their mean and largest tumor probability
    and lowest worst-group validation accuracy."""
    tumor = table[table["prediction"] == 1]
    if tumor.empty:
        return []
    x, y, size = (tumor[c].to_numpy(np.float64) for c in ("x", "y", "size"))
    region = shapely.unary_union(shapely.box(x, y, x + size, y + size))
    centres_x, centres_y = x + size / 2, y + size / 2
    features = []
    for part in shapely.get_parts(region):
        inside = shapely.contains_xy(part, centres_x, centres_y)
        scores = tumor["score"].to_numpy(float)[inside]
        worst = tumor["worst_group_val_accuracy"].to_numpy(float)[inside]
        measurements = {
            "patches": int(inside.sum()),
            "mean_tumor_probability": _number(float(scores.mean())),
            "max_tumor_probability": _number(float(scores.max())),
            "min_worst_group_val_accuracy": _number(
                float(np.nanmin(worst)) if np.isfinite(worst).any() else math.nan
            ),
        }
        features.append(
            {
                "type": "Feature",
                "geometry": shapely.geometry.mapping(shapely.normalize(part)),
                "properties": {
                    "objectType": "annotation",
                    "classification": _classification(True),
                    "measurements": measurements,
                },
            }
        )
    return features


def write_feature_collection(path: Path, features: list[dict[str, Any]]) -> None:
    """One FeatureCollection, written atomically, one feature per line (diffable, and a
    reader streaming lines never holds more than the document)."""
    lines = ",\n".join(json.dumps(f, separators=(",", ":"), allow_nan=False) for f in features)
    text = '{"type":"FeatureCollection","features":[\n' + lines + "\n]}\n"
    atomic_write_text(path, text)
