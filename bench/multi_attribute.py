"""Several spurious attributes at once: tissue amount x acquisition site (synthetic data).

Every run is scored (and selected) on the intersectional groups label x tissue bin x site;
the variants differ in what the method trains with (``method_attributes``):

- ``erm``;
- ``gerne:tissue_ratio`` (tissue ratio binarised at tau = 0.5), ``gerne:tissue_ratio:q4``
  (training quartiles: a continuous attribute without a hand-picked tau), ``gerne:site``,
  ``gerne:intersection`` (tissue bin x site);
- ``groupdro:intersection``;
- ``mimm`` (one feature part and head per attribute: the raw tissue ratio, the site).

Protocol (bench/robustness.py's machinery): ``--trials`` random hyperparameter draws per
variant at seed 0 (trial 0 = defaults; the same draws for every GERNE variant, GERNE's
strength over each variant's own feasible range), the best by validation intersectional
worst-group accuracy, then ``--seeds`` seeds of it; test values are read only after
every choice. Reported per variant, test at the checkpoint chosen by validation WGA,
mean and std over seeds: intersectional WGA, balanced accuracy, per-attribute WGA, and
the decodability of each attribute from the features the class head reads (linear
probe fitted on validation features, scored on test: AUROC, its within-class version,
and R^2 for the tissue ratio).

Data: ``unshortcut synth`` defaults (seed 0) with ``--site-label-correlation 0.8`` and a
site shift calibrated on ERM alone by a rule fixed before any other method ran
(``calibrate``): the first of ``SITE_SHIFTS`` at which ERM (default hyperparameters,
seed 0) shows both shortcuts on *validation*, i.e. its worst-group accuracy over label x
tissue bin and over label x site each lies at least ``SHORTCUT_GAP`` below its balanced
accuracy. Patch sets are cached under ``bench/work/data/``; the calibration's ERM runs
are the experiment's own ERM trial 0, so nothing is trained twice.

Usage: python bench/multi_attribute.py [--trials 3] [--seeds 3] [--epochs 12] [--threads 1]
Writes bench/results/multi_attribute.json, the "## Several attributes (synth)" section
of docs/benchmarks.md and the benchmark section of docs/methods/mimm.md (only when
every variant ran).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import format_hparams, format_pct, format_stat
from robustness import (
    CARD_HEADING,
    DATA_CACHE,
    KNOWN,
    ROOT,
    Runner,
    Settings,
    _clock,
    finished,
    machine,
    mean_std,
    replace_section,
    split_counts,
    train_data,
)
from unshortcut.atomic import atomic_write_text
from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.inference import method_splits
from unshortcut.rows import GroupedSplit
from unshortcut.search import Trial, random_trials, select_best
from unshortcut.synth.config import RECOMMENDED_PATCHIFY, SynthConfig
from unshortcut.synth.generate import generate_dataset
from unshortcut.tiling.patchify import PatchifyConfig, patchify

ATTRIBUTES = ("tissue_ratio", "site")
"""The run's groups: label x tissue ratio (binarised at TAU) x site."""
TAU = 0.5
SITE_LABEL_CORRELATION = 0.8
"""Share of patients moved to the site of their label (synth's default is 0)."""
SITE_SHIFTS = (0.15, 0.3, 0.5)
"""Per-site gain/offset sizes tried in order (synth's default is 0.15)."""
SHORTCUT_GAP = 0.10
"""ERM shows a shortcut when its validation per-attribute WGA is this far below its BCA."""


@dataclass(frozen=True)
class Variant:
    """A row of the table: a method, the attributes it trains with ([] = all) and the
    hyperparameters it fixes (every trial of the variant has them; the rest is searched)."""

    label: str
    method: str
    method_attributes: tuple[str, ...] = ()
    hparams: tuple[tuple[str, Any], ...] = ()

    @property
    def folder(self) -> str:
        """Folder-safe name of the variant (``gerne@tissue_ratio-q4``)."""
        return self.label.partition(":")[2].replace(":", "-")


VARIANTS: tuple[Variant, ...] = (
    Variant("erm", "erm"),
    Variant("gerne:tissue_ratio", "gerne", ("tissue_ratio",)),
    Variant("gerne:tissue_ratio:q4", "gerne", ("tissue_ratio:q4",)),
    Variant("gerne:site", "gerne", ("site",)),
    Variant("gerne:intersection", "gerne"),
    Variant("groupdro:intersection", "groupdro"),
    Variant("mimm", "mimm"),
    # The closed-form estimator: no critic for the encoder to fool (docs/methods/mimm.md).
    Variant("mimm:gaussian", "mimm", (), (("estimator", "gaussian"),)),
    # The same with the MI term weighed up (mi_ratio fixed, the rest searched): how far
    # removing the attributes from the features moves the groups (a dose, not a choice).
    *(
        Variant(
            f"mimm:gaussian:x{ratio:g}",
            "mimm",
            (),
            (("estimator", "gaussian"), ("mi_ratio", ratio)),
        )
        for ratio in (2.0, 5.0)
    ),
)
MIMMS = tuple(v.label for v in VARIANTS if v.method == "mimm")
VARIANT_NAMES = tuple(v.label for v in VARIANTS)
CRITERION = KNOWN.criterion
"""Validation worst-group accuracy over the intersections: trials and checkpoints."""


# ----------------------------------------------------------------------------- data


def build_patches(correlation: float, shift: float, cache: Path = DATA_CACHE) -> Path:
    """The synthetic patch set with a label-correlated site shift, built once."""
    folder = cache / f"synth-sites-c{correlation:g}-s{shift:g}"
    patches = folder / "patches"
    if patches.is_dir():
        return patches
    source = folder / "data"
    if not source.is_dir():
        print(f"generating the images into {source}", flush=True)
        config = SynthConfig(seed=0, site_label_correlation=correlation, site_shift=shift)
        generate_dataset(config, source)
    print(f"patchifying {source} into {patches}", flush=True)
    patchify(source, patches, PatchifyConfig(**RECOMMENDED_PATCHIFY, seed=0))
    return patches


def method_train_split(patches: Path, variant: Variant) -> GroupedSplit:
    """The training split as the variant's method sees it (GERNE's beta range depends on it)."""
    data = train_data(patches, list(ATTRIBUTES), [TAU])
    if not variant.method_attributes:
        return data.splits["train"]
    return method_splits(data, variant.method_attributes, [TAU])["train"]


# ----------------------------------------------------------------------------- runs


@dataclass
class VariantRunner(Runner):
    """Robustness's runner with the intersectional groups and each variant's own attributes."""

    variants: dict[str, Variant] = field(default_factory=dict)

    def config(self, run: Path, tau: float, trial: Trial, seed: int, variant: str) -> TrainConfig:
        method_attributes = list(self.variants[variant].method_attributes) if variant else []
        return (
            super()
            .config(run, tau, trial, seed, variant)
            .model_copy(
                update={"attributes": list(ATTRIBUTES), "method_attributes": method_attributes}
            )
        )


def test_at(run: Path) -> dict[str, Any]:
    """Test metrics and decodability at the checkpoint CRITERION chose (after every choice)."""
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    entry = metrics["by_criterion"][CRITERION]
    return {**entry["test"], "decodability": entry["decodability"]}


def summarize(variant: Variant, trial: Trial, runs: list[Path]) -> dict[str, Any]:
    """One table row over the seed runs of the variant's chosen trial."""
    tests = [test_at(run) for run in finished(runs)]
    row: dict[str, Any] = {
        "method": variant.label,
        "method_attributes": list(variant.method_attributes) or ["all"],
        "trial": trial.index,
        "hparams": dict(trial.hparams) | dict(trial.training),
        "seeds_finished": len(tests),
        "seeds_run": len(runs),
        "runs": [str(run) for run in runs],
    }
    for key in ("worst_group_accuracy", "balanced_accuracy"):
        row[key] = mean_std([t.get(key) for t in tests])
    row["per_attribute"] = {
        column: {
            "worst_group_accuracy": mean_std(
                [t["per_attribute"][column]["worst_group_accuracy"] for t in tests]
            )
        }
        for column in ATTRIBUTES
    }
    row["decodability"] = {
        column: {
            key: mean_std([t["decodability"][column].get(key) for t in tests])
            for key in ("auroc", "auroc_within_class", "r2")
            if any(key in t["decodability"][column] for t in tests)
        }
        for column in ATTRIBUTES
    }
    return row


def run_experiment(
    patches: Path,
    work: Path,
    settings: Settings,
    variants: tuple[Variant, ...],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trials, selection on validation, seeds, then the rows (test read last)."""
    expected = len(variants) * (settings.trials + settings.seeds - 1)
    runner = VariantRunner(
        patches, work, settings, expected=expected, log=log,
        variants={v.folder: v for v in variants},
    )  # fmt: skip
    chosen: list[tuple[Variant, Trial, list[Path]]] = []
    for variant in variants:
        split = method_train_split(patches, variant)
        trials = [
            replace(t, hparams=t.hparams | dict(variant.hparams))
            for t in random_trials(variant.method, settings.trials, train=split)
        ]
        folders = [runner.run(TAU, t, seed=0, variant=variant.folder) for t in trials]
        best = select_best(finished(folders))[KNOWN.name].get(variant.method)
        if best is None:
            log(f"{variant.label}: no finished trial")
            continue
        trial = trials[folders.index(best.path)]
        seeds = [runner.run(TAU, trial, s, variant.folder) for s in range(settings.seeds)]
        chosen.append((variant, trial, seeds))
    # Every choice is made: only now are test values read.
    rows = [summarize(variant, trial, seeds) for variant, trial, seeds in chosen]
    trained = [i["seconds"] for i in runner.runs.values() if i["seconds"] is not None]
    return {
        "settings": asdict(settings),
        "attributes": list(ATTRIBUTES),
        "tau": TAU,
        "criterion": CRITERION,
        "patches": str(patches),
        "counts": split_counts(patches),
        "rows": rows,
        "floors": floors(rows),
        "runs_trained": len(trained),
        "runs_reused": len(runner.runs) - len(trained),
        "seconds_per_trained_run": sum(trained) / len(trained) if trained else None,
    }


def calibrate(
    runner_for: Callable[[Path], VariantRunner], settings: Settings, log: Callable[[str], None]
) -> tuple[Path, list[dict[str, Any]]]:
    """The first site shift at which ERM shows both shortcuts on validation, and the table.

    ``runner_for(patches)`` gives the runner of a patch set, so the ERM run of each
    candidate is the experiment's own ERM trial 0 at seed 0 (reused, never retrained).
    Reads validation metrics only; no other method runs before the data is chosen.
    """
    erm = next(v for v in VARIANTS if v.label == "erm")
    table: list[dict[str, Any]] = []
    patches = Path()
    for shift in SITE_SHIFTS:
        patches = build_patches(SITE_LABEL_CORRELATION, shift)
        trial = random_trials("erm", 1)[0]
        run = runner_for(patches).run(TAU, trial, seed=0, variant=erm.folder)
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        val = metrics["by_criterion"][CRITERION]["val"]
        row = {
            "site_shift": shift,
            "balanced_accuracy": val["balanced_accuracy"],
            **{
                f"{column}_wga": val["per_attribute"][column]["worst_group_accuracy"]
                for column in ATTRIBUTES
            },
        }
        row["both_shortcuts"] = all(
            row[f"{c}_wga"] <= row["balanced_accuracy"] - SHORTCUT_GAP for c in ATTRIBUTES
        )
        table.append(row)
        log(f"calibration: {row}")
        if row["both_shortcuts"]:
            break
    return patches, table


# ----------------------------------------------------------------------------- report


def floors(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """mimm and the best GERNE variant vs ERM on intersectional WGA (floor +5 points each),
    and whether mimm brings each attribute's probe AUROC closer to 0.5 than ERM's."""
    by = {r["method"]: r for r in rows}
    if "erm" not in by:
        return None

    def wga(name: str) -> float:
        return by[name]["worst_group_accuracy"]["mean"] or 0.0

    erm = wga("erm")
    gernes = [name for name in by if name.startswith("gerne:")]
    result: dict[str, Any] = {}
    if gernes:
        best = max(gernes, key=wga)
        result["best_gerne"] = best
        result["best_gerne_wga_gain_points"] = 100 * (wga(best) - erm)
    for name in (n for n in MIMMS if n in by):
        result[f"{name}_wga_gain_points"] = 100 * (wga(name) - erm)
        result[f"{name}_closer_to_chance"] = {
            column: abs(_auroc(by[name], column) - 0.5) < abs(_auroc(by["erm"], column) - 0.5)
            for column in ATTRIBUTES
        }
    result["met"] = (
        result.get("best_gerne_wga_gain_points", -1) >= 5
        and result.get("mimm_wga_gain_points", -1) >= 5
        and all(result.get("mimm_closer_to_chance", {0: False}).values())
    )
    return result


def _auroc(row: dict[str, Any], column: str) -> float:
    return row["decodability"][column]["auroc"]["mean"]


def markdown(result: dict[str, Any], context: dict[str, str]) -> str:
    """The "## Several attributes (synth)" section of docs/benchmarks.md."""
    s = result["settings"]
    counts = result["counts"]
    synth = result["synth"]
    tried = "; ".join(
        f"shift {r['site_shift']:g}: BCA {100 * r['balanced_accuracy']:.1f}, tissue WGA "
        f"{100 * r['tissue_ratio_wga']:.1f}, site WGA {100 * r['site_wga']:.1f}"
        for r in synth["calibration"]
    )
    lines = [
        "## Several attributes (synth)",
        "",
        "`python bench/multi_attribute.py`: synthetic data with two shortcuts, tissue amount "
        f"and a site intensity shift (`unshortcut synth --site-label-correlation "
        f"{synth['site_label_correlation']:g} --site-shift {synth['site_shift']:g}`, otherwise "
        "defaults). The site shift was calibrated on ERM alone by a rule fixed beforehand: "
        f"the first of {', '.join(f'{v:g}' for v in SITE_SHIFTS)} at which ERM (defaults, "
        "seed 0) shows both shortcuts on validation, each per-attribute worst-group accuracy "
        f"at least {100 * synth['shortcut_gap']:.0f} points below its balanced accuracy "
        f"(validation %, {tried}). Every "
        "run is scored and selected on the 8 intersectional groups label x tissue ratio "
        f"(tau {TAU:g}) x site; variants differ in the groups the method trains with, or "
        "fix hyperparameters (`mimm:gaussian`: the closed-form estimator; `:x2`, `:x5`: "
        "with `mi_ratio` 2 and 5, a dose of the MI term, not a choice). Each "
        f"variant: {s['trials']} random trials (trial 0 = defaults) at seed 0, the best by "
        f"validation intersectional worst-group accuracy, then {s['seeds']} seeds; epochs "
        f"{s['epochs']}, batch size {s['batch_size']}, model {s['model']}. Test %, mean ± std "
        "over seeds, at the checkpoint chosen by the same criterion.",
        "",
        "Patches per split (tumor / all): "
        + ", ".join(f"{k} {c['tumor']} / {c['patches']}" for k, c in counts.items())
        + ".",
        "",
        "| method | intersectional WGA | BCA | tissue-ratio WGA | site WGA | selected |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        per = r["per_attribute"]
        seeds = r["seeds_finished"], r["seeds_run"]
        note = "" if seeds[0] == seeds[1] else f" ({seeds[0]}/{seeds[1]} seeds)"
        lines.append(
            f"| {r['method']} | {format_pct(r['worst_group_accuracy'])}{note} | "
            f"{format_pct(r['balanced_accuracy'])} | "
            f"{format_pct(per['tissue_ratio']['worst_group_accuracy'])} | "
            f"{format_pct(per['site']['worst_group_accuracy'])} | trial {r['trial']}: "
            f"{format_hparams(r['hparams'])} |"
        )
    lines += [
        "",
        "Decodability of each attribute from the features the class head reads (linear probe "
        "fitted on validation, scored on test; AUROC 0.5 = not decodable; within class = "
        "averaged over the two labels, what the features hold beyond the label; the tissue "
        "ratio's AUROC is for above its validation median, R^2 for the raw value):",
        "",
        "| method | tissue AUROC | tissue AUROC within class | tissue R^2 | site AUROC | "
        "site AUROC within class |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        tissue, site = r["decodability"]["tissue_ratio"], r["decodability"]["site"]
        lines.append(
            f"| {r['method']} | {format_stat(tissue.get('auroc'), digits=2)} | "
            f"{format_stat(tissue.get('auroc_within_class'), digits=2)} | "
            f"{format_stat(tissue.get('r2'), digits=2)} | "
            f"{format_stat(site.get('auroc'), digits=2)} | "
            f"{format_stat(site.get('auroc_within_class'), digits=2)} |"
        )
    if result["rows"]:
        best = max(result["rows"], key=lambda r: r["worst_group_accuracy"]["mean"] or 0.0)
        lines += [
            "",
            f"Best intersectional WGA: {best['method']} "
            f"({format_pct(best['worst_group_accuracy'])}). Why the group methods win and "
            "removing the attributes from the features does not help here: "
            "docs/methods/mimm.md, What it does.",
        ]
    f = result["floors"]
    if f:
        mimms = [
            f"{name} - ERM intersectional WGA {f[f'{name}_wga_gain_points']:+.1f} points "
            "(floor +5), probe AUROC closer to 0.5 than ERM's: "
            + ", ".join(
                f"{c} {'yes' if v else 'no'}" for c, v in f[f"{name}_closer_to_chance"].items()
            )
            for name in MIMMS
            if f"{name}_wga_gain_points" in f
        ]
        lines += [
            "",
            f"Floors: {'; '.join(mimms)}; best GERNE variant ({f.get('best_gerne')}) - ERM "
            f"{f.get('best_gerne_wga_gain_points', 0):+.1f} points (floor +5). All met (mimm "
            f"with its default estimator): {'yes' if f['met'] else 'no'}.",
        ]
    per_run = result["seconds_per_trained_run"]
    lines += [
        "",
        f"Command: `{context['command']}`",
        "",
        f"Date: {context['date']}; machine: {context['machine']}; wall time {context['wall']} "
        f"({result['runs_trained']} runs trained, {result['runs_reused']} reused"
        + ("" if per_run is None else f", {per_run:.0f} s per trained run")
        + ").",
        "",
    ]
    return "\n".join(lines)


def card_section(result: dict[str, Any]) -> str:
    """The mimm card's benchmark section: its row beside ERM's and the best GERNE's."""
    by = {r["method"]: r for r in result["rows"]}
    lines = [
        CARD_HEADING,
        "",
        "Written by `python bench/multi_attribute.py` from `bench/results/multi_attribute.json` "
        "(protocol in docs/benchmarks.md, section Several attributes). Synthetic data with "
        "two shortcuts (tissue ratio, site); test %, mean ± std over seeds, scored on the "
        "intersectional groups.",
        "",
        "| data | tau | method | intersectional WGA | BCA | tissue AUROC | site AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (*MIMMS, "erm", (result["floors"] or {}).get("best_gerne")):
        if name in by:
            r = by[name]
            decode = r["decodability"]
            lines.append(
                f"| synth | {TAU:g} | {name} | {format_pct(r['worst_group_accuracy'])} | "
                f"{format_pct(r['balanced_accuracy'])} | "
                f"{format_stat(decode['tissue_ratio']['auroc'], digits=2)} | "
                f"{format_stat(decode['site']['auroc'], digits=2)} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=list(VARIANT_NAMES))
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=0, help="intervals are not reported here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "multi_attribute")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--card", type=Path, default=ROOT / "docs" / "methods" / "mimm.md")
    args = p.parse_args(argv)
    if args.trials < 1 or args.seeds < 1:
        p.error("--trials and --seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings(
        taus=(TAU,),
        methods=tuple(dict.fromkeys(v.method for v in VARIANTS if v.label in args.variants)),
        trials=args.trials,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
        threads=args.threads,
        val_unknown=False,
    )
    variants = tuple(v for v in VARIANTS if v.label in args.variants)
    started = time.monotonic()

    def runner_for(patches: Path) -> VariantRunner:
        work = args.work / patches.parent.name
        return VariantRunner(patches, work, settings, expected=1)

    try:
        patches, calibration = calibrate(runner_for, settings, print)
        result = run_experiment(patches, args.work / patches.parent.name, settings, variants)
    except UnshortcutError as error:
        sys.exit(f"error: {error}")
    synth = {
        "site_label_correlation": SITE_LABEL_CORRELATION,
        "site_shift": calibration[-1]["site_shift"],
        "calibration": calibration,
        "shortcut_gap": SHORTCUT_GAP,
    }
    result["synth"] = synth
    context = {
        "command": shlex.join(
            ["python", "bench/multi_attribute.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "wall": _clock(time.monotonic() - started),
    }
    section = markdown(result, context)
    print(section)
    if set(variants) != set(VARIANTS):
        print("partial run: results, docs and card left as they are")
        return
    results = args.results / "multi_attribute.json"
    atomic_write_text(results, json.dumps({**result, **context}, indent=2) + "\n")
    atomic_write_text(args.doc, replace_section(args.doc.read_text(encoding="utf-8"), section))
    card = args.card.read_text(encoding="utf-8")
    atomic_write_text(args.card, replace_section(card, card_section(result)))
    print(f"wrote {results}, the section of {args.doc} and of {args.card}")


if __name__ == "__main__":
    main()
