"""Polygon annotations: QuPath GeoJSON and ASAP XML parsed and rasterised band by band.

The oracle is shapely itself: a pixel is inside when ``shapely.contains_xy`` says its
centre is inside the geometry built independently from the same hand-drawn polygons.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from unshortcut.errors import UnshortcutError
from unshortcut.io.annotation_classes import AnnotationClasses
from unshortcut.io.annotations import read_annotations
from unshortcut.io.discover import ImageEntry
from unshortcut.io.rasterise import PolygonMask, rasterise, ring_edges
from unshortcut.io.tumor import open_tumor_mask

SHAPE = (90, 120)  # level-0 (height, width) of the image the polygons belong to

# Hand-drawn polygons, (x, y) in level-0 pixels, none with a vertex on a pixel centre.
OUTER = [(10.3, 8.1), (70.2, 12.7), (82.9, 50.4), (40.6, 71.8), (6.2, 44.9)]
HOLE = [(30.4, 30.2), (45.7, 28.9), (47.1, 44.3), (29.8, 41.6)]
EXCLUSION = [(60.1, 20.3), (90.4, 22.2), (88.8, 40.9), (62.3, 38.7)]  # over OUTER's edge
TRIANGLES = [
    [(95.2, 60.1), (115.8, 62.4), (101.3, 85.6)],
    [(2.4, 75.3), (20.9, 76.2), (8.8, 88.7)],
]
STROMA = [(50.2, 75.1), (80.3, 75.9), (79.1, 88.2)]
BOWTIE = [(96.1, 5.2), (116.3, 25.8), (116.7, 5.4), (95.8, 25.1)]  # crosses itself


def truth_geometry() -> shapely.Geometry:
    tumor = shapely.union_all(
        [shapely.Polygon(OUTER, [HOLE]), *(shapely.Polygon(t) for t in TRIANGLES)]
    )
    return tumor.difference(shapely.Polygon(EXCLUSION))


def reference(geometry: shapely.Geometry, downsample: float) -> np.ndarray:
    """Pixel-centre mask from shapely: the oracle."""
    height, width = (int(np.ceil(side / downsample)) for side in SHAPE)
    rows, cols = np.mgrid[0:height, 0:width]
    return shapely.contains_xy(geometry, (cols + 0.5) * downsample, (rows + 0.5) * downsample)


def feature(geometry: dict, name: str | None) -> dict:
    properties = {"objectType": "annotation"}
    if name is not None:
        properties["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def ring(points: list[tuple[float, float]]) -> list[list[float]]:
    return [list(p) for p in [*points, points[0]]]


def write_geojson(path: Path) -> Path:
    """A QuPath export: tumor with a hole, a MultiPolygon, an exclusion, and distractors."""
    features = [
        feature({"type": "Polygon", "coordinates": [ring(OUTER), ring(HOLE)]}, "Tumor"),
        feature({"type": "MultiPolygon", "coordinates": [[ring(t)] for t in TRIANGLES]}, "tumor"),
        feature({"type": "Polygon", "coordinates": [ring(EXCLUSION)]}, "Exclusion"),
        feature({"type": "Polygon", "coordinates": [ring(STROMA)]}, "Stroma"),
        feature({"type": "Point", "coordinates": [50.0, 50.0]}, "Tumor"),
        feature({"type": "Polygon", "coordinates": [ring(BOWTIE)]}, None),
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def asap_annotation(name: str, kind: str, group: str, points: list, shuffle: bool) -> str:
    order = list(range(len(points)))
    if shuffle:  # files list coordinates by their Order attribute, not always in order
        order = order[::-1]
    coordinates = "".join(
        f'<Coordinate Order="{i}" X="{points[i][0]}" Y="{points[i][1]}" />' for i in order
    )
    return (
        f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
        f"<Coordinates>{coordinates}</Coordinates></Annotation>"
    )


def write_asap(path: Path) -> Path:
    """CAMELYON16 style: _0/_1 tumor, _2 exclusion; the hole drawn as a _2 exclusion; a
    nested group (part of _1); a dot and a stroma polygon to ignore."""
    annotations = [
        asap_annotation("A0", "Polygon", "_0", OUTER, shuffle=True),
        asap_annotation("A1", "Spline", "_1", TRIANGLES[0], shuffle=False),
        asap_annotation("A2", "Polygon", "small lesions", TRIANGLES[1], shuffle=False),
        asap_annotation("A3", "Polygon", "_2", HOLE, shuffle=False),
        asap_annotation("A4", "Rectangle", "_2", EXCLUSION, shuffle=True),
        asap_annotation("A5", "Dot", "_0", [(50.0, 50.0)], shuffle=False),
        asap_annotation("A6", "Polygon", "Stroma", STROMA, shuffle=False),
    ]
    parents = {"_0": "None", "_1": "None", "_2": "None", "small lesions": "_1", "Stroma": "None"}
    groups = "".join(
        f'<Group Name="{name}" PartOfGroup="{parent}" Color="#64FE2E"><Attributes /></Group>'
        for name, parent in parents.items()
    )
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(annotations)
        + f"</Annotations><AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>"
    )
    return path


# --- the rasteriser ----------------------------------------------------------------------


def test_pixel_centre_rule_hand_computed() -> None:
    # Columns whose centre c + 0.5 lies in [10.2, 20.7): 10..20; rows with r + 0.5 in
    # [5.5, 9.5): 5..8 (a centre on the top edge is inside, on the bottom edge outside).
    edges = ring_edges(shapely.box(10.2, 5.5, 20.7, 9.5))
    full = rasterise(edges, 0, 0, 12, 24)
    assert full.sum() == 11 * 4
    assert full[5:9, 10:21].all()
    # At downsample 2, centres are at 2c + 1: columns 5..9 (11..19), rows 3..4 (7, 9 < 9.5).
    half = rasterise(edges, 0, 0, 6, 12, downsample=2.0)
    assert np.argwhere(half).min(axis=0).tolist() == [3, 5]
    assert half.sum() == 5 * 2
    # Centres exactly on edges: inside on the left and top, outside on the right and bottom.
    on_centres = rasterise(ring_edges(shapely.box(10.5, 5.5, 20.5, 9.5)), 0, 0, 12, 24)
    assert np.argwhere(on_centres).min(axis=0).tolist() == [5, 10]
    assert np.argwhere(on_centres).max(axis=0).tolist() == [8, 19]
    assert on_centres.sum() == 10 * 4
    # A window offset into the image sees the same pixels.
    np.testing.assert_array_equal(rasterise(edges, 4, 9, 6, 13), full[4:10, 9:22])


@pytest.mark.parametrize("downsample", [1.0, 2.0, 4.0, 3.7])
def test_polygon_mask_matches_shapely_at_every_level(downsample: float) -> None:
    geometry = truth_geometry()
    mask = PolygonMask(geometry, SHAPE)
    height, width = (int(np.ceil(side / downsample)) for side in SHAPE)
    drawn = mask.read_region(0, 0, height, width, downsample)
    expected = reference(geometry, downsample)
    np.testing.assert_array_equal(drawn, expected)
    assert expected.sum() > 0.1 * expected.size  # the case is not trivially empty
    window = mask.read_region(3, 5, height // 2, width // 2, downsample)
    np.testing.assert_array_equal(window, expected[3 : 3 + height // 2, 5 : 5 + width // 2])


def test_polygon_mask_bands_and_block_sums() -> None:
    geometry = truth_geometry()
    mask = PolygonMask(geometry, SHAPE)
    full = reference(geometry, 1.0)
    np.testing.assert_array_equal(np.concatenate([b for _, b in mask.iter_bands(17)]), full)
    for factor, rows in [(1, None), (4, None), (7, 5)]:
        chunks = list(mask.iter_block_sums(factor, rows))
        counts = np.concatenate([c for _, c in chunks])
        limit = SHAPE[0] // factor if rows is None else rows
        cut = full[: limit * factor, : SHAPE[1] // factor * factor]
        expected = cut.reshape(limit, factor, -1, factor).sum(axis=(1, 3))
        np.testing.assert_array_equal(counts, expected)
        assert [top for top, _ in chunks] == list(np.cumsum([0] + [len(c) for _, c in chunks[:-1]]))
    with pytest.raises(UnshortcutError, match="leaves the image"):
        mask.read_region(80, 0, 20, 10)


def test_whole_slide_outline_is_drawn_in_bands() -> None:
    """A 2000-vertex outline with a hole over a 5000 x 5000 px area: exact, and summed
    into blocks without drawing the slide at once."""
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    radius = 2000 + 300 * np.sin(7 * t)
    outline = np.c_[2500 + radius * np.cos(t), 2500 + radius * np.sin(t)]
    hole = np.c_[2500 + 300 * np.cos(t), 2500 + 300 * np.sin(t)]
    geometry = shapely.Polygon(outline, [hole])
    mask = PolygonMask(geometry, (5000, 5000))
    counts = np.concatenate([c for _, c in mask.iter_block_sums(16)])
    rows, cols = np.mgrid[0:312, 0:312]
    assert counts.shape == (312, 312)
    # Blocks well inside or outside are full or empty, as shapely says of their centres.
    inside = shapely.contains_xy(geometry, cols * 16 + 8, rows * 16 + 8)
    boundary = shapely.distance(geometry.boundary, shapely.points(cols * 16 + 8, rows * 16 + 8))
    far = boundary > 16
    assert (counts[far & inside] == 256).all() and (counts[far & ~inside] == 0).all()
    assert abs(int(counts.sum()) - geometry.area) < 1e-3 * geometry.area


# --- parsers -----------------------------------------------------------------------------


def test_geojson_tumor_minus_exclusion_with_holes(tmp_path: Path) -> None:
    annotations = read_annotations(write_geojson(tmp_path / "a.geojson"), AnnotationClasses())
    assert annotations.tumor.symmetric_difference(truth_geometry()).area < 1e-9
    assert annotations.classes == {
        "Tumor": 2, "tumor": 1, "Exclusion": 1, "Stroma": 1, "unclassified": 1
    }  # fmt: skip
    assert annotations.roles == {"tumor": 2, "exclude": 1, "ignored": 3}
    mask = PolygonMask(annotations.tumor, SHAPE)
    for downsample in (1.0, 2.0, 4.0):
        height, width = (int(np.ceil(side / downsample)) for side in SHAPE)
        np.testing.assert_array_equal(
            mask.read_region(0, 0, height, width, downsample),
            reference(truth_geometry(), downsample),
        )


def test_geojson_forms_and_chosen_classes(tmp_path: Path) -> None:
    polygon = {"type": "Polygon", "coordinates": [ring(OUTER), ring(HOLE)]}
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(polygon))  # a bare geometry has no class
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([feature(polygon, "Tumor")]))  # older QuPath: a list
    single = tmp_path / "single.geojson"
    single.write_text(json.dumps(feature(polygon, "Tumor")))
    expected = shapely.Polygon(OUTER, [HOLE])
    for path in (as_list, single):
        tumor = read_annotations(path, AnnotationClasses()).tumor
        assert tumor.symmetric_difference(expected).area < 1e-9
    assert read_annotations(bare, AnnotationClasses()).tumor.is_empty
    chosen = AnnotationClasses(tumor=("unclassified",), exclude=())
    assert read_annotations(bare, chosen).tumor.symmetric_difference(expected).area < 1e-9
    # Stroma as tumor, the self-crossing bowtie as well: repaired into its two lobes.
    both = AnnotationClasses(tumor=("STROMA", "unclassified"), exclude=())
    tumor = read_annotations(write_geojson(tmp_path / "a.geojson"), both).tumor
    bowtie = shapely.make_valid(shapely.Polygon(BOWTIE))
    assert len(shapely.get_parts(bowtie)) == 2
    truth = shapely.union_all([shapely.Polygon(STROMA), bowtie])
    assert tumor.symmetric_difference(truth).area < 1e-9
    np.testing.assert_array_equal(
        PolygonMask(tumor, SHAPE).read_region(0, 0, *SHAPE), reference(truth, 1.0)
    )


def test_asap_groups_exclusions_and_levels(tmp_path: Path) -> None:
    annotations = read_annotations(write_asap(tmp_path / "a.xml"), AnnotationClasses())
    assert annotations.tumor.symmetric_difference(truth_geometry()).area < 1e-9
    assert annotations.roles == {"tumor": 3, "exclude": 2, "ignored": 2}
    mask = PolygonMask(annotations.tumor, SHAPE)
    for downsample in (1.0, 2.0, 3.7):
        height, width = (int(np.ceil(side / downsample)) for side in SHAPE)
        np.testing.assert_array_equal(
            mask.read_region(0, 0, height, width, downsample),
            reference(truth_geometry(), downsample),
        )
    # CAMELYON17 writes 'metastases'; a decimal comma is read as a point.
    text = asap_annotation("M", "Polygon", "metastases", OUTER, shuffle=False)
    (tmp_path / "c17.xml").write_text(
        f"<ASAP_Annotations><Annotations>{text.replace('10.3', '10,3')}</Annotations>"
        "</ASAP_Annotations>"
    )
    tumor = read_annotations(tmp_path / "c17.xml", AnnotationClasses()).tumor
    assert tumor.symmetric_difference(shapely.Polygon(OUTER)).area < 1e-9


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.geojson", "{not json", r"a\.geojson: not a readable GeoJSON file"),
        ("b.json", '{"type": "Topology"}', r"b\.json: expected a GeoJSON .* found Topology"),
        ("c.xml", "<ASAP_Annotations><Annotations>", r"c\.xml: not a readable ASAP XML"),
        ("d.xml", "<svg><rect/></svg>", r"d\.xml: not an ASAP annotation file \(root <svg>\)"),
        (
            "e.xml",
            '<ASAP_Annotations><Annotations><Annotation Name="x" Type="Polygon" '
            'PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="a" Y="1"/>'
            "</Coordinates></Annotation></Annotations></ASAP_Annotations>",
            r"e\.xml: annotation 'x' has a bad coordinate",
        ),
    ],
)
def test_bad_annotation_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(UnshortcutError, match=message):
        read_annotations(tmp_path / name, AnnotationClasses())


def test_classes_option_checks() -> None:
    with pytest.raises(UnshortcutError, match="--tumor-classes: give at least one"):
        AnnotationClasses(tumor=()).validate()
    with pytest.raises(UnshortcutError, match="tumor given as both"):
        AnnotationClasses(tumor=("Tumor",), exclude=("TUMOR",)).validate()


def test_tumor_mask_warnings(tmp_path: Path) -> None:
    stroma_only = tmp_path / "s.geojson"
    stroma_only.write_text(
        json.dumps(feature({"type": "Polygon", "coordinates": [ring(STROMA)]}, "Stroma"))
    )
    entry = ImageEntry("s", tmp_path / "s.png", None, annotation=stroma_only)
    tumor = open_tumor_mask(entry, SHAPE, AnnotationClasses())
    assert tumor.warnings == [
        "annotations/s.geojson: no polygon of a tumor class (Tumor, metastases, _0, _1) among "
        "Stroma; the image counts as tumor-free (choose classes with --tumor-classes)"
    ]
    assert not tumor.mask.read_region(0, 0, *SHAPE).any()
    # Polygons written at twice the level-0 scale mostly fall outside the image.
    doubled = [(2 * x, 2 * y) for x, y in OUTER]
    big = tmp_path / "b.geojson"
    big.write_text(
        json.dumps(feature({"type": "Polygon", "coordinates": [ring(doubled)]}, "Tumor"))
    )
    entry = ImageEntry("b", tmp_path / "b.png", None, annotation=big)
    (warning,) = open_tumor_mask(entry, SHAPE, AnnotationClasses()).warnings
    region = shapely.Polygon(doubled)
    outside = region.difference(shapely.box(0, 0, 120, 90)).area / region.area
    assert round(outside, 2) == 0.48
    assert warning == (
        "annotations/b.geojson: 48% of the tumor region lies outside the image (120 x 90 px); "
        "coordinates must be level-0 pixels"
    )
