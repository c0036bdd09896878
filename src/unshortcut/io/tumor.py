"""One image's tumor mask, whatever the user brought: a raster mask, polygons, or nothing.

Tiling reads every tumor mask through the same small interface (``shape``,
``read_region``, ``iter_bands``, ``iter_block_sums`` at the image's level-0
resolution), so it never knows which of these it got:

* a raster mask of the image's size (:class:`~unshortcut.io.masks.MaskReader`), binary
  or a label map read with ``tumor_values``;
* a raster mask shrunk by an integer factor, shown at full size by nearest neighbour
  (:class:`~unshortcut.io.masks.ScaledMask`);
* an annotation file, drawn band by band (:class:`~unshortcut.io.rasterise.PolygonMask`);
* nothing, for a tumor-free image admitted by ``--missing-mask negative`` (an empty
  polygon mask, which costs nothing to read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from unshortcut.io.annotation_classes import AnnotationClasses
from unshortcut.io.masks import MaskReader, ScaledMask, open_mask

if TYPE_CHECKING:
    from unshortcut.io.annotations import Annotations
    from unshortcut.io.discover import ImageEntry
    from unshortcut.io.rasterise import PolygonMask

#: Share of the tumor region that may lie outside the image before a warning.
OUTSIDE_SHARE = 0.01


@dataclass
class TumorMask:
    """An opened tumor mask, what it was made from (for the manifest), and its warnings."""

    mask: MaskReader | ScaledMask | PolygonMask
    source: str
    warnings: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.mask.close()


def open_tumor_mask(
    entry: ImageEntry,
    image_shape: tuple[int, int],
    classes: AnnotationClasses,
    tumor_values: tuple[int, ...] | None = None,
    tissue_values: tuple[int, ...] | None = None,
) -> TumorMask:
    """The tumor mask of ``entry`` at the image's level-0 ``image_shape`` (see module doc).

    ``tumor_values`` reads raster masks as label maps (``tissue_values`` are then the
    other values they may hold); annotation files use ``classes``.
    """
    if entry.annotation is not None:
        return _drawn(entry.annotation, image_shape, classes)
    if entry.mask is None:
        return _tumor_free(image_shape)
    raster = open_mask(entry.mask, tumor_values, tissue_values or ())
    encoding = (
        f"label map, tumor values {', '.join(map(str, tumor_values))}"
        if tumor_values
        else f"binary, foreground > {raster.threshold:g}"
    )
    if entry.mask_scale == 1:
        return TumorMask(raster, f"mask {entry.mask.name} ({encoding})")
    scaled = ScaledMask(raster, entry.mask_scale, image_shape)
    return TumorMask(scaled, f"mask {entry.mask.name} ({encoding}, 1/{entry.mask_scale} scale)")


# Polygons need shapely, imported here only: raster-only data sets never load it.


def _drawn(path: Path, image_shape: tuple[int, int], classes: AnnotationClasses) -> TumorMask:
    from unshortcut.io.annotations import read_annotations
    from unshortcut.io.rasterise import PolygonMask

    annotations = read_annotations(path, classes)
    mask = PolygonMask(annotations.tumor, image_shape, path)
    source = f"annotation {annotations.summary()}"
    return TumorMask(mask, source, _annotation_warnings(annotations, image_shape, classes))


def _tumor_free(image_shape: tuple[int, int]) -> TumorMask:
    import shapely

    from unshortcut.io.rasterise import PolygonMask

    return TumorMask(PolygonMask(shapely.Polygon(), image_shape), "none: tumor-free")


def _annotation_warnings(
    annotations: Annotations, image_shape: tuple[int, int], classes: AnnotationClasses
) -> list[str]:
    """Signs that an annotation file does not say what the user meant."""
    import shapely

    name = f"annotations/{annotations.path.name}"
    warnings = []
    if annotations.classes and not annotations.roles["tumor"]:
        found = ", ".join(sorted(annotations.classes))
        warnings.append(
            f"{name}: no polygon of a tumor class ({', '.join(classes.tumor)}) among "
            f"{found}; the image counts as tumor-free (choose classes with --tumor-classes)"
        )
    region = annotations.tumor
    if not region.is_empty:
        height, width = image_shape
        outside = region.difference(shapely.box(0, 0, width, height)).area / region.area
        if outside > OUTSIDE_SHARE:
            warnings.append(
                f"{name}: {outside:.0%} of the tumor region lies outside the image "
                f"({width} x {height} px); coordinates must be level-0 pixels"
            )
    return warnings
