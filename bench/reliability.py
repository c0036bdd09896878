"""Fault-injection campaign: kills, full disks, read-only folders, damaged files, hostile input.

Larger than the test suites (tests/test_kill.py, tests/test_fuzz.py, tests/test_reliability.py),
with the same harness:

- **kill -9**: the real CLI in a fresh process, SIGKILL to its process group at seeded
  random points (after k units of work: images, epochs, runs; plus a random part of one
  unit), ``--kills`` times in a row, then the rerun or ``--resume`` runs to the end. A
  watcher reads the output all along. Survived: the final bytes equal an uninterrupted
  run's, no reader saw a half-written patch set or run, no leftovers. For patchify (one
  and two workers), training with every registered method, ``--overwrite`` and
  ``--epochs`` extension of a finished run (readers must see a finished run throughout),
  a sweep, ``generate train`` (resumed: the same weights), ``generate sample`` and
  ``predict`` (each image folder whole or absent).
- **disk full**: a small tmpfs (needs root; skipped otherwise) sized to run out part way;
  the command must stop with one ``error:`` line; after the disk is enlarged the same
  command (or ``--resume``) must end with the bytes of an unhindered run.
- **read-only**: every command that writes (patchify, train, audit, synth, report,
  sweep, predict, generate train and sample), into a folder it may not write to: one
  ``error:`` line, exit 2, nothing written.
- **damage and hostile input**: tests/test_fuzz.py under the hypothesis profile "bench"
  (``--examples`` per test); every example must end in a clean error or a detection.

Writes bench/results/reliability.json (rows: faults injected, inputs tried, runs, survived,
data lost) and prints the table. ``data lost`` counts differing or missing outputs,
half-written states a reader saw, damage not detected and tracebacks: it must be 0.

Usage: ``python bench/reliability.py [--kills 4] [--examples 200] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from kill_harness import PREDICTION_FILES, Scenario, campaign, files, run_cli  # noqa: E402
from reliability_helpers import read_only  # noqa: E402
from test_data import write_toy_patch_set  # noqa: E402
from test_generate_e2e import write_generator_toy  # noqa: E402
from test_kill import (  # noqa: E402
    GENERATOR,
    GENERATOR_TOML,
    PATCH_SET,
    TRAIN,
    finished_folders,
    generate_sample_scenario,
    generate_train_scenario,
    generator_outputs,
    patchify_scenario,
    predict_scenario,
    replace_scenario,
    run_outputs,
    sweep_scenario,
    train_scenario,
    write_train_toml,
)
from unshortcut.atomic import atomic_write_text  # noqa: E402
from unshortcut.config import TrainConfig  # noqa: E402
from unshortcut.generate import GeneratorConfig, train_generator  # noqa: E402
from unshortcut.methods import method_names  # noqa: E402
from unshortcut.synth import generate_dataset, make_config  # noqa: E402
from unshortcut.tiling.patchify import PatchifyConfig, patchify  # noqa: E402
from unshortcut.train import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"


def row(name: str, faults: int, inputs: int, runs: int, survived: int, lost: int,
        note: str = "") -> dict[str, Any]:  # fmt: skip
    return {"name": name, "faults": faults, "inputs": inputs, "runs": runs,
            "survived": survived, "lost": lost, "note": note}  # fmt: skip


def inputs(root: Path) -> dict[str, Path]:
    generate_dataset(make_config(images=6, size=256, seed=2), root / "data")
    patches = write_toy_patch_set(root / "patches", n=240)
    made = {}
    for name, epochs in (("old", 1), ("two", 2)):
        config = TrainConfig(patches=patches, out=root / name, epochs=epochs, batch_size=32,
                             lr=0.02, device="cpu", num_threads=1)  # fmt: skip
        made[name] = train(config, progress=False)
    # predict needs a run on a patchify cut (it cuts images the same way)
    cut = patchify(root / "data", root / "cut", PatchifyConfig(patch_size=32, input_size=8))
    config = TrainConfig(patches=cut.path, out=root / "cut-run", epochs=1, batch_size=32,
                         lr=0.02, device="cpu", num_threads=1, bootstrap=0)  # fmt: skip
    made["predict_run"] = train(config, progress=False)
    made["generator_patches"] = write_generator_toy(root / "generator-patches")
    config = GeneratorConfig(patches=made["generator_patches"], out=root / "generator",
                             epochs=1, **GENERATOR)  # fmt: skip
    made["generator"] = train_generator(config)
    return {"data": root / "data", "patches": patches, **made}


def images(given: dict[str, Path]) -> list[Path]:
    return sorted((given["data"] / "images").glob("*.tif"))


def prepare(folder: Path) -> None:
    """The settings files the commands read (training, generator)."""
    write_train_toml(folder)
    (folder / "gen.toml").write_text(GENERATOR_TOML)


# --------------------------------------------------------------------------- kills


def kill_rows(root: Path, given: dict[str, Path], kills: int, quick: bool) -> list[dict]:
    scenarios: list[tuple[str, Scenario]] = [
        ("patchify", patchify_scenario(given["data"], 1)),
        ("patchify --workers 2", patchify_scenario(given["data"], 2)),
    ]
    methods = method_names()[:2] if quick else method_names()
    scenarios += [(f"train {m}", train_scenario(given["patches"], m)) for m in methods]
    scenarios += [
        ("train --overwrite (finished run)", replace_scenario(given["patches"], given["old"],
                                                              False)),
        ("train --resume --epochs (finished run)", replace_scenario(given["patches"],
                                                                    given["two"], True)),
        ("sweep", sweep_scenario(given["patches"])),
        ("generate train", generate_train_scenario(given["generator_patches"])),
        ("generate sample", generate_sample_scenario(given["generator"])),
        ("predict", predict_scenario(given["predict_run"], images(given))),
    ]  # fmt: skip
    rows = []
    for name, scenario in scenarios:
        folder = root / re.sub(r"\W+", "-", name)
        outcome = campaign(scenario, folder, kills=kills, seed=len(rows))
        print(f"  {name}: {outcome.kills} kills, {outcome.missed} after the end, "
              f"{outcome.reads} reads {sorted(outcome.states)}, lost {outcome.lost}",
              flush=True)  # fmt: skip
        rows.append(row(f"kill -9: {name}", outcome.kills, outcome.reads, 1,
                        int(outcome.survived), len(outcome.lost),
                        f"{outcome.reads} reads while running"))  # fmt: skip
    return rows


# ------------------------------------------------------------------------ disk full


def _mount(folder: Path, megabytes: float) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    size = f"size={max(int(megabytes * 1024), 64)}k"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(folder)],
                          capture_output=True, check=False)  # fmt: skip
    return done.returncode == 0


def _remount(folder: Path, megabytes: float) -> None:
    size = f"remount,size={int(megabytes * 1024)}k"
    subprocess.run(["mount", "-o", size, str(folder)], check=True)


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def disk_full_rows(root: Path, given: dict[str, Path], quick: bool) -> list[dict]:
    """Each command on a tmpfs too small for it, then enlarged; compared with a run on a
    disk with room."""
    generate = ["generate", "train", str(given["generator_patches"]), "--out", "gen",
                "--epochs", "2", "--config", "gen.toml", "--quiet"]  # fmt: skip
    predict = ["predict", str(given["predict_run"]), *map(str, images(given)), "--out", "pred",
               "--device", "cpu", "--thumbnail-size", "128"]  # fmt: skip

    def predicted(out: Path) -> dict[str, bytes]:
        found = [(f.name, files(f, PREDICTION_FILES)) for f in finished_folders(out)]
        return {f"{name}/{n}": b for name, kept in found for n, b in kept.items()}

    # (name, command, output, its bytes, what to run after the disk is enlarged)
    cases = [
        ("patchify", ["patchify", str(given["data"]), "patches", "--patch-size", "32",
                      "--input-size", "8"], "patches", lambda p: files(p, PATCH_SET),
         lambda ws, argv: argv),
        ("train", ["train", str(given["patches"]), "--out", "run", "--epochs", "2", *TRAIN],
         "run", run_outputs,
         lambda ws, argv: ["train", "--resume", "--out", "run", "--quiet"]
         if (ws / "run" / "config.json").is_file() else argv),
        ("generate train", generate, "gen", generator_outputs,
         lambda ws, argv: [*argv, "--resume"] if (ws / "gen" / "config.json").is_file()
         else argv),
        ("predict", predict, "pred", predicted,
         lambda ws, argv: [*argv, "--overwrite"] if finished_folders(ws / "pred") else argv),
    ]  # fmt: skip
    fractions = (0.3,) if quick else (0.1, 0.3, 0.5, 0.8)
    probe = root / "probe"
    if not _mount(probe, 1):
        return [row("disk full", 0, 0, 0, 0, 0, "not run: mounting a small tmpfs needs root")]
    subprocess.run(["umount", str(probe)], check=True)
    rows = []
    for name, command, output, outputs, rerun in cases:
        reference = root / re.sub(r"\W+", "-", f"full-{name}-ref")
        reference.mkdir()
        prepare(reference)
        code, _, text = run_cli(command, reference)
        assert code == 0, text
        needed = _size_mb(reference / output)
        expected = outputs(reference / output)
        faults = survived = lost = 0
        for fraction in fractions:
            disk = root / re.sub(r"\W+", "-", f"full-{name}-{fraction}")
            assert _mount(disk, needed * fraction)
            try:
                prepare(disk)
                code, _, text = run_cli(command, disk)
                clean = code == 2 and "Traceback" not in text and "No space left" in text
                faults += code != 0
                _remount(disk, needed * 4 + 64)
                code2, _, text2 = run_cli(rerun(disk, command), disk)
                same = code2 == 0 and outputs(disk / output) == expected
                ok = (clean or code == 0) and same
                survived += ok
                lost += not ok
                if not ok:
                    found = outputs(disk / output)
                    differ = [k for k in expected if found.get(k) != expected[k]]
                    print(
                        f"  disk full {name} at {fraction}: exit {code}, then {code2}; "
                        f"differ {differ}\n{text[-300:]}\n{text2[-300:]}"
                    )
            finally:
                subprocess.run(["umount", str(disk)], check=False)
        sizes = ", ".join(f"{f:.0%}" for f in fractions)
        note = f"tmpfs at {sizes} of the output"
        rows.append(row(f"disk full: {name}", faults, 0, len(fractions), survived, lost, note))
    return rows


# ------------------------------------------------------------------------ read-only


def read_only_rows(root: Path, given: dict[str, Path]) -> list[dict]:
    locked = root / "locked"
    commands = {
        "patchify": ["patchify", str(given["data"]), str(locked / "p"), "--patch-size", "32",
                     "--input-size", "8"],
        "train": ["train", str(given["patches"]), "--out", str(locked / "r"), "--epochs", "1",
                  *TRAIN],
        "audit": ["audit", str(given["patches"]), "--out", str(locked / "a"), "--bootstrap",
                  "0"],
        "synth": ["synth", str(locked / "s"), "--images", "1", "--size", "96"],
        "report": ["report", str(given["two"]), "--out", str(locked / "report.html")],
        "sweep": ["sweep", "sweep.toml"],
        "predict": ["predict", str(given["predict_run"]), str(images(given)[0]), "--out",
                    str(locked / "pred"), "--device", "cpu"],
        "generate train": ["generate", "train", str(given["generator_patches"]), "--out",
                           str(locked / "g"), "--epochs", "1", "--config", "gen.toml",
                           "--quiet"],
        "generate sample": ["generate", "sample", str(given["generator"]), "--out",
                            str(locked / "gs"), "--count", "4", "--device", "cpu", "--quiet"],
    }  # fmt: skip
    clean = 0
    root.mkdir(parents=True, exist_ok=True)
    prepare(root)
    (root / "sweep.toml").write_text(
        f'name = "ro"\nout = "{locked / "sweep"}"\nmethods = ["erm"]\nseeds = 1\n'
        f'[datasets]\ntoy = "{given["patches"]}"\n[train]\nepochs = 1\nbootstrap = 0\n'
        'device = "cpu"\nnum_threads = 1\n'
    )
    with read_only(locked):
        for argv in commands.values():
            code, _, text = run_cli(argv, root)
            errors = [line for line in text.splitlines() if line.startswith("error:")]
            ok = code == 2 and len(errors) == 1 and "Traceback" not in text
            clean += ok
            if not ok:
                print(f"  read-only {argv[:2]}: exit {code}\n{text[-1500:]}", flush=True)
        clean -= bool(list(locked.iterdir()))  # nothing may have been written
    return [row("read-only output folder", len(commands), 0, len(commands), clean,
                len(commands) - clean, ", ".join(commands))]  # fmt: skip


# -------------------------------------------------------------- damage and hostile input

_STATS = re.compile(
    r"test_fuzz\.py::(\S+):\s+- during generate phase[^\n]*\n(?:[^\n]*\n)*?"
    r"\s+- (\d+) passing, (\d+) failing, and (\d+) invalid"
)


def fuzz_rows(examples: int) -> list[dict]:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "bench"}
    env["HYPOTHESIS_BENCH_EXAMPLES"] = str(examples)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(TESTS / "test_fuzz.py"), "--hypothesis-show-statistics"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    rows = []
    for name, passing, failing, invalid in _STATS.findall(done.stdout):
        tried = int(passing) + int(failing)
        rows.append(row(f"hostile input: {name}", 0, tried, tried, int(passing),
                        int(failing), f"{invalid} drawn inputs discarded as invalid"))  # fmt: skip
    if done.returncode != 0:
        print(done.stdout[-4000:])
    return rows


# -------------------------------------------------------------------------- output


def table(rows: list[dict]) -> Table:
    out = Table(title="reliability: faults injected and what survived")
    for name in ("campaign", "faults", "inputs", "runs", "survived", "data lost"):
        out.add_column(name, justify="left" if name == "campaign" else "right")
    for r in rows:
        out.add_row(r["name"], str(r["faults"]), str(r["inputs"]), str(r["runs"]),
                    str(r["survived"]), str(r["lost"]))  # fmt: skip
    return out


def markdown(rows: list[dict], totals: dict[str, int]) -> str:
    """The table of docs/benchmarks.md ("Reliability")."""
    lines = ["| campaign | faults injected | inputs tried | runs | survived | data lost |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in [*rows, {"name": "**total**", **totals}]:
        lines.append(f"| {r['name']} | {r['faults']} | {r['inputs']} | {r['runs']} | "
                     f"{r['survived']} | {r['lost']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=4, help="kills in a row per campaign")
    parser.add_argument("--examples", type=int, default=200, help="hypothesis examples per test")
    parser.add_argument("--quick", action="store_true", help="two methods, one disk size")
    args = parser.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="unshortcut-reliability-") as folder:
        root = Path(folder)
        given = inputs(root / "inputs")
        rows = kill_rows(root / "kills", given, args.kills, args.quick)
        rows += disk_full_rows(root / "disk", given, args.quick)
        rows += read_only_rows(root / "ro", given)
    rows += fuzz_rows(args.examples)
    Console().print(table(rows))
    result = {
        "command": "python bench/reliability.py " + shlex.join(argv or sys.argv[1:]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "wall_seconds": round(time.monotonic() - start),
        "totals": {k: sum(r[k] for r in rows) for k in ("faults", "inputs", "runs", "survived",
                                                        "lost")},
        "rows": rows,
    }  # fmt: skip
    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print(markdown(rows, result["totals"]))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
