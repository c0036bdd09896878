"""Stain variation for RGB brightfield (H&E) patches: HED jitter and stain normalisation.

H&E colour varies between sites, scanners and staining batches, and a classifier can
learn that variation as a shortcut. Two remedies, both for 8-bit RGB brightfield data
only (multimodal and fluorescence images have no stains; :func:`check_brightfield`
refuses them):

HED jitter (:class:`HedJitter`, augmentation)
    Colour deconvolution (Ruifrok & Johnston) with scikit-image's matrices
    (``skimage.color.hed_from_rgb`` / ``rgb_from_hed``) turns a pixel's optical density
    ``OD = -ln(I / 255)`` into hematoxylin, eosin and DAB amounts; each patch gets its
    own random scale ``a ~ U(1 - scale, 1 + scale)`` and shift ``b ~ U(-shift, shift)``
    per stain (Tellez et al., MedIA 2019; shifts in optical-density units: their
    "HED-light" and "HED-strong" are 0.05 and 0.2), and the result is turned
    back into RGB and clipped to 0..255. The three steps are linear in log space, so
    they collapse into one 3x3 matrix and one offset per patch,
    ``ln I' = ln I @ (M diag(a) R) - b @ R``, applied to the whole batch as one batched
    matrix product in torch: calling ``skimage.color.rgb2hed`` / ``hed2rgb`` per image
    would cost two float64 passes and a Python call per patch. Unlike ``rgb2hed`` it
    does not clip negative stain amounts, so zero strength is exactly the identity.

Stain normalisation (:class:`StainNormalizer`, preprocessing)
    Maps every patch's colours onto one target fitted on training patches:
    Macenko (stain vectors and 99th-percentile concentrations) or Reinhard (LAB mean
    and standard deviation), both torchstain's implementations. The target is fitted on
    the pooled pixels of :func:`reference_rows`: a seeded sample of tissue-rich patches
    of the training split (never validation or test), so the target is the training
    set's average stain rather than one patch's. A fitted normaliser is a few numbers,
    saved as JSON in a run folder (:meth:`StainNormalizer.save`), and applies to a batch
    (``normalizer(x)``) or to a whole pixel store once (:func:`normalize_store`).
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

from unshortcut.atomic import atomic_file, atomic_write_text
from unshortcut.errors import UnshortcutError

#: White level of 8-bit brightfield images: the pixel store's units before normalisation.
RGB_MAX = 255.0
#: Smallest intensity fraction before the logarithm (scikit-image's choice).
_MIN_INTENSITY = 1e-6
#: Macenko parameters (torchstain's defaults): transmitted light, angle percentile,
#: optical density below which a pixel counts as unstained.
MACENKO_LIGHT, MACENKO_PERCENTILE, MACENKO_MIN_OD = 240.0, 1.0, 0.15
#: Fewer stained pixels than this fraction of a patch: nothing to normalise, kept as is.
MIN_STAINED_FRACTION = 0.05
#: Rows per chunk when normalising a pixel store.
STORE_CHUNK = 256


def require_rgb(channels: int, what: str) -> None:
    """Stain operations need three (RGB) channels."""
    if channels != 3:
        raise UnshortcutError(
            f"{what}: needs RGB brightfield (H&E) patches with 3 channels, got {channels} "
            "(multimodal and fluorescence data have no H&E stains)"
        )


def check_brightfield(manifest: Mapping[str, Any], source: str) -> None:
    """Refuse a patch set that is not 8-bit RGB brightfield, from its manifest.

    Three uint8 channels are not enough (the synthetic multimodal data has them too):
    any image whose tissue detection found a dark background (fluorescence, CARS/TPEF/
    SHG) is refused as well. Tissue-only crops (no background, polarity ``none``) pass.
    """
    require_rgb(int(manifest["channels"]), f"{source}: stain augmentation/normalisation")
    if manifest["dtype"] != "uint8":
        raise UnshortcutError(
            f"{source}: stain augmentation/normalisation needs 8-bit RGB brightfield "
            f"patches, this patch set stores {manifest['dtype']}"
        )
    images = manifest.get("images") or {}
    dark = [
        name for name, info in images.items() if info.get("tissue_polarity") == "dark-background"
    ]
    if dark:
        raise UnshortcutError(
            f"{source}: stain augmentation/normalisation is for brightfield (H&E) images, "
            f"but {len(dark)} image(s) have a dark background (first: {dark[0]}), as "
            "multimodal or fluorescence images do"
        )


# --------------------------------------------------------------------------- HED jitter


def jitter_hed(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Scale and shift each patch's H, E and DAB amounts; ``x`` is (N, 3, S, S) in 0..255.

    ``scale`` and ``shift`` are (N, 3); shifts are optical densities (natural log).
    Returns a new float tensor clipped to 0..255.
    """
    require_rgb(x.shape[1], "HED jitter")
    to_hed = torch.from_numpy(hed_from_rgb)  # float64: the 3x3 products stay exact
    to_rgb = torch.from_numpy(rgb_from_hed)
    transform = (to_hed * scale.double()[:, None, :]) @ to_rgb  # (N, 3, 3), row vectors
    # In 0..255 units, ln(y / 255) = (ln(x / 255)) @ T - b @ R becomes
    # ln y = ln x @ T + offset with offset = -b @ R + ln(255) * (1 - column sums of T).
    offset = -(shift.double() @ to_rgb) + math.log(RGB_MAX) * (1 - transform.sum(dim=1))
    n, _, h, w = x.shape
    log_x = x.float().clamp(min=RGB_MAX * _MIN_INTENSITY).log_().reshape(n, 3, h * w)
    # One batched product for the whole batch, the offset fused in: (N, 3, 3) @ (N, 3, HW).
    log_y = torch.baddbmm(offset.to(log_x)[:, :, None], transform.transpose(1, 2).to(log_x), log_x)
    return log_y.exp_().clamp_(max=RGB_MAX).view(n, 3, h, w)


@dataclass(frozen=True)
class HedJitter:
    """Random per-patch HED scale and shift (module doc); ``scale = shift = 0`` is the identity.

    Call it on raw pixels (0..255, before the per-channel normalisation). The random
    numbers come only from ``generator``, drawn in a fixed order (scales, then shifts),
    so a batch's result depends only on the generator's state.
    """

    scale: float = 0.05
    shift: float = 0.05

    def __post_init__(self) -> None:
        if not (0 <= self.scale < 1 and self.shift >= 0):
            raise UnshortcutError(
                f"HED jitter: needs 0 <= scale < 1 and shift >= 0 (got {self.scale}, {self.shift})"
            )

    def __call__(
        self,
        x: torch.Tensor,
        generator: torch.Generator,
        rows: np.ndarray | None = None,
        drawn: int | None = None,
    ) -> torch.Tensor:
        """Jitter ``x``; the random numbers are drawn for ``drawn`` patches (default
        ``len(x)``) and those at ``rows`` used, so a rank's share of a batch gets exactly
        what the same patches get in one process."""
        n = x.shape[0] if drawn is None else drawn
        scale = 1 + self.scale * (
            2 * torch.rand(n, 3, generator=generator, dtype=torch.float64) - 1
        )
        shift = self.shift * (2 * torch.rand(n, 3, generator=generator, dtype=torch.float64) - 1)
        if rows is not None:
            pick = torch.from_numpy(np.asarray(rows, dtype=np.int64))
            scale, shift = scale[pick], shift[pick]
        return jitter_hed(x, scale.to(x.device), shift.to(x.device))


# ----------------------------------------------------------------- stain normalisation


def reference_rows(
    table: pd.DataFrame, count: int = 64, seed: int = 0, min_tissue: float = 0.5
) -> np.ndarray:
    """Sorted pixel-store rows of up to ``count`` training patches to fit a normaliser on.

    Only the training split is eligible. Patches with at least ``min_tissue`` tissue
    are preferred (glass carries no stain); when there are none, any training patch.
    The sample is uniform and depends only on ``seed``.
    """
    train = table["split"].to_numpy() == "train"
    rich = train & (table["tissue_ratio"].to_numpy() >= min_tissue)
    candidates = np.flatnonzero(rich if rich.any() else train)
    if len(candidates) == 0:
        raise UnshortcutError("stain normalisation: the patch set has no training patches")
    rng = np.random.default_rng([seed, 0x57A1])
    chosen = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
    return np.sort(chosen).astype(np.int64)


class StainNormalizer(ABC):
    """A fitted stain normaliser: call it on (N, 3, S, S) batches in 0..255.

    Subclasses are frozen dataclasses holding only the fitted target, so
    ``to_dict``/``from_dict`` (and ``save``/``load``) round-trip exactly.
    """

    method: ClassVar[str]

    @abstractmethod
    def normalize_one(self, image: torch.Tensor) -> torch.Tensor:
        """One (3, S, S) float image in 0..255 mapped onto the target (same shape)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each patch of a batch; patches with too little stain stay as they are.

        A patch with fewer than :data:`MIN_STAINED_FRACTION` stained pixels (nearly
        empty glass) or whose fit degenerates (a singular matrix, non-finite values)
        is returned unchanged: there is no stain in it to map.
        """
        require_rgb(x.shape[1], f"{self.method} stain normalisation")
        x = x.float()
        out = x.clone()
        for i, image in enumerate(x):
            if _stained_fraction(image) < MIN_STAINED_FRACTION:
                continue
            try:
                result = self.normalize_one(image)
            except torch.linalg.LinAlgError:
                continue
            if torch.isfinite(result).all():
                out[i] = result
        return out

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised and rounded to 8-bit levels: the values :func:`normalize_store`
        writes, so a batch normalised on the fly equals the same rows of a stored copy."""
        return self(x).round_().clamp_(0, RGB_MAX)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    def key(self) -> str:
        """A short digest of the fitted target: names the cached copy of a store."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @staticmethod
    def from_dict(data: Mapping[str, Any], source: str = "stain normaliser") -> StainNormalizer:
        kind = NORMALIZERS.get(str(data.get("method")))
        if kind is None:
            raise UnshortcutError(
                f"{source}: unknown stain normalisation method {data.get('method')!r} "
                f"(known: {', '.join(NORMALIZERS)})"
            )
        try:
            return kind.from_fields({k: v for k, v in data.items() if k != "method"})
        except (TypeError, ValueError) as error:
            raise UnshortcutError(f"{source}: not a valid {kind.method} target ({error})") from None

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @staticmethod
    def load(path: Path) -> StainNormalizer:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UnshortcutError(f"{path}: unreadable stain normaliser ({error})") from None
        if not isinstance(data, dict):
            raise UnshortcutError(f"{path}: not a stain normaliser")
        return StainNormalizer.from_dict(data, str(path))


def _stained_fraction(image: torch.Tensor) -> float:
    """Fraction of pixels whose optical density is at least Macenko's threshold in all channels."""
    od = -torch.log((image + 1) / MACENKO_LIGHT)
    return float((od >= MACENKO_MIN_OD).all(dim=0).float().mean())


def _mosaic(reference: torch.Tensor) -> torch.Tensor:
    """(K, 3, S, S) patches as one (3, K * S, S) image: both fits pool pixels, not patches."""
    require_rgb(reference.shape[1], "stain normalisation reference")
    if reference.shape[0] == 0:
        raise UnshortcutError("stain normalisation: no reference patches to fit on")
    k, c, h, w = reference.shape
    return reference.float().permute(1, 0, 2, 3).reshape(c, k * h, w)


def _floats(values: Any, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """Nested tuples of floats with exactly ``shape`` (what the dataclasses hold)."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape != shape or not np.isfinite(array).all():
        raise ValueError(f"expected {shape} finite numbers, got shape {array.shape}")
    return tuple(map(tuple, array.tolist())) if array.ndim == 2 else tuple(array.tolist())


class _ReproducibleMacenko(TorchMacenkoNormalizer):
    """torchstain's Macenko with a bitwise reproducible stain-concentration solve.

    torchstain solves ``HE @ C = OD`` with ``torch.linalg.lstsq``, whose MKL kernel
    is not bitwise reproducible on the CPU (measured: about 4% of identical calls
    differ in the last bits of every element), which made two fits of the same patches
    differ. ``C = pinv(HE) @ OD`` is the same least-squares solution (``HE`` has full
    column rank); written as three element-wise multiply-adds it has no reduction whose
    order could vary. Overrides the private (name-mangled) step; a test checks it exists.
    """

    def _TorchMacenkoNormalizer__find_concentration(
        self, od: torch.Tensor, stains: torch.Tensor
    ) -> torch.Tensor:
        solve = torch.linalg.pinv(stains.double()).float()  # (2, 3)
        return (
            solve[:, 0:1] * od[:, 0] + solve[:, 1:2] * od[:, 1] + solve[:, 2:3] * od[:, 2]
        )  # (2, P) from the (P, 3) optical densities


@dataclass(frozen=True)
class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. (ISBI 2009) through torchstain.

    ``stain_matrix`` (3 x 2): optical-density vectors of hematoxylin (column 0) and eosin
    (column 1) over R, G, B; ``max_concentrations``: their 99th-percentile amounts.
    """

    stain_matrix: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    max_concentrations: tuple[float, float]
    method: ClassVar[str] = "macenko"

    @classmethod
    def fit(cls, reference: torch.Tensor) -> MacenkoNormalizer:
        """The target of the pooled pixels of (K, 3, S, S) reference patches in 0..255."""
        fitter = _ReproducibleMacenko()
        fitter.fit(_mosaic(reference), MACENKO_LIGHT, MACENKO_PERCENTILE, MACENKO_MIN_OD)
        return cls.from_fields(
            {"stain_matrix": fitter.HERef.tolist(), "max_concentrations": fitter.maxCRef.tolist()}
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> MacenkoNormalizer:
        return cls(
            stain_matrix=_floats(fields["stain_matrix"], (3, 2)),
            max_concentrations=_floats(fields["max_concentrations"], (2,)),
        )

    def normalize_one(self, image: torch.Tensor) -> torch.Tensor:
        normalizer = _ReproducibleMacenko()
        normalizer.HERef = torch.tensor(self.stain_matrix, dtype=torch.float32)
        normalizer.maxCRef = torch.tensor(self.max_concentrations, dtype=torch.float32)
        out, _, _ = normalizer.normalize(
            image, MACENKO_LIGHT, MACENKO_PERCENTILE, MACENKO_MIN_OD, stains=False
        )
        return out.permute(2, 0, 1).float()


@dataclass(frozen=True)
class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. (2001) through torchstain: LAB mean and standard deviation per channel.

    torchstain's LAB units: L in 0..100, a and b centred on 0.
    """

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    method: ClassVar[str] = "reinhard"

    @classmethod
    def fit(cls, reference: torch.Tensor) -> ReinhardNormalizer:
        fitter = TorchReinhardNormalizer()
        fitter.fit(_mosaic(reference))
        return cls.from_fields(
            {"lab_mean": fitter.target_means.tolist(), "lab_std": fitter.target_stds.tolist()}
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> ReinhardNormalizer:
        return cls(
            lab_mean=_floats(fields["lab_mean"], (3,)), lab_std=_floats(fields["lab_std"], (3,))
        )

    def normalize_one(self, image: torch.Tensor) -> torch.Tensor:
        normalizer = TorchReinhardNormalizer()
        normalizer.target_means = torch.tensor(self.lab_mean, dtype=torch.float32)
        normalizer.target_stds = torch.tensor(self.lab_std, dtype=torch.float32)
        return normalizer.normalize(image).permute(2, 0, 1).float()  # it returns (S, S, 3)


NORMALIZERS: dict[str, type[MacenkoNormalizer] | type[ReinhardNormalizer]] = {
    "macenko": MacenkoNormalizer,
    "reinhard": ReinhardNormalizer,
}


def fit_stain_normalizer(method: str, reference: torch.Tensor) -> StainNormalizer:
    """Fit ``method`` ("macenko" or "reinhard") on (K, 3, S, S) reference patches in 0..255."""
    if method not in NORMALIZERS:
        raise UnshortcutError(
            f"--stain-normalization: unknown method {method!r} (known: {', '.join(NORMALIZERS)})"
        )
    return NORMALIZERS[method].fit(reference)


def fit_on_patch_set(
    pixels: np.ndarray,
    table: pd.DataFrame,
    manifest: Mapping[str, Any],
    method: str,
    source: str,
    count: int = 64,
    seed: int = 0,
) -> StainNormalizer:
    """Check the patch set is brightfield RGB and fit on its training reference patches."""
    check_brightfield(manifest, source)
    rows = reference_rows(table, count=count, seed=seed)
    return fit_stain_normalizer(method, torch.from_numpy(np.array(pixels[rows])))


def normalize_store(
    normalizer: StainNormalizer, pixels: np.ndarray, target: Path, chunk: int = STORE_CHUNK
) -> None:
    """Write ``normalizer`` applied to every patch of a (N, 3, S, S) uint8 store as ``.npy``.

    Streams ``chunk`` patches at a time into a temporary file renamed into place at the
    end, so a crash never leaves a partial store under ``target``.
    """
    require_rgb(pixels.shape[1], f"{target}: stain normalisation")
    with atomic_file(Path(target)) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=pixels.shape)
        for start in range(0, len(pixels), chunk):
            block = torch.from_numpy(np.array(pixels[start : start + chunk]))  # a writable copy
            out[start : start + chunk] = normalizer.as_stored(block).to(torch.uint8).numpy()
        out.flush()
        del out


#: Folder of a patch set that holds its stain-normalised copies.
STAIN_CACHE = "stain-cache"


def cached_normalized_store(
    normalizer: StainNormalizer, pixels: np.ndarray, patch_set: Path
) -> np.ndarray:
    """A read-only memory map of the whole store normalised once.

    The copy lives in ``PATCHES/stain-cache/<method>-<digest>.npy``, named by the
    fitted target, so every run with that target (seeds, methods of a sweep) reuses
    it; replacing the patch set (``patchify --overwrite``) replaces the folder and the
    copies with it. Written atomically: a killed run leaves no partial copy. A patch
    set folder that cannot be written to is a user error.
    """
    path = Path(patch_set) / STAIN_CACHE / f"{normalizer.method}-{normalizer.key()}.npy"
    if not path.is_file():
        try:
            path.parent.mkdir(exist_ok=True)
            normalize_store(normalizer, pixels, path)
        except OSError as error:
            raise UnshortcutError(
                f"{path}: cannot write the stain-normalised copy of the pixel store ({error}); "
                "stain normalisation needs a writable patch set folder"
            ) from None
    stored = np.load(path, mmap_mode="r")
    if stored.shape != pixels.shape or stored.dtype != np.uint8:
        raise UnshortcutError(f"{path}: a stain-normalised copy of another store; delete it")
    return stored
