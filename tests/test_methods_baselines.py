"""Group-robustness baselines: resample, reweight, GroupDRO, JTT, DFR, LfF; the registry."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from test_methods_fake import FakeContext, TinyNet, make_split
from unshortcut.errors import UnshortcutError
from unshortcut.methods import get_method, method_names
from unshortcut.methods.dfr import (
    balanced_subsample,
    fit_head,
    l1_logistic_regression,
    split_rows_by_image,
)
from unshortcut.methods.lff import LossEMA, generalized_cross_entropy, relative_difficulty
from unshortcut.methods.reweight import group_weights

COUNTS = np.array([[90, 10], [20, 80]])
DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods"


def build(name, counts=COUNTS, batch_size=20, **hp):
    ctx = FakeContext(make_split(counts), make_split(counts, n_images=6), batch_size)
    return get_method(name)(ctx, **hp)


def test_registry_and_attribute_needs() -> None:
    needs = {name: get_method(name).needs_train_attributes for name in method_names()}
    assert needs == {
        "erm": False,
        "cb_erm": False,
        "gerne": True,
        "gerne_unknown": False,
        "resample": True,
        "reweight": True,
        "groupdro": True,
        "jtt": False,
        "dfr": False,
        "lff": False,
        "spatial-mask": False,
        "spatial-box": False,
        "spatial-mask+gerne": True,
        "spatial-mask+reweight": True,
        "mimm": True,
    }
    assert get_method("dfr").uses_val_attributes({"balance": "group"})
    assert not get_method("dfr").uses_val_attributes({"balance": "class"})


@pytest.mark.parametrize("name", method_names())
def test_every_method_has_a_card_with_its_hyperparameters(name: str) -> None:
    card = (DOCS / f"{name}.md").read_text()
    # The benchmark section is written from results by bench/robustness.py (spatial.py,
    # multi_attribute.py for the methods they compare).
    assert re.search(r"## What our benchmark shows\n(.*\n)*\| synth \| 0\.5 \| .*\d", card)
    for hp, spec in get_method(name).hparams.items():
        assert re.search(rf"`{re.escape(hp)}`.*{re.escape(str(spec.default))}", card), hp


def test_resample_is_uniform_over_groups() -> None:
    method = build("resample", counts=[[90, 10, 0], [20, 50, 30]], batch_size=25)
    groups = method.ctx.train.groups
    totals = np.zeros(6)
    n_batches = 0
    for epoch in range(100):
        for rows in method.epoch_batches(epoch, np.random.default_rng(epoch)):
            counts = np.bincount(groups[rows], minlength=6)
            assert counts[2] == 0 and set(counts[[0, 1, 3, 4, 5]]) <= {5}  # 25 / 5 groups
            totals += counts
            n_batches += 1
    np.testing.assert_allclose(totals / totals.sum(), [0.2, 0.2, 0, 0.2, 0.2, 0.2])
    assert n_batches == 100 * 8  # ceil(200 rows / 25) steps per epoch, as ERM


def test_reweight_equalises_group_weight() -> None:
    weights = group_weights(np.array([90, 10, 0, 20, 80]))
    # N / (G * n_g) with N = 200, G = 4 present groups
    np.testing.assert_allclose(weights, [200 / 360, 200 / 40, 0, 200 / 80, 200 / 320])
    method = build("reweight")
    per_row = method.row_weights.numpy()
    groups = method.ctx.train.groups
    totals = np.bincount(groups, weights=per_row)
    np.testing.assert_allclose(totals, totals[0])  # every group carries the same total weight
    assert per_row.mean() == pytest.approx(1.0)
    batch = method.ctx.batch(np.array([0, 95, 100, 150]))
    model = TinyNet()
    ce = F.cross_entropy(model(batch.x), batch.y, reduction="none")
    expected = (torch.tensor([200 / 360, 200 / 40, 200 / 80, 200 / 320]) * ce).mean()
    assert method.loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_groupdro_moves_weight_to_the_worst_group() -> None:
    method = build("groupdro", eta=0.1, C=0.0)
    model = TinyNet()
    torch.manual_seed(0)
    batch = method.ctx.batch(np.array([0, 1, 95, 96, 100, 101, 150, 151]))
    ce = F.cross_entropy(model(batch.x), batch.y, reduction="none").detach()
    group_loss = ce.reshape(4, 2).mean(dim=1).double()
    worst = int(group_loss.argmax())
    history = [method.q.clone()]
    for _ in range(50):
        method.loss(model, batch)
        history.append(method.q.clone())
    # closed form: q_g proportional to exp(eta * steps * L_g) from uniform
    expected = torch.softmax(0.1 * 50 * group_loss, dim=0)
    torch.testing.assert_close(history[-1], expected)
    q_worst = torch.stack(history)[:, worst]
    assert torch.all(q_worst[1:] > q_worst[:-1])
    loss = method.loss(model, batch)
    q = method.q
    assert loss.item() == pytest.approx(float((q * group_loss).sum()), rel=1e-5)
    resumed = build("groupdro", eta=0.1)
    resumed.load_state_dict(method.state_dict())
    torch.testing.assert_close(resumed.q, method.q)


def test_groupdro_adjustment_favours_small_groups() -> None:
    method = build("groupdro", eta=0.1, C=2.0)
    model = TinyNet()
    with torch.no_grad():  # zero loss everywhere: only C / sqrt(n_g) moves q
        for p in model.parameters():
            p.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0]))
    batch = method.ctx.batch(np.array([0, 95, 100, 150]))
    method.loss(model, batch)
    adjustment = 0.1 * 2.0 / np.sqrt([90, 10, 20, 80])
    np.testing.assert_allclose(method.q.numpy(), np.exp(adjustment) / np.exp(adjustment).sum())


def test_jtt_upweights_error_set_by_exactly_lambda_up() -> None:
    method = build("jtt", epochs=3, lambda_up=5)
    ctx = method.ctx
    probs = np.eye(2)[ctx.train.labels]
    errors = np.array([3, 95, 120])
    probs[errors] = probs[errors][:, ::-1]
    ctx.auxiliary_probs = probs
    method.prepare()
    assert ctx.auxiliary_calls == [{"method": "erm", "epochs": 3}]
    np.testing.assert_array_equal(method.error_set, errors)
    rows = np.concatenate(list(method.epoch_batches(0, np.random.default_rng(0))))
    seen = np.bincount(rows, minlength=len(ctx.train))
    expected = np.ones(len(ctx.train))
    expected[errors] = 5
    np.testing.assert_array_equal(seen, expected)
    assert method.steps_per_epoch() == int(np.ceil((200 + 4 * 3) / 20))
    resumed = build("jtt", epochs=3, lambda_up=5)
    resumed.load_state_dict(method.state_dict())
    np.testing.assert_array_equal(resumed.error_set, errors)


def test_jtt_refuses_an_empty_error_set() -> None:
    method = build("jtt")
    method.ctx.auxiliary_probs = np.eye(2)[method.ctx.train.labels]
    with pytest.raises(UnshortcutError, match="error set is empty"):
        method.prepare()


def test_dfr_val_halves_are_disjoint_by_image() -> None:
    images = np.array(["a", "b", "c", "d", "a", "b", "e"])
    fit, kept = split_rows_by_image(images, seed=1)
    assert sorted(np.concatenate([fit, kept]).tolist()) == list(range(7))
    assert not set(images[fit]) & set(images[kept])
    assert len(set(images[fit])) == 2  # floor(5 / 2) images fit the head
    np.testing.assert_array_equal(fit, split_rows_by_image(images, seed=1)[0])
    with pytest.raises(UnshortcutError, match="fewer than 2 images"):
        split_rows_by_image(np.array(["a", "a"]), seed=0)


def test_dfr_balanced_subsample_is_group_balanced() -> None:
    strata = np.repeat([0, 1, 2, 3], [40, 5, 9, 30])
    rows = balanced_subsample(strata, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(strata[rows]), [5, 5, 5, 5])
    assert len(np.unique(rows)) == len(rows)


def test_dfr_head_matches_sklearn_and_replaces_the_head() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 3)) * [1.0, 5.0, 0.1] + [0, 2, 1]
    labels = (features[:, 0] + rng.normal(size=60) > 0).astype(int)
    strata = labels  # balance by class
    weight, bias = fit_head(
        features, labels, strata, n_classes=2, C=0.5, n_subsamples=1, rng=np.random.default_rng(4)
    )
    rows = balanced_subsample(strata, np.random.default_rng(4))
    scaled = (features - features.mean(0)) / (features.std(0) + 1e-8)
    reference = l1_logistic_regression(0.5)
    reference.fit(scaled[rows], labels[rows])
    logits = features @ weight.T + bias
    probs = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(probs, reference.predict_proba(scaled)[:, 1], rtol=1e-6)

    method = build("dfr", C=1.0, n_subsamples=3)
    model = TinyNet()
    before = model.head.weight.detach().clone()
    assert method.finalize(model) is model
    assert not torch.equal(before, model.head.weight)
    fit_groups = method.ctx.val.groups[method.reserved_val_rows()]
    kept_images = set(method.ctx.val.image_ids[method.kept_rows])
    assert not kept_images & set(method.ctx.val.image_ids[method.reserved_val_rows()])
    assert len(np.unique(fit_groups)) == 4


def test_lff_weights_rise_where_the_biased_model_fails() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    ema_b, ema_d = LossEMA(labels, 2, 0.7), LossEMA(labels, 2, 0.7)
    rows = torch.arange(4)
    ema_b.update(rows, torch.tensor([0.1, 2.0, 0.2, 1.0]))
    ema_d.update(rows, torch.tensor([0.5, 0.5, 0.5, 0.5]))
    weights = relative_difficulty(ema_b.normalised(rows), ema_d.normalised(rows))
    # class-max normalised: b = [0.05, 1, 0.2, 1], d = 1 -> W = b / (b + 1)
    torch.testing.assert_close(
        weights, torch.tensor([0.05 / 1.05, 0.5, 0.2 / 1.2, 0.5], dtype=torch.float64)
    )
    ema_b.update(rows[:1], torch.tensor([1.1]))  # second value: EMA 0.7 * 0.1 + 0.3 * 1.1
    assert ema_b.value[0].item() == pytest.approx(0.4)
    gce = generalized_cross_entropy(torch.log(torch.tensor([[0.25, 0.75]])), labels[2:3], 0.5)
    assert gce.item() == pytest.approx((1 - 0.75**0.5) / 0.5)


def test_lff_step_uses_the_biased_twin() -> None:
    method = build("lff")
    assert method.extra_modules() is method.extra_modules()  # one twin, optimised with the model
    # A shortcut twin: feature 0 is +1 for attribute 1, -1 for attribute 0, and the twin
    # predicts class 1 exactly when it is positive (right on majority rows only).
    method.biased = biased = torch.nn.Linear(5, 2)
    with torch.no_grad():
        biased.weight.zero_()
        biased.weight[:, 0] = torch.tensor([-3.0, 3.0])
        biased.bias.zero_()
    batch = method.ctx.batch(np.array([0, 95, 100, 150]))  # minority rows: 95 and 100
    batch.x = torch.zeros(4, 5)
    batch.x[:, 0] = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    model = TinyNet()
    loss = method.loss(model, batch)
    loss.backward()
    weights = method.last_weights
    assert weights[1] > weights[0] and weights[2] > weights[3]
    assert max(weights[0], weights[3]) < 0.01 < 0.5 <= min(weights[1], weights[2])
    assert biased.weight.grad is not None and model.head.bias.grad is not None
    resumed = build("lff")
    resumed.load_state_dict(method.state_dict())
    torch.testing.assert_close(resumed.ema_biased.value, method.ema_biased.value)
