"""Data parallelism: two gloo ranks under torchrun equal one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data import write_toy_patch_set
from unshortcut import distributed
from unshortcut.config import TrainConfig
from unshortcut.methods import method_names
from unshortcut.train import train

SETTINGS = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 0.02,
    "model": "small_cnn_gn",  # GroupNorm: batch-independent, so ranks can match exactly
    "device": "cpu",
    "bootstrap": 0,
}
RTOL = 1e-5
METHOD_TOLERANCE = {"mimm": (5e-3, 1e-4)}
"""(rtol, atol) where the default (RTOL; weights 1e-4, 1e-5) is too strict.

MIMM's MI term is a near-zero difference of log-mean-exps scaled by an adaptive weight
(~9 here): the rounding of a convolution over half a batch instead of the whole one
(1e-7 after one epoch) grows to ~1e-3 after two. A missing gradient average or a rank-local
shuffle moves the numbers by far more."""


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_patch_set(tmp_path_factory.mktemp("ddp") / "patches", n=240)


def torchrun(config: TrainConfig, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node ranks -m unshortcut train PATCHES --config ...``."""
    file = config.out.with_suffix(".toml")
    lines = [
        f"{key} = {json.dumps(value)}"
        for key, value in config.to_json_dict().items()
        if value is not None and key not in ("hp", "out", "patches")
    ]
    lines.append(f"out = {json.dumps(str(config.out))}")
    lines.append("[hp]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in config.hp.items()]
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", "-m", "unshortcut", "train", str(config.patches),
               "--config", str(file),
               "--quiet"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_single_process_helpers_are_identities() -> None:
    index = np.arange(10)
    assert distributed.world() == 1 and distributed.is_main()
    np.testing.assert_array_equal(distributed.shard(index), index)
    assert distributed.contiguous_share(7) == slice(0, 7)
    values = torch.tensor([1.0, 2.0, 6.0])
    assert distributed.global_mean(values).item() == pytest.approx(3.0)
    np.testing.assert_array_equal(distributed.gather_rows(index), index)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "hp"),
    [
        *((name, {}) for name in method_names()),
        pytest.param("mimm", {"estimator": "gaussian"}, id="mimm-gaussian"),
    ],
)
def test_two_ranks_equal_one_process(
    method: str, hp: dict[str, str], patches: Path, tmp_path: Path
) -> None:
    single = TrainConfig(patches=patches, out=tmp_path / "single", method=method, hp=hp, **SETTINGS)
    train(single, progress=False)
    ranked = single.model_copy(update={"out": tmp_path / "ddp"})
    result = torchrun(ranked)
    assert result.returncode == 0, result.stderr[-3000:]
    rtol, atol = METHOD_TOLERANCE.get(method, (RTOL, 1e-5))
    one = json.loads((single.out / "metrics.json").read_text())
    two = json.loads((ranked.out / "metrics.json").read_text())
    for split in ("val", "test"):
        assert two[split]["n"] == one[split]["n"]  # inference gathered every row
        for key in ("loss", "auroc", "balanced_accuracy", "worst_group_accuracy"):
            assert two[split][key] == pytest.approx(one[split][key], rel=rtol, abs=1e-6), key
    history = [
        [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        for run in (single.out, ranked.out)
    ]
    for a, b in zip(*history, strict=True):
        for term, value in a["train"].items():
            assert b["train"][term] == pytest.approx(value, rel=rtol, abs=1e-6), term
    weights = [
        torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
        for run in (single.out, ranked.out)
    ]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=max(1e-4, rtol), atol=atol)
    # One writer: the run folder holds one set of files, no per-rank copies.
    assert sorted(p.name for p in ranked.out.iterdir()) == sorted(
        p.name for p in single.out.iterdir()
    )
