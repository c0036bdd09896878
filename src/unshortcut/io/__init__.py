"""Lazy readers for images, masks, annotations and metadata (contract 3.1 of ARCHITECTURE.md).

``readers.open_image`` gives an :class:`~unshortcut.io.base.ImageReader` for PNG, JPEG,
TIFF/OME-TIFF (tiled, pyramidal, any channel count), NPY and OpenSlide formats;
``masks.open_mask`` a boolean view of a mask (binary or label map, any integer scale);
``annotations.read_annotations`` the tumor region of a QuPath GeoJSON or ASAP XML file,
which ``rasterise.PolygonMask`` draws band by band; ``tumor.open_tumor_mask`` whichever
of these an image has; ``metadata.read_metadata`` the checked metadata.csv;
``discover.discover_dataset`` the image/mask/annotation/tissue files of a folder.
"""
