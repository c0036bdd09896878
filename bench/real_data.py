"""ERM end to end on the real histology subsets in ../shared/data (camelyon16, bcss).

Prints, per data set, the shortcut audit (tissue ratio alone as a score for the label)
and ERM's test metrics with 95% image/region-bootstrap intervals. The sets are tiny
(one slide; three regions of interest), so the numbers show that the pipeline runs on
real data and how strong the shortcut is there, not a method ranking.

    python bench/real_data.py [--epochs 12] [--out bench/work/real]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sklearn.metrics import roc_auc_score

from unshortcut.config import load_config
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet
from unshortcut.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# Patch settings and attributes per set: camelyon16 is a 664 x 1500 thumbnail of one slide, so it is
# cut into 32 px patches split by spatial region; bcss holds three 2-4k px regions of
# interest without glass, split one image per split.
# interest without glass (tissue ratio 1 everywhere: a control with no tissue-size
# groups), split one image per split and grouped by class only.
DATASETS: dict[str, tuple[PatchifyConfig, str]] = {
    "camelyon16": (
        PatchifyConfig(
            patch_size=32, input_size=32, split_unit="region", min_object_size=4, seed=0
        ),
        "tissue_ratio",
    ),
    "bcss": (PatchifyConfig(patch_size=128, input_size=32, split_unit="image", seed=0), "none"),
}


def _pct(metrics: dict, key: str) -> str:
    value, ci = metrics.get(key), metrics.get(f"{key}_ci")
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench/work/real"))
    args = parser.parse_args()
    rows = []
    for name, (config, attribute) in DATASETS.items():
        start = time.perf_counter()
        patches = args.out / f"{name}-patches"
        patchify(SHARED / name, patches, config, overwrite=True)
        patch_set = PatchSet.open(patches)
        table = patch_set.table
        shortcut_auroc = roc_auc_score(table["label"], table["tissue_ratio"])
        specs = {"attributes": [attribute]} | ({"taus": [0.5]} if attribute != "none" else {})
        run = train(
            load_config(
                patches=patches,
                out=args.out / f"{name}-erm",
                method="erm",
                epochs=args.epochs,
                **specs,
            ),
            overwrite=True,
            progress=False,
        )
        test = json.loads((run / "metrics.json").read_text())["test"]
        counts = patch_set.table.groupby("split")["label"].agg(["size", "sum"])
        rows.append(
            f"| {name} | {len(patch_set.table)} | "
            + ", ".join(f"{s} {int(r['size'])}/{int(r['sum'])}" for s, r in counts.iterrows())
            + f" | {shortcut_auroc:.3f} | "
            + " | ".join(
                _pct(test, k)
                for k in ("balanced_accuracy", "worst_group_accuracy", "auroc", "robust_auroc")
            )
            + f" | {time.perf_counter() - start:.0f} s |"
        )
    print(
        "| set | patches | split: patches/tumor | tissue-ratio AUROC (all patches) | ERM BCA | "
        "ERM WGA | ERM AUROC | ERM robust AUROC | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
