"""Readers, masks, metadata and dataset discovery on generated files and the real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unshortcut.errors import UnshortcutError
from unshortcut.io.discover import ImageEntry, discover_dataset
from unshortcut.io.masks import open_mask
from unshortcut.io.metadata import read_metadata
from unshortcut.io.readers import TiffReader, iter_bands, iter_block_sums, open_image

RNG = np.random.default_rng(7)


def full(reader) -> np.ndarray:
    return reader.read_region(0, 0, *reader.level_shape(0))


def check_regions(reader, expected: np.ndarray) -> None:
    """Whole image, an interior region, and bands that do not align with any tile."""
    assert reader.level_shape(0) == expected.shape[:2]
    assert reader.channels == expected.shape[2]
    assert reader.dtype == expected.dtype
    np.testing.assert_array_equal(full(reader), expected)
    np.testing.assert_array_equal(reader.read_region(13, 21, 50, 70), expected[13:63, 21:91])
    bands = list(iter_bands(reader, 37))
    assert [y for y, _ in bands] == list(range(0, expected.shape[0], 37))
    np.testing.assert_array_equal(np.concatenate([b for _, b in bands]), expected)


# --- readers -----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_png(tmp_path: Path, channels: int) -> None:
    data = RNG.integers(0, 256, (120, 150, channels), dtype=np.uint8)
    Image.fromarray(data[..., 0] if channels == 1 else data).save(tmp_path / "a.png")
    with open_image(tmp_path / "a.png") as reader:
        check_regions(reader, data)


def test_png_16bit_and_rgba(tmp_path: Path) -> None:
    data = RNG.integers(0, 65536, (90, 100), dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "a.png")
    check_regions(open_image(tmp_path / "a.png"), data[..., None])
    rgba = RNG.integers(0, 256, (90, 100, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "b.png")
    check_regions(open_image(tmp_path / "b.png"), rgba[..., :3])  # alpha is dropped


def test_jpeg_matches_pillow_decode(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (100, 130, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "a.jpg", quality=90)
    expected = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
    check_regions(open_image(tmp_path / "a.jpg"), expected)


@pytest.mark.parametrize("layout", ["cyx", "yxc", "yx"])
def test_npy_channel_order(tmp_path: Path, layout: str) -> None:
    data = RNG.random((100, 120, 4)).astype(np.float32)
    stored = {"cyx": data.transpose(2, 0, 1), "yxc": data, "yx": data[..., 0]}[layout]
    np.save(tmp_path / "a.npy", stored)
    check_regions(open_image(tmp_path / "a.npy"), data[..., :1] if layout == "yx" else data)


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [
        (np.uint8, {}),
        (np.uint16, {"compression": "zlib", "rowsperstrip": 16}),
        (np.float32, {"tile": (32, 32), "compression": "zstd"}),
        (np.uint16, {"tile": (48, 64)}),
    ],
)
def test_tiff_dtypes(tmp_path: Path, dtype: type, kwargs: dict) -> None:
    data = (RNG.random((100, 150, 3)) * 1000).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="rgb", **kwargs)
    check_regions(open_image(tmp_path / "a.tif"), data)


def test_tiff_planar_and_plain_array_layouts(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    tifffile.imwrite(
        tmp_path / "planar.tif",
        data.transpose(2, 0, 1),
        photometric="rgb",
        planarconfig="separate",
        tile=(32, 32),
        compression="zlib",
    )
    check_regions(open_image(tmp_path / "planar.tif"), data)
    many = RNG.integers(0, 4000, (100, 150, 6), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "hwc.tif", many)  # stored as one page per row ('QYX')
    check_regions(open_image(tmp_path / "hwc.tif"), many)
    tifffile.imwrite(tmp_path / "chw.tif", many.transpose(2, 0, 1))
    check_regions(open_image(tmp_path / "chw.tif"), many)


@pytest.mark.parametrize("axes", ["CYX", "YXC"])
def test_ome_tiff_pyramid_five_channels(tmp_path: Path, axes: str) -> None:
    data = RNG.integers(0, 65536, (200, 260, 5), dtype=np.uint16)
    levels = [data, data[::2, ::2], data[::4, ::4]]
    stored = [lvl.transpose(2, 0, 1) if axes == "CYX" else lvl for lvl in levels]
    path = tmp_path / "a.ome.tif"
    options = {"tile": (64, 64), "compression": "zlib", "photometric": "minisblack"}
    if axes == "YXC":
        options["planarconfig"] = "contig"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(stored[0], subifds=2, metadata={"axes": axes}, **options)
        for level in stored[1:]:
            tif.write(level, subfiletype=1, **options)
    with open_image(path) as reader:
        assert isinstance(reader, TiffReader)
        check_regions(reader, data)
        assert reader.level_count == 3
        assert reader.level_shape(2) == (50, 65)
        assert reader.level_downsample(1) == 2.0
        np.testing.assert_array_equal(
            reader.read_region(5, 7, 40, 30, level=1), levels[1][5:45, 7:37]
        )
        np.testing.assert_array_equal(reader.read_region(0, 0, 50, 65, level=2), levels[2])


def test_tiff_bands_decode_each_tile_once(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (300, 250, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", data, tile=(64, 48), compression="jpeg", photometric="rgb")
    reader = open_image(tmp_path / "a.tif")
    keyframe = reader._levels[0].keyframe
    original, calls = keyframe.decode, []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    keyframe.__dict__["decode"] = counting
    bands = [band for _, band in reader.iter_bands(50)]  # 50 rows vs 64-row tiles
    assert sorted(calls) == list(range(5 * 6))
    expected = tifffile.imread(tmp_path / "a.tif")
    np.testing.assert_array_equal(np.concatenate(bands), expected)


def reference_block_sums(values: np.ndarray, factor: int) -> np.ndarray:
    """Block sums of the whole blocks of (h, w, C) values, in int64."""
    h, w = values.shape[0] // factor * factor, values.shape[1] // factor * factor
    blocks = values[:h, :w].astype(np.int64).reshape(h // factor, factor, w // factor, factor, -1)
    return blocks.sum(axis=(1, 3))


def joined_sums(chunks) -> np.ndarray:
    chunks = list(chunks)
    tops = [top for top, _ in chunks]
    assert tops == sorted(tops) and tops[0] == 0
    return np.concatenate([chunk for _, chunk in chunks])


@pytest.mark.parametrize(
    ("tile", "factor", "rows"),
    [((64, 48), 4, None), ((64, 48), 16, None), ((64, 48), 5, None), ((64, 48), 4, 30)],
)
def test_tiff_block_sums_per_tile(tmp_path: Path, tile: tuple, factor: int, rows) -> None:
    # 300 x 250 is no multiple of the tiles (padded edge tiles); factor 5 does not divide
    # them (band fallback); rows=30 stops early. All must equal the reference sums.
    data = RNG.integers(0, 65536, (300, 250, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data, tile=tile, compression="zlib", photometric="rgb")
    with open_image(tmp_path / "a.tif") as reader:
        sums = joined_sums(iter_block_sums(reader, factor, rows=rows))
    expected = reference_block_sums(data, factor)[:rows]
    assert sums.dtype == np.uint32
    np.testing.assert_array_equal(sums, expected)


def test_block_sums_of_ome_channel_pages_and_untiled_readers(tmp_path: Path) -> None:
    data = RNG.integers(0, 65536, (5, 130, 96), dtype=np.uint16)  # one page per channel
    tifffile.imwrite(
        tmp_path / "a.ome.tif", data, tile=(32, 32), compression="zlib", metadata={"axes": "CYX"}
    )
    np.save(tmp_path / "b.npy", data.transpose(1, 2, 0))
    expected = reference_block_sums(data.transpose(1, 2, 0), 8)
    for name in ("a.ome.tif", "b.npy"):
        with open_image(tmp_path / name) as reader:
            np.testing.assert_array_equal(joined_sums(iter_block_sums(reader, 8)), expected)
            np.testing.assert_array_equal(
                joined_sums(iter_block_sums(reader, 8, rows=3)), expected[:3]
            )


def test_region_outside_image_is_an_error(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((10, 20), np.uint8))
    reader = open_image(tmp_path / "a.npy")
    for region in [(-1, 0, 5, 5), (0, 0, 11, 5), (5, 18, 2, 3), (0, 0, 2, 2, 1)]:
        with pytest.raises(UnshortcutError, match=r"a\.npy: (region|level)"):
            reader.read_region(*region)


def test_bad_files_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "a.xyz").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(UnshortcutError, match=r"notes\.png: not a valid PNG image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(UnshortcutError, match=r"a\.xyz: unknown image format '\.xyz'"):
        open_image(tmp_path / "a.xyz")
    with pytest.raises(UnshortcutError, match="no such file"):
        open_image(tmp_path / "missing.tif")

    data = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "good.tif", data, tile=(64, 64), compression="zlib")
    blob = (tmp_path / "good.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(blob[: len(blob) // 2])  # tiles lost, header kept
    with pytest.raises(UnshortcutError, match=r"cut\.tif: cannot decode"):
        full(open_image(tmp_path / "cut.tif"))
    (tmp_path / "garbage.tif").write_bytes(b"II*\x00" + bytes(RNG.integers(0, 256, 64, np.uint8)))
    with pytest.raises(UnshortcutError, match=r"garbage\.tif: not a readable TIFF"):
        open_image(tmp_path / "garbage.tif")
    corrupt = bytearray(blob)
    offset = tifffile.TiffFile(tmp_path / "good.tif").pages[0].dataoffsets[3]
    corrupt[offset : offset + 200] = bytes(200)
    (tmp_path / "corrupt.tif").write_bytes(bytes(corrupt))
    with pytest.raises(UnshortcutError, match=r"corrupt\.tif: cannot decode"):
        full(open_image(tmp_path / "corrupt.tif"))

    Image.fromarray(data).save(tmp_path / "b.png")
    png = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(UnshortcutError, match=r"b\.png: cannot decode"):
        full(open_image(tmp_path / "b.png"))
    (tmp_path / "obj.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UnshortcutError, match=r"obj\.npy: not a readable \.npy"):
        open_image(tmp_path / "obj.npy")


def test_wsi_extension_without_valid_slide(tmp_path: Path) -> None:
    (tmp_path / "a.svs").write_text("not a slide")
    with pytest.raises(UnshortcutError, match=r"a\.svs: "):
        open_image(tmp_path / "a.svs")


# --- masks -------------------------------------------------------------------------------


def test_mask_encodings(tmp_path: Path) -> None:
    zero_one = (RNG.random((40, 50)) > 0.5).astype(np.uint8)
    Image.fromarray(zero_one).save(tmp_path / "01.png")
    mask = open_mask(tmp_path / "01.png")
    assert mask.threshold == 0 and mask.shape == (40, 50)
    np.testing.assert_array_equal(mask.read_region(0, 0, 40, 50), zero_one == 1)

    noisy = np.where(zero_one == 1, 255, 0).astype(np.uint8)
    noisy[:10] = np.arange(1, 128)[:50]  # JPEG-like noise 1..50 must stay background
    Image.fromarray(noisy).save(tmp_path / "255.png")
    mask = open_mask(tmp_path / "255.png")
    assert mask.threshold == 127
    np.testing.assert_array_equal(mask.read_region(0, 0, 40, 50), noisy > 127)
    assert not mask.read_region(0, 0, 10, 50).any()

    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0] = 200 * zero_one  # red annotation only
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(
        open_mask(tmp_path / "rgb.png").read_region(0, 0, 40, 50), zero_one == 1
    )

    np.save(tmp_path / "b.npy", zero_one.astype(bool))
    np.testing.assert_array_equal(
        open_mask(tmp_path / "b.npy").read_region(3, 4, 5, 6), zero_one[3:8, 4:10] == 1
    )

    palette = Image.fromarray(zero_one, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(
        open_mask(tmp_path / "p.png").read_region(0, 0, 40, 50), zero_one == 1
    )


def test_jpeg_mask_noise(tmp_path: Path) -> None:
    truth = np.zeros((64, 64), np.uint8)
    truth[13:45, 5:37] = 255  # edges off the 8 x 8 JPEG grid ring with noise
    Image.fromarray(truth).save(tmp_path / "m.jpg", quality=60)
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert ((raw > 0) & (raw <= 127)).any()  # the file really holds noise
    mask = open_mask(tmp_path / "m.jpg")
    np.testing.assert_array_equal(mask.read_region(0, 0, 64, 64), raw > 127)
    assert (mask.read_region(0, 0, 64, 64) == (truth > 0)).mean() > 0.99


def test_tiff_mask_bands(tmp_path: Path) -> None:
    truth = RNG.random((130, 90)) > 0.7
    tifffile.imwrite(
        tmp_path / "m.tif", truth.astype(np.uint8) * 255, tile=(32, 32), compression="zlib"
    )
    with open_mask(tmp_path / "m.tif") as mask:
        np.testing.assert_array_equal(np.concatenate([b for _, b in mask.iter_bands(20)]), truth)


def test_tiff_mask_peak_and_block_counts(tmp_path: Path) -> None:
    # Mostly empty tiles (identical compressed bytes, decoded once), one 0..255 region
    # in an edge tile: the encoding must come from an exact scan, not sampled rows.
    values = np.zeros((1000, 700), np.uint8)
    values[990:995, 690:695] = 255
    values[100:140, 30:90] = 1  # would be tumor in a 0/1 mask, is noise in a 0..255 one
    tifffile.imwrite(tmp_path / "m.tif", values, tile=(128, 128), compression="zlib")
    with open_mask(tmp_path / "m.tif") as mask:
        assert max(mask.reader.reduce_tiles(0, np.max)) == 255 and mask.threshold == 127
        counts = joined_sums(mask.iter_block_sums(5))
    np.testing.assert_array_equal(counts, reference_block_sums(values[..., None] > 127, 5)[..., 0])
    assert counts.sum() == 25
    zero_one = (values > 0).astype(np.uint8)
    tifffile.imwrite(tmp_path / "z.tif", zero_one, tile=(128, 128), compression="zlib")
    with open_mask(tmp_path / "z.tif") as mask:
        assert max(mask.reader.reduce_tiles(0, np.max)) == 1 and mask.threshold == 0
        assert joined_sums(mask.iter_block_sums(4)).sum() == zero_one.sum()


def test_shared_data_readers(shared_data: Path) -> None:
    with open_mask(shared_data / "bcss/masks/1008.jpg") as mask:
        raw = mask.reader.read_region(0, 0, *mask.shape)
        assert raw.shape[2] == 3 and mask.threshold == 127
        noise = (raw.max(axis=2) >= 1) & (raw.max(axis=2) <= 127)
        assert noise.sum() > 0
        binary = mask.read_region(0, 0, *mask.shape)
        assert not binary[noise].any()
        np.testing.assert_array_equal(binary, raw.max(axis=2) > 127)
    with open_image(shared_data / "camelyon16/images/Tumor_004.png") as image:
        assert image.level_shape(0) == (1500, 664) and image.channels == 3
        assert image.dtype == np.uint8
    with open_mask(shared_data / "camelyon16/masks/Tumor_004.png") as mask:
        raw = mask.reader.read_region(0, 0, 1500, 664)[..., 0]
        assert set(np.unique(raw)) == {0, 255}
        np.testing.assert_array_equal(mask.read_region(0, 0, 1500, 664), raw == 255)
        assert int(raw.astype(bool).sum()) == 3768


# --- discovery ---------------------------------------------------------------------------


def make_dataset(
    root: Path, ids: tuple[str, ...] = ("b", "a"), size: tuple[int, int] = (32, 40)
) -> Path:
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / "images" / f"{image_id}.png"
        )
        Image.fromarray(np.zeros(size, np.uint8)).save(root / "masks" / f"{image_id}.png")
    return root


def test_discover_dataset(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    tifffile.imwrite(root / "images" / "c.ome.tif", np.zeros((32, 40), np.uint8), ome=True)
    np.save(root / "masks" / "c.npy", np.zeros((32, 40), bool))
    (root / "images" / ".DS_Store").write_text("")
    (root / "tissue").mkdir()
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(root / "tissue" / "a.png")
    assert discover_dataset(root) == [
        ImageEntry("a", root / "images/a.png", root / "masks/a.png", root / "tissue/a.png"),
        ImageEntry("b", root / "images/b.png", root / "masks/b.png", None),
        ImageEntry("c", root / "images/c.ome.tif", root / "masks/c.npy", None),
    ]


def test_discover_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(UnshortcutError, match="dataset folder does not exist"):
        discover_dataset(tmp_path / "nope")
    (tmp_path / "d1").mkdir()
    with pytest.raises(UnshortcutError, match=r"d1/images: folder is missing"):
        discover_dataset(tmp_path / "d1")
    (tmp_path / "d1/images").mkdir()
    (tmp_path / "d1/images/.hidden").write_text("")
    with pytest.raises(UnshortcutError, match=r"images: folder holds no images"):
        discover_dataset(tmp_path / "d1")

    root = make_dataset(tmp_path / "d2")
    (root / "masks/a.png").unlink()
    with pytest.raises(
        UnshortcutError,
        match=r"^images/a\.png: no mask in masks/ or annotation in annotations/ \(for "
        r"tumor-free images pass --missing-mask negative\)$",
    ):
        discover_dataset(root)

    root = make_dataset(tmp_path / "d3")
    Image.fromarray(np.zeros((32, 41), np.uint8)).save(root / "masks/b.png")
    with pytest.raises(
        UnshortcutError,
        match=r"masks/b\.png: size 41 x 32 \(width x height\) fits images/b\.png \(40 x 32\) "
        r"at no integer scale",
    ):
        discover_dataset(root)

    root = make_dataset(tmp_path / "d4")
    (root / "images/readme.txt").write_text("hi")
    (root / "images/x.doc").write_text("hi")
    with pytest.raises(UnshortcutError, match=r"images: not image files: readme\.txt, x\.doc"):
        discover_dataset(root)

    root = make_dataset(tmp_path / "d5")
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(root / "masks/z.png")
    with pytest.raises(UnshortcutError, match=r"masks: no image in images/ for z\.png"):
        discover_dataset(root)

    root = make_dataset(tmp_path / "d6")
    np.save(root / "images/a.npy", np.zeros((32, 40), np.uint8))
    with pytest.raises(UnshortcutError, match=r"two files for image id 'a': a\.npy, a\.png"):
        discover_dataset(root)

    root = make_dataset(tmp_path / "d7")
    (root / "masks").rename(root / "labels")
    with pytest.raises(UnshortcutError, match=r"d7/masks: folder is missing"):
        discover_dataset(root)


def test_discover_shared_data(shared_data: Path) -> None:
    entries = discover_dataset(shared_data / "bcss")
    assert [e.image_id for e in entries] == ["1008", "1015", "1019"]
    assert len(discover_dataset(shared_data / "ocdc")) == 10


# --- metadata ----------------------------------------------------------------------------


def test_read_metadata(tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    path.write_text("image_id,patient_id,split,site,age\n0012,p1, Train,A,40\nb,p2,test,B,55.5\n")
    table = read_metadata(path, ["b", "0012"])
    assert list(table.columns) == ["image_id", "patient_id", "split", "site", "age"]
    assert list(table["image_id"]) == ["b", "0012"]
    assert list(table["split"]) == ["test", "train"]
    assert list(table["age"]) == [55.5, 40.0]
    path.write_text("image_id,site\na,X\n")
    assert list(read_metadata(path, ["a"]).columns) == ["image_id", "site"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "file is empty"),
        ("site\nA\n", "missing column image_id"),
        ("image_id\n", "has a header but no rows"),
        ("image_id\na\na\nb\n", "duplicate image ids: a"),
        ("image_id\na\nb\nq\nr\n", "unknown image ids: q, r"),
        ("image_id\na\n", "no row for images: b"),
        ("image_id,split\na,train\nb,holdout\n", "invalid split values: holdout"),
        ("image_id,split\na,train\nb,\n", "empty split in rows 3"),
        ('image_id,x\na,"unclosed\n', "not a readable CSV"),
    ],
)
def test_read_metadata_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "metadata.csv"
    path.write_text(text)
    with pytest.raises(UnshortcutError, match=f"^{path}: {message}"):
        read_metadata(path, ["a", "b"])
