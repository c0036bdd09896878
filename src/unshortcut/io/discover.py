"""Find the images, their tumor masks or annotations, and tissue masks (contract 3.1).

Everything a user can get wrong in the folder is reported before any pixel is read:
missing folders, files that are not images, images without masks (and masks without
images), two files for one id, an image with both a raster mask and an annotation
file, and masks whose size fits their image at no integer scale. Sizes come from file
headers, so checking a folder of whole slides takes well under a second. Hidden files
(``.DS_Store``) and sub-folders (e.g. the data folder beside an ``.mrxs``) are ignored.

An image's tumor comes from ``masks/<id>.*`` (a raster mask, full resolution or the
image shrunk by an integer factor) or ``annotations/<id>.geojson|.json|.xml``
(polygons). With ``missing_mask="negative"`` an image with neither is tumor-free;
the default refuses it, so a forgotten mask is never silently read as "no tumor".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unshortcut.errors import UnshortcutError
from unshortcut.io.annotation_classes import ANNOTATION_EXTENSIONS
from unshortcut.io.masks import mask_scale
from unshortcut.io.readers import SUPPORTED_EXTENSIONS, image_extension, image_stem, open_image

MISSING_MASK_RULES = ("error", "negative")


@dataclass(frozen=True)
class ImageEntry:
    """One image of the dataset and the files that belong to it.

    ``mask`` and ``annotation`` are exclusive; both are None for a tumor-free image
    admitted by ``missing_mask="negative"``. ``mask_scale`` is how many image pixels
    one mask pixel spans along each side (1: same size).
    """

    image_id: str
    image: Path
    mask: Path | None
    tissue: Path | None = None
    annotation: Path | None = None
    mask_scale: int = 1


def discover_dataset(data_dir: Path | str, missing_mask: str = "error") -> list[ImageEntry]:
    """Entries for ``data_dir/images/*`` with their masks, sorted by image id."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UnshortcutError(f"{data_dir}: dataset folder does not exist")
    if missing_mask not in MISSING_MASK_RULES:
        raise UnshortcutError(
            f"--missing-mask: unknown rule {missing_mask!r} (use {', '.join(MISSING_MASK_RULES)})"
        )
    images = _files_by_id(data_dir / "images", required=True)
    if not images:
        raise UnshortcutError(f"{data_dir / 'images'}: folder holds no images")
    annotations = _files_by_id(
        data_dir / "annotations", False, ANNOTATION_EXTENSIONS, _annotation_stem
    )
    masks_required = missing_mask == "error" and not (data_dir / "annotations").is_dir()
    masks = _files_by_id(data_dir / "masks", required=masks_required)
    tissue = _files_by_id(data_dir / "tissue", required=False)
    for image_id, path in images.items():
        if image_id in masks and image_id in annotations:
            raise UnshortcutError(
                f"images/{path.name}: has both masks/{masks[image_id].name} and "
                f"annotations/{annotations[image_id].name}; keep one"
            )
        if missing_mask == "error" and image_id not in masks and image_id not in annotations:
            raise UnshortcutError(
                f"images/{path.name}: no mask in masks/ or annotation in annotations/ "
                "(for tumor-free images pass --missing-mask negative)"
            )
    for folder, files in (("masks", masks), ("annotations", annotations), ("tissue", tissue)):
        orphans = sorted(path.name for image_id, path in files.items() if image_id not in images)
        if orphans:
            raise UnshortcutError(
                f"{data_dir / folder}: no image in images/ for {', '.join(orphans)}"
            )
    return [
        ImageEntry(
            image_id,
            images[image_id],
            masks.get(image_id),
            tissue.get(image_id),
            annotations.get(image_id),
            _checked_scale(images[image_id], masks[image_id]) if image_id in masks else 1,
        )
        for image_id in sorted(images)
    ]


def _files_by_id(
    folder: Path,
    required: bool,
    extensions: frozenset[str] = SUPPORTED_EXTENSIONS,
    stem: Callable[[Path], str] = image_stem,
) -> dict[str, Path]:
    """image id -> file in ``folder``; errors for other files and for two files with one id."""
    if not folder.is_dir():
        if required:
            raise UnshortcutError(
                f"{folder}: folder is missing (see the dataset layout in the docs)"
            )
        return {}
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    strangers = [p.name for p in files if image_extension(p) not in extensions]
    if strangers:
        kind = "image" if extensions is SUPPORTED_EXTENSIONS else "annotation"
        known = ", ".join(sorted(extensions))
        raise UnshortcutError(
            f"{folder}: not {kind} files: {', '.join(strangers)} (supported: {known})"
        )
    found: dict[str, Path] = {}
    for path in files:
        image_id = stem(path)
        if image_id in found:
            raise UnshortcutError(
                f"{folder}: two files for image id {image_id!r}: "
                f"{found[image_id].name}, {path.name}"
            )
        found[image_id] = path
    return found


def _annotation_stem(path: Path) -> str:
    """Image id of an annotation file: ``a.geojson`` and ``a.svs.geojson`` (QuPath names
    exports after the image, extension included) both belong to image ``a``."""
    stem = path.name[: -len(path.suffix)]
    return image_stem(Path(stem)) if image_extension(Path(stem)) in SUPPORTED_EXTENSIONS else stem


def _checked_scale(image: Path, mask: Path) -> int:
    """How many image pixels one mask pixel spans; refuses sizes that fit no integer scale."""
    shapes = []
    for path in (image, mask):
        reader = open_image(path)
        shapes.append(reader.level_shape(0))
        reader.close()
    image_shape, mask_shape = shapes
    scale = mask_scale(image_shape, mask_shape)
    if scale is None:
        raise UnshortcutError(
            f"masks/{mask.name}: size {mask_shape[1]} x {mask_shape[0]} (width x height) fits "
            f"images/{image.name} ({image_shape[1]} x {image_shape[0]}) at no integer scale "
            "(a mask must be the image's size, or the image shrunk by a whole factor)"
        )
    return scale
