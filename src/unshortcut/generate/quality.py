"""Quality checks written with every generation: do the patches look like their group?

Per group, next to a reference computed on real patches the same way:

- conditional accuracy: the share of generated patches the independent judge
  (:mod:`.judge`) gives the requested label and attribute bins, against the judge's
  accuracy on real validation patches of the group;
- a Frechet distance (FID-style, on the judge's penultimate features) between the
  group's generated and real training patches, against the distance between the
  group's real validation and real training patches (validation subsampled to the
  generated count, since the distance shrinks with the sample size);
- memorisation: the root-mean-square pixel distance (in [-1, 1] units) from each
  generated patch to its nearest real training patch, against the same distance
  for real validation patches; and the share of generated patches closer than all
  but 1 % of validation patches;
- a picture grid: generated patches (tumor-mask outline in yellow when the generator
  makes masks) above real training patches of the group.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import linalg

from unshortcut.generate.judge import Judge
from unshortcut.generate.targets import group_slug

# Real rows used as the reference of each distance (deterministic samples beyond this).
MAX_REFERENCE_ROWS = 5000
FID_RIDGE = 1e-6
GRID_COLUMNS = 8
GRID_ROWS = 2  # of generated patches; as many of real ones below


@dataclass
class LabelledRows:
    """Patches with the group and per-head target class of each row."""

    pixels: np.ndarray
    groups: np.ndarray
    targets: dict[str, np.ndarray]

    def take(self, index: np.ndarray) -> LabelledRows:
        return LabelledRows(
            self.pixels[index], self.groups[index], {h: t[index] for h, t in self.targets.items()}
        )


def read_rows(
    pixels: np.ndarray,
    rows: np.ndarray,
    groups: np.ndarray,
    targets: dict[str, np.ndarray],
    limit: int,
    rng: np.random.Generator,
) -> LabelledRows:
    """At most ``limit`` of the given rows (a random sample beyond), read in one sorted pass."""
    keep = np.arange(len(rows))
    if len(rows) > limit:
        keep = np.sort(rng.choice(len(rows), limit, replace=False))
    order = np.argsort(rows[keep])
    block = np.empty((len(keep), *pixels.shape[1:]), pixels.dtype)
    block[order] = pixels[rows[keep][order]]
    return LabelledRows(block, groups[keep], {h: t[keep] for h, t in targets.items()})


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two feature sets."""
    if len(a) < 2 or len(b) < 2:
        return None
    a, b = a.astype(np.float64), b.astype(np.float64)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Fewer samples than features make both covariances singular: a tiny ridge keeps
    # the square root defined (pytorch-fid's fallback, applied always).
    ridge = np.eye(len(cov_a)) * FID_RIDGE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(cov_a + cov_b - 2 * np.real(root)))


def nearest_distance(queries: np.ndarray, reference: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Per query, the root-mean-square difference to its nearest reference patch."""
    ref = torch.from_numpy(reference.reshape(len(reference), -1).astype(np.float32))
    out = []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[start : start + chunk].reshape(-1, ref.shape[1]))
        out.append(torch.cdist(q.float(), ref).min(dim=1).values.numpy())
    scale = np.sqrt(ref.shape[1])
    return (np.concatenate(out) / scale) if out else np.zeros(0, np.float32)


def _accuracy(predicted: dict[str, np.ndarray], wanted: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy per head and of all heads at once (None without rows)."""
    if not len(next(iter(wanted.values()))):
        return {h: None for h in [*wanted, "all"]}
    correct = {h: predicted[h] == wanted[h] for h in wanted}
    out: dict[str, Any] = {h: float(c.mean()) for h, c in correct.items()}
    out["all"] = float(np.logical_and.reduce(list(correct.values())).mean())
    return out


def _summary(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    return {"median": float(np.median(values)), "p05": float(np.percentile(values, 5)),
            "min": float(values.min())}  # fmt: skip


def quality_report(
    judge: Judge,
    *,
    generated: LabelledRows,
    generated_masks: np.ndarray | None,
    train: LabelledRows,
    val: LabelledRows,
    group_names: Sequence[str],
    donor_rules: dict[str, str],
    seed: int,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The ``quality.json`` content and the grid PNGs (relative path -> bytes)."""
    scaling = judge.scaling
    predicted = {name: judge.run(rows.pixels) for name, rows in
                 (("generated", generated), ("train", train), ("val", val))}  # fmt: skip
    scaled = {name: scaling.forward(rows.pixels) for name, rows in
              (("generated", generated), ("train", train), ("val", val))}  # fmt: skip
    gen_nn = nearest_distance(scaled["generated"], scaled["train"])
    val_nn = nearest_distance(scaled["val"], scaled["train"])
    val_p01 = float(np.percentile(val_nn, 1)) if len(val_nn) else None
    rng = np.random.default_rng([seed, 0xF1D])
    groups: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for g in np.unique(generated.groups):
        name = group_names[g]
        mine = generated.groups == g
        in_train, in_val = train.groups == g, val.groups == g
        features = {k: predicted[k][1] for k in predicted}
        val_index = np.flatnonzero(in_val)
        if len(val_index) > mine.sum():
            val_index = np.sort(rng.choice(val_index, int(mine.sum()), replace=False))
        grid = f"quality/{group_slug(name)}.png"
        files[grid] = picture_grid(
            scaled["generated"][mine][: GRID_ROWS * GRID_COLUMNS],
            None if generated_masks is None else generated_masks[mine][: GRID_ROWS * GRID_COLUMNS],
            scaled["train"][in_train][: GRID_ROWS * GRID_COLUMNS],
            name,
        )
        groups[name] = {
            "n_generated": int(mine.sum()),
            "donor_rule": donor_rules[name],
            "conditional_accuracy": _accuracy(
                {h: p[mine] for h, p in predicted["generated"][0].items()},
                {h: t[mine] for h, t in generated.targets.items()},
            ),
            "real_val_accuracy": {
                "n": int(in_val.sum()),
                **_accuracy(
                    {h: p[in_val] for h, p in predicted["val"][0].items()},
                    {h: t[in_val] for h, t in val.targets.items()},
                ),
            },
            "fid": frechet_distance(features["generated"][mine], features["train"][in_train]),
            "fid_real_val_vs_train": frechet_distance(
                features["val"][val_index], features["train"][in_train]
            ),
            "nearest_train_distance": {
                "generated": _summary(gen_nn[mine]),
                "real_val": _summary(val_nn[in_val]),
                "generated_closer_than_val_p01": None
                if val_p01 is None
                else float((gen_nn[mine] < val_p01).mean()),
            },
            "grid": grid,
        }
    overall = {
        "conditional_accuracy": _accuracy(predicted["generated"][0], generated.targets),
        "real_val_accuracy": {"n": len(val.groups), **_accuracy(predicted["val"][0], val.targets)},
        "nearest_train_distance": {"generated": _summary(gen_nn), "real_val": _summary(val_nn)},
    }
    report = {
        "judge": {"heads": judge.heads, "train_reference_rows": len(train.groups)},
        "overall": overall,
        "groups": groups,
    }
    return report, files


def to_rgb(scaled: np.ndarray) -> np.ndarray:
    """``(N, C, S, S)`` in [-1, 1] to ``(N, S, S, 3)`` in [0, 1]: the first three channels,
    two channels as red and green, one as grey."""
    x = (np.clip(scaled, -1, 1) + 1) / 2
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    elif x.shape[1] == 2:
        x = np.concatenate([x, np.zeros_like(x[:, :1])], axis=1)
    return x[:, :3].transpose(0, 2, 3, 1)


def picture_grid(
    generated: np.ndarray, masks: np.ndarray | None, real: np.ndarray, title: str
) -> bytes:
    """A PNG: rows of generated patches, then rows of real training patches of the group."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(GRID_COLUMNS * 0.9, 2 * GRID_ROWS * 0.9 + 0.5))
    axes = fig.subplots(2 * GRID_ROWS, GRID_COLUMNS, squeeze=False)
    images = {"generated": to_rgb(generated), "real": to_rgb(real)}
    for r, row in enumerate(axes):
        kind = "generated" if r < GRID_ROWS else "real"
        for c, ax in enumerate(row):
            ax.set_axis_off()
            k = (r % GRID_ROWS) * GRID_COLUMNS + c
            if k >= len(images[kind]):
                continue
            ax.imshow(images[kind][k], interpolation="nearest")
            if kind == "generated" and masks is not None and masks[k].max() > 127:
                ax.contour(masks[k] > 127, levels=[0.5], colors="yellow", linewidths=0.6)
        row[0].set_title(kind, fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
