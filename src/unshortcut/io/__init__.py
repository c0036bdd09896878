"""Lazy readers for images, masks and metadata (contract 3.1 of ARCHITECTURE.md).

``readers.open_image`` gives an :class:`~unshortcut.io.base.ImageReader` for PNG, JPEG,
TIFF/OME-TIFF (tiled, pyramidal, any channel count), NPY and OpenSlide formats;
``masks.open_mask`` a boolean view of a mask; ``metadata.read_metadata`` the checked
metadata.csv; ``discover.discover_dataset`` the image/mask/tissue files of a folder.
"""
