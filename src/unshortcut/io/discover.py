"""Find the images, masks and optional tissue masks of a dataset folder (contract 3.1).

Everything a user can get wrong in the folder is reported before any pixel is read:
missing folders, files that are not images, images without masks (and masks without
images), two files for one id, and masks whose size differs from their image. Sizes
come from file headers, so checking a folder of whole slides takes well under a second.
Hidden files (``.DS_Store``) and sub-folders (e.g. the data folder beside an ``.mrxs``)
are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unshortcut.errors import UnshortcutError
from unshortcut.io.readers import SUPPORTED_EXTENSIONS, image_extension, image_stem, open_image


@dataclass(frozen=True)
class ImageEntry:
    """One image of the dataset and the files that belong to it."""

    image_id: str
    image: Path
    mask: Path
    tissue: Path | None = None


def discover_dataset(data_dir: Path | str) -> list[ImageEntry]:
    """Entries for ``data_dir/images/*`` with their masks, sorted by image id."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UnshortcutError(f"{data_dir}: dataset folder does not exist")
    images = _files_by_id(data_dir / "images", required=True)
    if not images:
        raise UnshortcutError(f"{data_dir / 'images'}: folder holds no images")
    masks = _files_by_id(data_dir / "masks", required=True)
    tissue = _files_by_id(data_dir / "tissue", required=False)
    for image_id, path in images.items():
        if image_id not in masks:
            raise UnshortcutError(f"images/{path.name}: no mask in masks/")
    for folder, files in (("masks", masks), ("tissue", tissue)):
        orphans = sorted(path.name for image_id, path in files.items() if image_id not in images)
        if orphans:
            raise UnshortcutError(
                f"{data_dir / folder}: no image in images/ for {', '.join(orphans)}"
            )
    entries = [
        ImageEntry(image_id, images[image_id], masks[image_id], tissue.get(image_id))
        for image_id in sorted(images)
    ]
    for entry in entries:
        _check_same_size(entry.image, entry.mask)
    return entries


def _files_by_id(folder: Path, required: bool) -> dict[str, Path]:
    """image id -> file in ``folder``; errors for non-images and for two files with one id."""
    if not folder.is_dir():
        if required:
            raise UnshortcutError(
                f"{folder}: folder is missing (see the dataset layout in the docs)"
            )
        return {}
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    strangers = [p.name for p in files if image_extension(p) not in SUPPORTED_EXTENSIONS]
    if strangers:
        known = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        raise UnshortcutError(
            f"{folder}: not image files: {', '.join(strangers)} (supported: {known})"
        )
    found: dict[str, Path] = {}
    for path in files:
        image_id = image_stem(path)
        if image_id in found:
            raise UnshortcutError(
                f"{folder}: two files for image id {image_id!r}: "
                f"{found[image_id].name}, {path.name}"
            )
        found[image_id] = path
    return found


def _check_same_size(image: Path, mask: Path) -> None:
    shapes = []
    for path in (image, mask):
        reader = open_image(path)
        shapes.append(reader.level_shape(0))
        reader.close()
    image_shape, mask_shape = shapes
    if image_shape != mask_shape:
        raise UnshortcutError(
            f"masks/{mask.name}: size {mask_shape[1]} x {mask_shape[0]} (width x height) differs "
            f"from images/{image.name} ({image_shape[1]} x {image_shape[0]})"
        )
