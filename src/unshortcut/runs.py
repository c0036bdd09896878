"""The run folder (contract 3.4): checking, saving, linking, reading back, loading models.

::

    RUN/config.json               resolved config + method hyperparameters + groups +
                                  normalisation + robust-AUROC bins
    RUN/history.jsonl             one line per epoch: train loss terms, lr, validation metrics
    RUN/checkpoints/last.pt       everything needed to resume (written after every epoch)
    RUN/checkpoints/best-<c>.pt   weights of the best epoch by validation criterion c
    RUN/checkpoints/final-<c>.pt  the same after ``method.finalize`` (what evaluate/predict load)
    RUN/predictions/{val,test}.parquet   at the primary criterion's checkpoint
    RUN/checksums.json            SHA-256 of every other file, written just before metrics.json
    RUN/metrics.json              written last: a run without it is unfinished

Every file is written atomically (a temporary name, then a rename), so a reader never
sees half a file. Paths inside config.json are absolute, so a run opens from anywhere.

Format safety: config.json names its format and version; every checkpoint carries its
format, version and a SHA-256 of its content (tensors and values, not the pickle's
bytes), checked on every load, so a damaged or foreign file is a one-line error naming
it rather than a traceback or silently wrong weights. :func:`verify_run` checks a whole
folder (``unshortcut check RUN``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from unshortcut import __version__
from unshortcut.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    move_into_place,
    temporary_name,
)
from unshortcut.config import (
    RESUME_EXTENDABLE_FIELDS,
    RESUME_FREE_FIELDS,
    TrainConfig,
    load_config,
)
from unshortcut.data import Normalization
from unshortcut.errors import UnshortcutError
from unshortcut.groups import GroupScheme
from unshortcut.methods import get_method
from unshortcut.models import build_model
from unshortcut.sealed import read_sealed, seal

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
CHECKSUMS = "checksums.json"
RUN_FORMAT = "unshortcut-run"
CHECKPOINT_FORMAT = "unshortcut-checkpoint"
#: Version of the run folder layout and of its checkpoints' contents.
FORMAT_VERSION = 1
_INTEGRITY = "integrity"


def jsonable(value: Any) -> Any:
    """NaN/inf become null so JSON files stay strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> None:
    """Strict JSON, atomically; an object is sealed (:mod:`unshortcut.sealed`)."""
    data = jsonable(data)
    if isinstance(data, dict):
        data = seal(data)
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_history(run: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(jsonable(line), allow_nan=False) + "\n" for line in history)
    atomic_write_text(run / "history.jsonl", text)


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` of ``obj`` plus its format, version and content digest, atomically."""
    stamped = {
        **obj,
        _INTEGRITY: {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "sha256": content_digest(obj),
        },
    }
    buffer = io.BytesIO()
    torch.save(stamped, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, device: torch.device | str) -> Any:
    """A checkpoint written by :func:`save_checkpoint`, its digest checked.

    A damaged, truncated or foreign file is a one-line :class:`UnshortcutError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UnshortcutError(f"{path}: missing; the run is incomplete")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except OSError:
        raise
    except Exception as error:  # torch reports a damaged zip or pickle many ways
        raise UnshortcutError(
            f"{path}: not a readable checkpoint, the file is damaged ({type(error).__name__})"
        ) from None
    stamp = state.get(_INTEGRITY) if isinstance(state, dict) else None
    if not isinstance(stamp, dict) or stamp.get("format") != CHECKPOINT_FORMAT:
        raise UnshortcutError(f"{path}: not an unshortcut checkpoint")
    if stamp.get("format_version") != FORMAT_VERSION:
        raise UnshortcutError(
            f"{path}: checkpoint format version {stamp.get('format_version')}, this "
            f"unshortcut reads {FORMAT_VERSION}; train the run again with this version"
        )
    del state[_INTEGRITY]
    if content_digest(state) != stamp.get("sha256"):
        raise UnshortcutError(
            f"{path}: its content does not match its checksum; the file is damaged"
        )
    return state


def content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: tensors' and arrays' dtypes, shapes and bytes,
    and every other value, walked in order. Independent of the pickle's bytes and of the
    device, so a checkpoint loaded anywhere checks against the digest it was saved with.
    """
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
        digest.update(f"A{obj.dtype.str}{obj.shape};".encode())
        digest.update(np.ascontiguousarray(obj).data)
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, list | tuple):
        digest.update(f"{type(obj).__name__[0]}{len(obj)};".encode())
        for value in obj:
            _feed(digest, value)
    elif isinstance(obj, set | frozenset):  # iteration order depends on the hash seed
        digest.update(f"S{len(obj)};".encode())
        for value in sorted(obj, key=repr):
            _feed(digest, value)
    elif obj is None or isinstance(obj, bool | int | float | str | bytes | np.generic):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        digest.update(pickle.dumps(obj, protocol=4))


def link(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (a hard link; a copy where unsupported).

    Already the same file: nothing to do (a rename between two links of one file does
    nothing and would leave the temporary name behind).
    """
    if target.exists() and os.path.samefile(source, target):
        return
    tmp = target.with_name(temporary_name(target))
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def config_differences(
    saved: dict[str, Any], config: TrainConfig, extendable: bool = False
) -> list[str]:
    """Settings of ``config`` that differ from a run's saved config.json.

    Fields that change only where and how fast a run goes (RESUME_FREE_FIELDS) are
    ignored, and with ``extendable`` those a resumed run may raise (more epochs); saved
    hyperparameters are resolved (defaults filled in), so only the ones ``config``
    gives are compared; a field the saved config lacks counts as its default.
    """
    free = RESUME_FREE_FIELDS | (RESUME_EXTENDABLE_FIELDS if extendable else frozenset())
    saved = with_newer_fields(saved, config)
    current = config.to_json_dict()
    differ = [k for k, v in current.items() if k not in free | {"hp"} and saved.get(k) != v]
    saved_hp = saved.get("hp") if isinstance(saved.get("hp"), dict) else {}
    differ += [f"hp.{k}" for k, v in config.hp.items() if saved_hp.get(k) != v]
    return sorted(differ)


def with_newer_fields(saved: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """``saved`` with the default of every TrainConfig field it lacks: a run written
    before a field existed was trained as its default says (the field came with it)."""
    defaults = TrainConfig(patches=config.patches, out=config.out).to_json_dict()
    return {k: v for k, v in defaults.items() if k not in saved} | saved


def partial_run(out: Path) -> Path:
    """Where a run that replaces or extends the finished run ``out`` is built (visible,
    beside it, resumable); it is swapped in when done."""
    return out.with_name(f"{out.name}.partial")


def _finished_at(run: Path) -> int | None:
    metrics = run / "metrics.json"
    return metrics.stat().st_mtime_ns if metrics.is_file() else None


def settle_partial(out: Path) -> None:
    """Finish the swap of a killed run: a finished ``out.partial`` newer than ``out``
    is put in place; an older one (the replaced run, if the kill came between the swap
    and its removal) is removed."""
    partial = partial_run(out)
    done = _finished_at(partial)
    if done is None:
        return
    current = _finished_at(out)
    if current is None or done > current:
        move_into_place(partial, out)
    else:
        shutil.rmtree(partial)


def resume_source(out: Path) -> Path:
    """The folder ``--resume`` continues: an unfinished replacement or extension of
    ``out`` when there is one, else ``out`` itself (a finished ``out.partial`` is a swap
    cut short, for :func:`settle_partial`, not something to resume)."""
    partial = partial_run(out)
    unfinished = (partial / "config.json").is_file() and _finished_at(partial) is None
    return partial if unfinished else out


def resume_config(file: Path | None = None, **flags: Any) -> TrainConfig:
    """A resumed run's settings: the saved config.json of run ``flags["out"]``, then the
    TOML ``file`` and the other ``flags`` on top (:func:`unshortcut.config.load_config`;
    settings that differ from the saved run are refused later, but for the free ones)."""
    out = Path(flags["out"])
    saved_file = resume_source(out) / "config.json"
    if not saved_file.is_file():
        raise UnshortcutError(f"{out}: no run to resume (config.json is missing)")
    saved = read_json(saved_file)
    if not isinstance(saved, dict):
        raise UnshortcutError(f"{saved_file}: not an unshortcut run configuration")
    _check_run_format(saved_file, saved)
    base = {k: v for k, v in saved.items() if k in TrainConfig.model_fields}
    return load_config(file, base=base, **{**flags, "out": out})


@dataclass(frozen=True)
class RunFolderPlan:
    """Where and how :func:`unshortcut.train.train` writes, decided before any write."""

    out: Path
    """The run folder the user named."""
    work: Path
    """Where training writes: ``out``, or ``out.partial`` (swapped in when finished)."""
    checkpoint: bool
    """Resume from ``work/checkpoints/last.pt``."""
    saved_epochs: int | None
    """Epochs of the run being resumed (more in the config: it is extended)."""
    discard: Path | None = None
    """An unfinished replacement to remove first (``--overwrite`` starts afresh)."""
    copy_finished: bool = False
    """Extending a finished run: ``work`` starts as a copy of ``out`` (hard links)."""


def plan_run_folder(config: TrainConfig, resume: bool, overwrite: bool) -> RunFolderPlan:
    """Refuse unusable run folders and decide where to write; writes nothing (call
    :func:`settle_partial` first, from one process)."""
    out = config.out
    if resume and overwrite:
        raise UnshortcutError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise UnshortcutError(f"{out}: exists and is not a folder")
    partial = partial_run(out)
    if resume:
        return _plan_resume(config, out, resume_source(out))
    busy = out.is_dir() and any(out.iterdir())
    if partial.exists() and not overwrite:
        raise UnshortcutError(
            f"{partial}: holds an unfinished run that replaces {out} (pass --resume to "
            "continue it or --overwrite to start afresh)"
        )
    if busy and not overwrite:
        raise UnshortcutError(
            f"{out}: already holds files (pass --resume to continue the run there "
            "or --overwrite to replace it)"
        )
    discard = partial if partial.exists() else None
    return RunFolderPlan(out, partial if busy else out, False, None, discard)


def _plan_resume(config: TrainConfig, out: Path, source: Path) -> RunFolderPlan:
    if not (source / "config.json").is_file():
        raise UnshortcutError(f"{out}: no run to resume (config.json is missing)")
    saved = read_json(source / "config.json")
    if not isinstance(saved, dict):
        raise UnshortcutError(f"{source / 'config.json'}: not an unshortcut run configuration")
    _check_run_format(source / "config.json", saved)
    differ = config_differences(saved, config, extendable=True)
    if differ:
        raise UnshortcutError(
            f"{out}: --resume with settings that differ from the run's config.json "
            f"({', '.join(differ)})"
        )
    saved_epochs = int(saved.get("epochs", config.epochs))
    if config.epochs < saved_epochs:
        raise UnshortcutError(
            f"--epochs: {config.epochs} is fewer than the run's {saved_epochs}; a run "
            "cannot be shortened (train a new one)"
        )
    checkpoint = (source / CHECKPOINTS / LAST).is_file()
    if config.epochs > saved_epochs:
        stopped = _stopped_early(source)
        if stopped:
            raise UnshortcutError(f"{out}: stopped early ({stopped}); it cannot be extended")
    extend_finished = (
        source == out and config.epochs > saved_epochs and _finished_at(out) is not None
    )
    work = partial_run(out) if extend_finished else source
    return RunFolderPlan(out, work, checkpoint, saved_epochs, copy_finished=extend_finished)


def _stopped_early(run: Path) -> str | None:
    """The reason a method ended training early, from history.jsonl (None: it did not)."""
    history = run / "history.jsonl"
    if not history.is_file():
        return None
    for line in history.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("stopped"):
            return str(entry["stopped"])
    return None


def copy_run(source: Path, target: Path) -> None:
    """``target`` as a copy of run folder ``source``: hard links where possible (every
    write replaces a file by rename, so the two never change each other's files)."""
    shutil.copytree(
        source,
        target,
        copy_function=_link_or_copy,
        # What marks a run finished stays behind: the copy is unfinished until trained.
        ignore=shutil.ignore_patterns(".*", "evaluation", "predictions", "metrics.json", CHECKSUMS),
    )


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def read_json(path: Path) -> Any:
    """A JSON file, its seal checked (a damaged one is a one-line error)."""
    return read_sealed(path)


def resolved_config(
    config: TrainConfig,
    hp: dict[str, Any],
    scheme: GroupScheme,
    normalization: Normalization,
    robust_bins: list[list[int]],
    channels: int,
    input_size: int,
) -> dict[str, Any]:
    """config.json: the config plus everything derived from the training data, and the
    digest of a ``pretrained`` checkpoint file (which file the run started from)."""
    return jsonable(
        {
            "format": RUN_FORMAT,
            "format_version": FORMAT_VERSION,
            **config.to_json_dict(),
            **_pretrained_digest(config.pretrained),
            "hp": dict(hp),
            "groups": scheme.to_dict(),
            "normalization": normalization.to_dict(),
            "robust_bins_by_class": robust_bins,
            "input": {"channels": channels, "size": input_size},
            "unshortcut_version": __version__,
        }
    )


def _pretrained_digest(pretrained: bool | str) -> dict[str, str]:
    """``{"pretrained_sha256": ...}`` for a checkpoint file, else nothing (hub names,
    True/False). Only recorded: loading a finished run never reads the file again."""
    if isinstance(pretrained, str) and Path(pretrained).is_file():
        with open(pretrained, "rb") as handle:
            return {"pretrained_sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
    return {}


@dataclass
class Run:
    """A run folder's resolved configuration."""

    path: Path
    config: TrainConfig
    resolved: dict[str, Any]

    @property
    def scheme(self) -> GroupScheme:
        return GroupScheme.from_dict(self.resolved["groups"])

    @property
    def normalization(self) -> Normalization:
        return Normalization.from_dict(self.resolved["normalization"])

    @property
    def robust_bins(self) -> list[list[int]]:
        return [list(b) for b in self.resolved["robust_bins_by_class"]]

    @property
    def metrics(self) -> dict[str, Any]:
        path = self.path / "metrics.json"
        if not path.is_file():
            raise UnshortcutError(f"{path}: missing; the run is unfinished (train --resume it)")
        return read_json(path)

    def trained_on_val(self) -> np.ndarray:
        """patch_ids of validation rows the method trained on (DFR), from predictions/."""
        path = self.path / "predictions" / "val.parquet"
        if not path.is_file():
            raise UnshortcutError(f"{path}: missing; the run is unfinished (train --resume it)")
        try:
            table = pd.read_parquet(path, columns=["patch_id", "trained_on"])
            return table.loc[table["trained_on"].astype(bool), "patch_id"].to_numpy()
        except Exception as error:  # pyarrow reports damage with many exception types
            raise UnshortcutError(f"{path}: unreadable, the file is damaged ({error})") from None


def open_run(path: Path | str) -> Run:
    """Read ``RUN/config.json``; a clear error when ``path`` is not a run folder."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise UnshortcutError(f"{path}: not a run folder (no config.json)")
    resolved = read_json(file)
    if not isinstance(resolved, dict):
        raise UnshortcutError(f"{file}: not an unshortcut run configuration")
    _check_run_format(file, resolved)
    try:
        fields = {k: v for k, v in resolved.items() if k in TrainConfig.model_fields}
        config = TrainConfig(**fields)
        for key in ("groups", "normalization", "robust_bins_by_class", "input"):
            if key not in resolved:
                raise ValueError(f"no {key!r} entry (written by another version?)")
    except ValueError as error:
        raise UnshortcutError(f"{file}: unreadable run configuration ({error})") from None
    return Run(path, config, resolved)


def _check_run_format(file: Path, resolved: dict[str, Any]) -> None:
    """A foreign config.json or one of a newer layout is refused by name; one without a
    format entry predates format versions and is read as version 1."""
    name = resolved.get("format", RUN_FORMAT)
    version = resolved.get("format_version", 1)
    if name != RUN_FORMAT:
        raise UnshortcutError(f"{file}: not an unshortcut run configuration (format {name!r})")
    if version != FORMAT_VERSION:
        raise UnshortcutError(
            f"{file}: run format version {version}, this unshortcut reads {FORMAT_VERSION}"
        )


def _checksummed_files(run: Path) -> list[Path]:
    """The files checksums.json covers: everything training wrote but metrics.json and
    checksums.json themselves (evaluations come later and have their own folders)."""
    files = [run / "config.json", run / "history.jsonl"]
    files += sorted((run / CHECKPOINTS).glob("*.pt")) + sorted((run / "predictions").glob("*"))
    return [f for f in files if f.is_file() and not f.name.startswith(".")]


def write_checksums(run: Path) -> None:
    """RUN/checksums.json: SHA-256 of each file of a finished run (hard links hashed once)."""
    by_inode: dict[int, str] = {}
    table = {}
    for file in _checksummed_files(run):
        inode = file.stat().st_ino
        if inode not in by_inode:
            by_inode[inode] = _file_sha256(file)
        table[file.relative_to(run).as_posix()] = by_inode[inode]
    write_json(run / CHECKSUMS, {"algorithm": "sha256", "files": table})


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def verify_run(path: Path | str) -> list[str]:
    """Every problem of a run folder, one line each (empty: intact and finished).

    Reads everything: config.json's format, each checkpoint against its own digest, every
    file against checksums.json, metrics.json.
    """
    run = open_run(path)
    problems = []
    seen: set[int] = set()
    for file in sorted((run.path / CHECKPOINTS).glob("*.pt")):
        if file.stat().st_ino in seen:
            continue
        seen.add(file.stat().st_ino)
        try:
            load_checkpoint(file, "cpu")
        except UnshortcutError as error:
            problems.append(str(error))
    if not (run.path / "metrics.json").is_file():
        problems.append(
            f"{run.path}: unfinished (no metrics.json); `unshortcut train --resume --out "
            f"{run.path}` continues it"
        )
        return problems
    try:
        run.metrics  # noqa: B018 - parses metrics.json
    except UnshortcutError as error:
        problems.append(str(error))
    sums = run.path / CHECKSUMS
    if not sums.is_file():
        problems.append(f"{sums}: missing (written by an older unshortcut?)")
        return problems
    try:
        recorded = dict(read_json(sums)["files"])
    except (KeyError, TypeError, ValueError, UnshortcutError):
        return [*problems, f"{sums}: damaged"]
    for name, digest in recorded.items():
        file = run.path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif _file_sha256(file) != digest:
            problems.append(f"{file}: does not match {CHECKSUMS}; the file is damaged")
    return problems


def build_run_model(
    config: TrainConfig,
    hp: dict[str, Any],
    n_classes: int,
    channels: int,
    input_size: int,
    *,
    pretrained: bool,
) -> nn.Module:
    """The run's architecture, freshly initialised, with the method's model options.

    ``hp`` may leave out hyperparameters (the config's own ``hp``): the method's
    defaults fill them in. ``pretrained`` is False where weights are loaded from the
    run's own checkpoints.
    """
    method = get_method(config.method)
    resolved = {name: h.default for name, h in method.hparams.items()} | dict(hp)
    return build_model(
        config.model,
        channels,
        n_classes,
        input_size,
        pretrained=pretrained and config.pretrained,
        **method.model_options(resolved),
    )


def load_model(
    run: Run, criterion: str | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """The finalized model selected by ``criterion`` (default: the run's primary one)."""
    criterion = criterion or run.config.primary_criterion
    path = run.path / CHECKPOINTS / f"final-{criterion}.pt"
    if not path.is_file():
        raise UnshortcutError(f"{path}: missing (criteria of this run: {run.config.select_by})")
    info = run.resolved["input"]
    model = build_run_model(
        run.config,
        run.resolved["hp"],
        run.scheme.n_classes,
        int(info["channels"]),
        int(info["size"]),
        pretrained=False,
    )
    model.load_state_dict(load_checkpoint(path, device)["model"])
    return model.to(device).eval()
