"""Every parameter of the synthetic data generator, validated in one place.

The knobs are grouped by what they change: the dataset (how many images, sites,
patients), the geometry (how much tissue, how lacy normal tissue is, where tumor
sits) and the texture (how different tumor looks from normal tissue). The geometry
knobs plant the tissue-amount shortcut; the texture knobs set how hard the real
signal is. Calibrating the benchmark is meant to be a change of these defaults only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unshortcut.errors import UnshortcutError

CHANNEL_NAMES = ("CARS", "TPEF", "SHG")
"""Names of the first three channels; further channels are mixtures (``mix<k>``)."""

MIN_SIZE = 256
"""Smallest image side: a tissue section needs room for borders, holes and tumor."""

RECOMMENDED_PATCHIFY = {"patch_size": 64, "input_size": 32, "stride": 64}
"""Patch settings the default scale is designed for (nuclei stay visible at 32 px)."""


class SynthConfig(BaseModel):
    """Parameters of ``unshortcut synth``; all lengths are full-resolution pixels.

    Calibration (done once, on plain ERM only, then frozen; docs/synth.md): with the
    first defaults (8 images, 2 per patient, tumor_signal 1) the splits held a few
    patients and ERM reached a test balanced accuracy of only 0.80. The default became
    32 images of one patient each and tumor_signal 2, where ERM reaches balanced
    accuracy ~0.88 with worst-group accuracy ~0.45 (the paper's pattern).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # dataset
    images: int = Field(32, ge=1, description="Number of images.")
    size: int = Field(2048, ge=MIN_SIZE, description="Image side (longest side for layouts).")
    channels: int = Field(3, ge=1, le=8, description="Channels: CARS, TPEF, SHG, then mixtures.")
    seed: int = Field(0, ge=0, description="Master seed; image i uses its own child seed.")
    dtype: Literal["uint8", "uint16"] = Field("uint8", description="Stored pixel type.")
    compression: Literal["zlib", "zstd", "none"] = Field("zlib", description="TIFF codec.")
    images_per_patient: int = Field(1, ge=1, description="Images drawn from one patient.")
    sites: int = Field(2, ge=1, description="Acquisition sites, each with its own shift.")
    site_shift: float = Field(0.15, ge=0, le=1, description="Size of per-site gain/offset.")
    site_label_correlation: float = Field(
        0.0, ge=0, le=1, description="0: site independent of tumor; 1: site tells tumor."
    )
    write_split: bool = Field(False, description="Write a patient-level split column.")
    write_tissue: bool = Field(False, description="Export ground-truth tissue masks.")
    layouts: Path | None = Field(None, description="Folder of 0/1/2 layout PNGs to paint.")

    # geometry (procedural layouts)
    tumor_prevalence: float = Field(0.75, ge=0, le=1, description="Share of images with tumor.")
    max_sections: int = Field(3, ge=1, description="Tissue sections per image: 1..max.")
    section_scale: float = Field(0.24, gt=0, le=1, description="Section radius / image side.")
    border_roughness: float = Field(0.35, ge=0, description="Irregularity of section borders.")
    fragments: int = Field(6, ge=0, description="Small loose tissue fragments per image.")
    tear_fraction: float = Field(0.04, ge=0, lt=1, description="Share of tissue lost to tears.")
    hole_scale: float = Field(24.0, gt=2, description="Size of fat-like gaps in pixels.")
    normal_hole_fraction: float = Field(
        0.42, ge=0, lt=1, description="Gap share in lacy normal tissue (lacunarity)."
    )
    dense_normal_share: float = Field(
        0.3, ge=0, le=1, description="Share of normal tissue that is dense (no gaps)."
    )
    tumor_hole_fraction: float = Field(0.04, ge=0, lt=1, description="Gap share inside tumor.")
    tumor_area: float = Field(0.3, gt=0, lt=1, description="Tumor share of tissue, tumor images.")
    tumor_size: float = Field(200.0, gt=8, description="Typical tumor nodule radius in pixels.")
    tumor_edge_share: float = Field(
        0.35, ge=0, le=1, description="Share of tumor nodules seeded at a tissue border."
    )

    # texture
    tumor_signal: float = Field(
        2.0, ge=0, description="0: tumor looks normal; 1 weak; 2 default (calibrated)."
    )
    nucleus_diameter: float = Field(5.0, ge=2, description="Normal nucleus diameter (pixels).")
    nucleus_density: float = Field(4.0, gt=0, description="Normal nuclei per 1000 px^2.")
    fibre_density: float = Field(0.7, ge=0, le=1, description="Share of normal stroma with SHG.")
    noise: float = Field(0.02, ge=0, description="Detector noise (fraction of full scale).")

    @property
    def channel_names(self) -> list[str]:
        """Channel names in storage order."""
        extra = [f"mix{k}" for k in range(1, self.channels - len(CHANNEL_NAMES) + 1)]
        return [*CHANNEL_NAMES[: self.channels], *extra]


def make_config(**values: object) -> SynthConfig:
    """Build a :class:`SynthConfig`, turning validation failures into UnshortcutError."""
    try:
        return SynthConfig(**values)  # type: ignore[arg-type]
    except ValidationError as error:
        first = error.errors()[0]
        option = "-".join(str(part) for part in first["loc"]).replace("_", "-")
        raise UnshortcutError(f"--{option}: {first['msg']}") from None
