"""Spatial supervision: boxes from masks, map aggregation, the decoder, the methods, Dice."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from test_data import write_toy_patch_set
from test_methods_fake import FakeContext, make_split
from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.evaluate import evaluate_run
from unshortcut.inference import pixel_counts, tumor_maps
from unshortcut.methods import Batch, get_method
from unshortcut.methods.gerne import GERNE
from unshortcut.methods.spatial import box_masks, spatial_row_loss
from unshortcut.metrics import patch_dice_iou, segmentation_metrics
from unshortcut.models import build_model
from unshortcut.models.decoder import SequentialStages, aggregate_logit
from unshortcut.runs import load_model, open_run
from unshortcut.train import train

COUNTS = np.array([[12, 4], [4, 12]])
SIZE = 16


# ----------------------------------------------------------------------------- boxes


def test_box_of_an_empty_a_full_and_a_several_blob_mask() -> None:
    masks = torch.zeros(3, 8, 8)
    masks[1] = 1.0
    masks[2, 1:3, 2:4] = 1.0  # blob 1
    masks[2, 5, 6] = 0.2  # blob 2: one partly tumor pixel counts
    masks[2, 3, 0] = 0.5  # blob 3, left of the others
    boxes = box_masks(masks)
    expected = torch.zeros(3, 8, 8)
    expected[1] = 1.0
    expected[2, 1:6, 0:7] = 1.0  # rows 1..5, columns 0..6
    torch.testing.assert_close(boxes, expected)


def test_box_follows_the_symmetries_of_the_square() -> None:
    mask = torch.zeros(1, 8, 8)
    mask[0, 1, 2] = mask[0, 4, 5] = 1.0
    for turns in range(4):
        turned = torch.rot90(mask, turns, (1, 2))
        torch.testing.assert_close(box_masks(turned), torch.rot90(box_masks(mask), turns, (1, 2)))


# ----------------------------------------------------------------------------- aggregation


def _logits(probs: list[float]) -> torch.Tensor:
    p = torch.tensor(probs, dtype=torch.float64).view(1, 2, 2)
    return torch.log(p / (1 - p))


@pytest.mark.parametrize(
    ("aggregation", "top_k", "expected"),
    [
        ("max", 0.05, 0.9),
        ("mean", 0.05, (0.9 + 0.1 + 0.2 + 0.4) / 4),
        ("topk", 0.5, (0.9 + 0.4) / 2),
        ("topk", 0.05, 0.9),  # ceil(0.05 * 4) = 1 pixel
        ("topk", 1.0, 0.4),  # every pixel: the mean
    ],
)
def test_each_aggregation_of_the_pixel_map(aggregation: str, top_k: float, expected: float) -> None:
    logit = aggregate_logit(_logits([0.9, 0.1, 0.2, 0.4]), aggregation, top_k)
    assert torch.sigmoid(logit).item() == pytest.approx(expected, abs=1e-12)


def test_mean_aggregation_is_stable_far_from_one_half() -> None:
    logit = aggregate_logit(torch.full((1, 4, 4), -60.0, dtype=torch.float64), "mean", 0.05)
    assert logit.item() == pytest.approx(-60.0, abs=1e-9)


# ----------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("size", [16, 32, 48, 64])
def test_decoder_output_size_for_every_backbone_and_input_size(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 4, 2, size, decoder=True).eval()
    x = torch.randn(2, 4, size, size)
    with torch.no_grad():
        out = model.outputs(x)
    assert out.logits.shape == (2, 2)
    assert out.pixel_logits.shape == (2, 2, size, size)
    assert out.features.shape == (2, model.n_features)
    # The class logits are [0, logit(max pixel probability)] (default aggregation).
    torch.testing.assert_close(out.logits[:, 0], torch.zeros(2))
    torch.testing.assert_close(out.logits[:, 1], out.pixel_logits[:, 1].flatten(1).amax(1))
    assert model.last_layer() is None


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet50"])
def test_stages_are_the_backbone_forward(name: str) -> None:
    """The stage walk applies the backbone's layers as its own forward does."""
    backbone = build_model(name, 3, 2, 32).backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        deepest = SequentialStages(backbone)(x)[-1]
        torch.testing.assert_close(deepest.mean(dim=(2, 3)), backbone(x))


def test_decoder_is_fully_convolutional_and_refuses_more_than_two_classes() -> None:
    model = build_model("small_cnn", 3, 2, 32, decoder=True).eval()
    maps = tumor_maps(model, torch.randn(1, 3, 96, 64))
    assert maps is not None and maps.shape == (1, 96, 64)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert tumor_maps(build_model("small_cnn", 3, 2, 32), torch.randn(1, 3, 32, 32)) is None
    with pytest.raises(UnshortcutError, match="needs 2 classes"):
        build_model("small_cnn", 3, 3, 32, decoder=True)
    with pytest.raises(UnshortcutError, match="aggregation"):
        build_model("small_cnn", 3, 2, 32, decoder=True, aggregation="median")


# ----------------------------------------------------------------------------- the row loss


def _hand_row_loss(model: torch.nn.Module, batch: Batch, target: torch.Tensor, w: float):
    """Dice (Laplace-smoothed) + BCE of the map, + w * patch cross-entropy, by hand."""
    out = model.outputs(batch.x)
    p = torch.softmax(out.pixel_logits, dim=1)[:, 1]
    dice = 1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean((1, 2))
    label = -torch.log_softmax(out.logits, dim=1)[torch.arange(len(batch)), batch.y]
    return dice + bce + w * label


def _context(batch_size: int = 8) -> FakeContext:
    return FakeContext(make_split(COUNTS), make_split(COUNTS, n_images=6), batch_size)


def _batch(ctx: FakeContext, rows: np.ndarray, seed: int = 0) -> Batch:
    """Rows of the fake training split as 2-channel 16 px patches with blob masks."""
    gen = torch.Generator().manual_seed(seed)
    split = ctx.train
    index = torch.as_tensor(rows, dtype=torch.long)
    labels = torch.as_tensor(split.labels)[index]
    masks = torch.zeros(len(rows), SIZE, SIZE)
    for i in np.flatnonzero(labels.numpy()):
        y, x = torch.randint(0, SIZE - 6, (2,), generator=gen).tolist()
        masks[i, y : y + 6, x : x + 4] = 1.0
        masks[i, y, x] = 0.4  # a partly tumor pixel
    return Batch(
        x=torch.randn(len(rows), 2, SIZE, SIZE, generator=gen) + masks[:, None],
        y=labels,
        attribute=torch.as_tensor(split.attributes)[index],
        group=torch.as_tensor(split.groups)[index],
        index=index,
        mask=masks,
    )


def _model(hp: dict, method: str = "spatial-mask") -> torch.nn.Module:
    torch.manual_seed(0)
    cls = get_method(method)
    options = cls.model_options({k: h.default for k, h in cls.hparams.items()} | hp)
    return build_model("small_cnn", 2, 2, SIZE, **options)


def test_spatial_row_loss_is_dice_plus_bce_plus_weighted_label_loss() -> None:
    ctx = _context()
    batch = _batch(ctx, np.arange(0, 32, 4))
    model = _model({})
    method = get_method("spatial-mask")(ctx, label_weight=0.7)
    torch.testing.assert_close(
        method.per_sample_loss(model, batch), _hand_row_loss(model, batch, batch.mask, 0.7)
    )
    box = get_method("spatial-box")(ctx, label_weight=0.0)
    torch.testing.assert_close(
        box.per_sample_loss(model, batch), _hand_row_loss(model, batch, box_masks(batch.mask), 0)
    )
    out = model.outputs(batch.x)
    assert spatial_row_loss(out.pixel_logits, batch.mask, out.logits, batch.y, 0.0).shape == (8,)


def test_combined_gerne_and_mask_step_against_its_formula() -> None:
    ctx = _context(batch_size=8)
    beta = 0.5
    method = get_method("spatial-mask+gerne")(ctx, beta=beta, c=1.0, label_weight=0.5)
    assert isinstance(method, GERNE)
    rows = next(method.epoch_batches(0, np.random.default_rng(0)))
    batch = _batch(ctx, rows)
    model = _model({})
    reference = copy.deepcopy(model)
    optimizers = method.optimizers(model)  # FakeContext: plain SGD, lr 0.1
    terms = method.train_step(model, batch, optimizers)

    # By hand: each half through the model on its own (bn=separate), spatial row losses,
    # L = L_lb + beta (L_lb - L_b), one SGD step.
    half = len(rows) // 2
    biased, less = batch.select(slice(0, half)), batch.select(slice(half, None))
    loss_b = _hand_row_loss(reference, biased, biased.mask, 0.5).mean()
    loss_lb = _hand_row_loss(reference, less, less.mask, 0.5).mean()
    loss = loss_lb + beta * (loss_lb - loss_b)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    assert terms["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert terms["loss_biased"] == pytest.approx(float(loss_b.detach()), rel=1e-5)
    assert terms["loss_less_biased"] == pytest.approx(float(loss_lb.detach()), rel=1e-5)
    for after, before, grad in zip(model.parameters(), reference.parameters(), grads, strict=True):
        torch.testing.assert_close(after.detach(), before.detach() - 0.1 * grad)


def test_combined_reweight_and_mask_loss_weights_spatial_row_losses() -> None:
    ctx = _context()
    method = get_method("spatial-mask+reweight")(ctx)
    batch = _batch(ctx, np.array([0, 13, 14, 17, 30, 31]))
    model = _model({})
    # Group sizes 12, 4, 4, 12: weights N / (G n_g) = 32 / 48 and 32 / 16.
    weights = torch.tensor([2 / 3, 2.0, 2.0, 2.0, 2 / 3, 2 / 3])
    assert torch.equal(batch.group, torch.tensor([0, 1, 1, 2, 3, 3]))
    expected = (weights * _hand_row_loss(model, batch, batch.mask, 1.0)).mean()
    torch.testing.assert_close(method.loss(model, batch), expected)


def test_spatial_methods_refuse_bad_settings_and_patch_sets_without_masks() -> None:
    ctx = _context()
    with pytest.raises(UnshortcutError, match="aggregation='median'"):
        get_method("spatial-mask")(ctx, aggregation="median")
    with pytest.raises(UnshortcutError, match="top_k=0"):
        get_method("spatial-box")(ctx, top_k=0.0)
    with pytest.raises(UnshortcutError, match="label_weight=-1"):
        get_method("spatial-mask+reweight")(ctx, label_weight=-1.0)
    batch = _batch(ctx, np.arange(8))
    batch.mask = None
    with pytest.raises(UnshortcutError, match="stores no tumor masks"):
        get_method("spatial-mask")(ctx).per_sample_loss(_model({}), batch)
    assert get_method("spatial-mask").model_options(
        {"aggregation": "topk", "top_k": 0.1, "label_weight": 1.0}
    ) == {"decoder": True, "aggregation": "topk", "top_k": 0.1}


# ----------------------------------------------------------------------------- Dice, IoU


def test_pixel_counts_binarise_map_and_mask_at_one_half() -> None:
    probs = torch.tensor([[[0.9, 0.6], [0.4, 0.1]]], dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(probs), torch.log(probs / (1 - probs))], dim=1)
    masks = torch.tensor([[[1.0, 0.2], [0.5, 0.0]]])
    # predicted {(0,0), (0,1)}, tumor {(0,0), (1,0)}, overlap {(0,0)}
    assert pixel_counts(logits, masks).tolist() == [[2, 2, 1]]


def test_segmentation_metrics_pool_pixels_per_group() -> None:
    counts = np.array([[10, 6, 5], [2, 0, 0], [0, 3, 0], [0, 0, 0]])
    groups = np.array([2, 3, 0, 0])
    names = ["non-tumor|a", "non-tumor|b", "tumor|a", "tumor|b"]
    dice, iou = patch_dice_iou(counts)
    np.testing.assert_allclose(dice[:3], [10 / 16, 0.0, 0.0])
    np.testing.assert_allclose(iou[:3], [5 / 11, 0.0, 0.0])
    assert math.isnan(dice[3]) and math.isnan(iou[3])
    seg = segmentation_metrics(counts, groups, names, pixels_per_patch=16)
    assert seg["dice"] == pytest.approx(2 * 5 / (12 + 9))
    assert seg["iou"] == pytest.approx(5 / (12 + 9 - 5))
    assert seg["mean_patch_dice"] == pytest.approx((10 / 16 + 0.0) / 2)
    assert seg["groups"]["tumor|a"]["dice"] == pytest.approx(10 / 16)
    assert seg["groups"]["tumor|b"]["dice"] == 0.0
    assert seg["groups"]["non-tumor|a"]["dice"] is None
    assert seg["groups"]["non-tumor|a"]["predicted_share"] == pytest.approx(3 / 32)
    assert seg["groups"]["non-tumor|b"]["n"] == 0


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def easy_patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 px patches, tumor = a bright 16 px square (its mask)."""
    return write_toy_patch_set(tmp_path_factory.mktemp("easy") / "patches", n=240, size=32)


@pytest.mark.slow
def test_mask_supervision_learns_the_pixel_map(easy_patches: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        patches=easy_patches,
        out=tmp_path / "run",
        method="spatial-mask",
        epochs=6,
        batch_size=32,
        bootstrap=0,
        lr=0.02,
        device="cpu",
        num_threads=1,
        select_by=["loss"],
    )
    run = train(config, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    seg = metrics["test"]["segmentation"]
    assert seg["dice"] > 0.7
    assert metrics["test"]["balanced_accuracy"] > 0.9
    # The Dice recomputes from the predictions' pixel counts.
    table = pd.read_parquet(run / "predictions" / "test.parquet")
    total = table[["tumor_pixels", "predicted_pixels", "overlap_pixels"]].sum()
    assert seg["dice"] == pytest.approx(
        2 * total["overlap_pixels"] / (total["tumor_pixels"] + total["predicted_pixels"])
    )
    # evaluate reproduces the segmentation metrics from the loaded model.
    _, again = evaluate_run(run, bootstrap=0)
    assert again["test"]["segmentation"] == seg
    # The selected model, loaded back, predicts pixel maps (whole-image prediction).
    model = load_model(open_run(run))
    maps = tumor_maps(model, torch.zeros(2, 3, 64, 64))
    assert maps is not None and maps.shape == (2, 64, 64)
