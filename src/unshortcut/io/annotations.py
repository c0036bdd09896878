"""Tumor regions from polygon annotations: QuPath GeoJSON and ASAP XML (CAMELYON16/17).

``DATA/annotations/<image_id>.geojson`` (or ``.json``) and ``<image_id>.xml`` hold
polygons in level-0 pixel coordinates of the image, x the column and y the row, with
(0, 0) the top-left corner of the top-left pixel. Each polygon has a class:

* GeoJSON (QuPath export): a FeatureCollection, a single Feature, a list of Features, or
  a bare geometry. The class is ``properties.classification.name`` (or a plain string
  ``properties.classification``). Polygons and MultiPolygons keep their holes; points
  and lines carry no area and are skipped.
* ASAP XML: ``Annotation`` elements with ``Type`` and ``PartOfGroup`` and
  ``Coordinates/Coordinate X= Y= Order=``. The class is the group, or any group it is
  nested in (``AnnotationGroups/Group PartOfGroup``). Polygon, Spline (through its
  control points) and Rectangle annotations have area; Dot and PointSet do not.

Features without a class (QuPath) or group (``PartOfGroup="None"``) have the class
``unclassified``. Classes are compared case-insensitively. The tumor region is the union
of the tumor-class polygons minus the union of the exclusion-class polygons (an
exclusion always wins, whatever the drawing order); polygons of other classes are
ignored. Defaults follow the public datasets: tumor = ``Tumor``, ``metastases``
(CAMELYON17), ``_0``, ``_1`` (CAMELYON16); exclusion = ``Exclusion``, ``_2``
(CAMELYON16's non-tumor islands inside tumor) and ``normal`` (CAMELYON17).

Hand-drawn polygons often cross themselves; they are repaired with ``shapely.make_valid``
(a figure eight becomes its two lobes) before the union.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import shape as geojson_shape
from shapely.geometry.base import BaseGeometry

from unshortcut.errors import UnshortcutError
from unshortcut.io.annotation_classes import (
    ANNOTATION_EXTENSIONS,
    UNCLASSIFIED,
    AnnotationClasses,
)

#: ASAP annotation types that enclose an area.
ASAP_AREA_TYPES = frozenset({"polygon", "spline", "rectangle"})


@dataclass
class Annotations:
    """The tumor region of one annotation file, in level-0 pixels (x column, y row)."""

    path: Path
    tumor: BaseGeometry
    classes: Counter[str] = field(default_factory=Counter)
    """Polygons per class name as written in the file."""
    roles: Counter[str] = field(default_factory=Counter)
    """Polygons per role: tumor, exclude, ignored (other classes and shapes without area)."""

    def summary(self) -> str:
        """One line for the manifest and warnings: what the file held, what was used."""
        used = ", ".join(f"{n} {role}" for role, n in sorted(self.roles.items()))
        found = ", ".join(f"{name} ({n})" for name, n in sorted(self.classes.items()))
        return f"{self.path.name}: {used or 'no polygons'}; classes {found or 'none'}"


def read_annotations(path: Path | str, classes: AnnotationClasses) -> Annotations:
    """Parse ``path`` (by extension) and build its tumor region; errors name the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ANNOTATION_EXTENSIONS:
        known = ", ".join(sorted(ANNOTATION_EXTENSIONS))
        raise UnshortcutError(f"{path}: not an annotation file (supported: {known})")
    polygons = list(_asap_polygons(path) if suffix == ".xml" else _geojson_polygons(path))
    tumor, exclude = [], []
    result = Annotations(path, shapely.Polygon())
    for names, geometry in polygons:
        result.classes[names[0]] += 1
        area = _polygonal(geometry)
        role = classes.role(names) if area is not None else None
        result.roles[role or "ignored"] += 1
        if role == "tumor":
            tumor.append(area)
        elif role == "exclude":
            exclude.append(area)
    region = shapely.union_all(tumor) if tumor else shapely.Polygon()
    if exclude and not region.is_empty:
        region = region.difference(shapely.union_all(exclude))
    result.tumor = region
    return result


def _polygonal(geometry: BaseGeometry) -> BaseGeometry | None:
    """The area-carrying part of ``geometry`` made valid, or None when it has no area."""
    if geometry.is_empty:
        return None
    valid = shapely.make_valid(geometry) if not geometry.is_valid else geometry
    parts = [
        part
        for part in shapely.get_parts(valid)
        if part.geom_type in ("Polygon", "MultiPolygon") and part.area > 0
    ]
    return shapely.union_all(parts) if parts else None


# --- GeoJSON (QuPath) --------------------------------------------------------------------


def _geojson_polygons(path: Path) -> Iterator[tuple[tuple[str, ...], BaseGeometry]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnshortcutError(f"{path}: not a readable GeoJSON file ({error})") from None
    for feature in _features(document, path):
        geometry = feature.get("geometry")
        if geometry is None:
            continue
        try:
            shape = geojson_shape(geometry)
        except Exception as error:  # shapely raises several types for bad GeoJSON
            raise UnshortcutError(f"{path}: invalid geometry ({error})") from None
        yield (_qupath_class(feature.get("properties") or {}),), shape


def _features(document: Any, path: Path) -> list[dict[str, Any]]:
    """The features of any GeoJSON form QuPath writes (module docstring)."""
    items = document if isinstance(document, list) else [document]
    features: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "FeatureCollection":
            features += _features(item.get("features") or [], path)
        elif kind == "Feature":
            features.append(item)
        elif kind in ("Polygon", "MultiPolygon", "GeometryCollection", "Point", "MultiPoint",
                      "LineString", "MultiLineString"):  # fmt: skip
            features.append({"type": "Feature", "geometry": item, "properties": {}})
        else:
            raise UnshortcutError(
                f"{path}: expected a GeoJSON FeatureCollection, Feature or geometry, "
                f"found {kind or type(item).__name__}"
            )
    return features


def _qupath_class(properties: dict[str, Any]) -> str:
    classification = properties.get("classification")
    if isinstance(classification, dict):
        classification = classification.get("name")
    return str(classification) if classification else UNCLASSIFIED


# --- ASAP XML (CAMELYON) -----------------------------------------------------------------


def _asap_polygons(path: Path) -> Iterator[tuple[tuple[str, ...], BaseGeometry]]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        raise UnshortcutError(f"{path}: not a readable ASAP XML file ({error})") from None
    annotations = root.findall(".//Annotation")
    if root.tag != "ASAP_Annotations" and not annotations:
        raise UnshortcutError(f"{path}: not an ASAP annotation file (root <{root.tag}>)")
    parents = {
        group.get("Name", ""): group.get("PartOfGroup", "None")
        for group in root.findall(".//AnnotationGroups/Group")
    }
    for annotation in annotations:
        names = _group_chain(annotation.get("PartOfGroup", "None"), parents)
        points = _asap_points(annotation, path)
        has_area = annotation.get("Type", "Polygon").casefold() in ASAP_AREA_TYPES
        if has_area and len(points) >= 3:
            yield names, shapely.Polygon(points)
        else:
            yield names, shapely.Point()


def _group_chain(group: str, parents: dict[str, str]) -> tuple[str, ...]:
    """The group and the groups it is nested in, innermost first; 'None' is no group."""
    chain: list[str] = []
    while group and group != "None" and group not in chain:
        chain.append(group)
        group = parents.get(group, "None")
    return tuple(chain) or (UNCLASSIFIED,)


def _asap_points(annotation: ET.Element, path: Path) -> list[tuple[float, float]]:
    coordinates = annotation.findall("./Coordinates/Coordinate")
    try:
        ordered = sorted(coordinates, key=lambda c: float(c.get("Order", "0")))
        return [(_number(c.get("X")), _number(c.get("Y"))) for c in ordered]
    except (TypeError, ValueError):
        name = annotation.get("Name", "?")
        raise UnshortcutError(f"{path}: annotation {name!r} has a bad coordinate") from None


def _number(text: str | None) -> float:
    """A coordinate; some CAMELYON files write a decimal comma."""
    if text is None:
        raise ValueError("missing")
    return float(text.replace(",", ".") if "." not in text else text)
