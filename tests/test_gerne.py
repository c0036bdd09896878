"""GERNE: sampling distributions, the beta bound, and the one-backward extrapolated gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from test_methods_fake import FakeContext, TinyNet, make_split
from unshortcut.errors import UnshortcutError
from unshortcut.methods import get_method
from unshortcut.methods.gerne import (
    beta_max,
    extrapolated_loss,
    identification_report,
    less_biased_distribution,
    pseudo_minority,
    simulated_attribute_distribution,
)

# Two classes, two bins: alpha = [[0.9, 0.1], [0.2, 0.8]].
COUNTS_2 = np.array([[90, 10], [20, 80]])


def gerne(counts=COUNTS_2, batch_size=40, batchnorm=False, name="gerne", pretrained=None, **hp):
    """A GERNE method on a fake context; frozen BatchNorm gets a 'pretrained' model."""
    pretrained = hp.get("bn") == "frozen" if pretrained is None else pretrained
    ctx = FakeContext(
        make_split(counts),
        make_split(counts),
        batch_size,
        batchnorm=batchnorm,
        pretrained=pretrained,
    )
    return get_method(name)(ctx, **hp)


def test_distributions_by_hand() -> None:
    alpha = np.array([[0.9, 0.1], [0.2, 0.8]])
    np.testing.assert_allclose(less_biased_distribution(alpha, 0.5), [[0.7, 0.3], [0.35, 0.65]])
    # p_ext = alpha + c (beta + 1) (1/A - alpha): 0.9 + 0.5 * 2 * (0.5 - 0.9) = 0.5
    np.testing.assert_allclose(
        simulated_attribute_distribution(alpha, 0.5, 1.0), [[0.5, 0.5], [0.5, 0.5]]
    )
    np.testing.assert_allclose(simulated_attribute_distribution(alpha, 0.3, -1.0), alpha)
    # c = 1, beta = 0 is group resampling: p_lb = p_ext = 1/A.
    np.testing.assert_allclose(less_biased_distribution(alpha, 1.0), 0.5)
    np.testing.assert_allclose(simulated_attribute_distribution(alpha, 1.0, 0.0), 0.5)
    # beta_max = 0.9 / (0.5 (0.9 - 0.5)) - 1 = 3.5
    assert beta_max(alpha, 0.5) == pytest.approx(3.5)
    assert beta_max(np.full((2, 4), 0.25), 0.5) == np.inf


@pytest.mark.parametrize("n_attributes", [2, 4, 6])
def test_beta_max_zeroes_the_smallest_simulated_probability(n_attributes: int) -> None:
    rng = np.random.default_rng(n_attributes)
    alpha = rng.dirichlet(np.ones(n_attributes), size=3)
    for c in (0.2, 0.7, 1.0):
        p_ext = simulated_attribute_distribution(alpha, c, beta_max(alpha, c))
        assert p_ext.min() == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(p_ext.sum(axis=1), 1.0)


def test_validate_refuses_beta_outside_bound_and_names_it() -> None:
    gerne(beta=3.5, c=0.5)  # exactly beta_max is allowed
    with pytest.raises(UnshortcutError, match=r"beta=3.6 is outside \[-1, 3.5\]"):
        gerne(beta=3.6, c=0.5)
    with pytest.raises(UnshortcutError, match=r"beta=-1.01 is below -1; beta = -1 already"):
        gerne(beta=-1.01)
    with pytest.raises(UnshortcutError, match=r"c=0.0 must lie in \(0, 1\]"):
        gerne(c=0.0)
    with pytest.raises(UnshortcutError, match="bn='batch'"):
        gerne(bn="batch")
    with pytest.raises(UnshortcutError, match="batch size 3 is below"):
        gerne(batch_size=3)


def test_empty_group_is_refused_by_name() -> None:
    with pytest.raises(UnshortcutError, match=r"group 3 \(class 1, attribute bin 1\) has no rows"):
        gerne(counts=[[5, 5], [10, 0]])


@pytest.mark.parametrize(
    "counts",
    [
        np.array([[60, 25, 10, 5], [5, 15, 30, 50]]),  # A = 4: e.g. 2 attributes x 2 bins
        np.array([[40, 20, 15, 10, 10, 5], [3, 7, 10, 20, 25, 35]]),  # A = 6: 3 bins x 2
    ],
)
def test_batches_follow_both_distributions_exactly(counts: np.ndarray) -> None:
    method = gerne(counts=counts, batch_size=64, c=0.6, beta=0.5)
    split = method.ctx.train
    per_class = 64 // 4
    assert method.per_class == per_class
    alpha = split.attribute_given_class()
    targets = [per_class * alpha, per_class * less_biased_distribution(alpha, 0.6)]
    totals = [np.zeros_like(alpha), np.zeros_like(alpha)]
    n_steps = 0
    for epoch in range(40):
        for rows in method.epoch_batches(epoch, np.random.default_rng(epoch)):
            assert len(rows) == 2 * 2 * per_class
            for half, target, total in zip(np.split(rows, 2), targets, totals, strict=True):
                counts_ya = np.bincount(split.groups[half], minlength=split.n_groups)
                counts_ya = counts_ya.reshape(alpha.shape)
                # systematic rounding: every group gets the floor or the ceiling
                assert np.all(counts_ya >= np.floor(target)) and np.all(
                    counts_ya <= np.ceil(target)
                )
                assert counts_ya.sum(axis=1).tolist() == [per_class, per_class]
                total += counts_ya
            n_steps += 1
    for target, total in zip(targets, totals, strict=True):
        # per-step count deviations are bounded by 1, so the mean is within a few 0.5/sqrt(n)
        np.testing.assert_allclose(total / n_steps, target, atol=4 * 0.5 / np.sqrt(n_steps))


def _losses(model, batch, half):
    per_row = F.cross_entropy(model(batch.x), batch.y, reduction="none")
    return per_row[:half].mean(), per_row[half:].mean()


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def _one_batch(method):
    rows = next(method.epoch_batches(0, np.random.default_rng(1)))
    return method.ctx.batch(rows)


def _rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative error of two whole gradients (all parameters flattened together)."""
    flat_a, flat_b = torch.cat([g.ravel() for g in a]), torch.cat([g.ravel() for g in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


@pytest.mark.parametrize("beta", [-1.0, 0.0, 0.5, 1.0, 2.5])
def test_default_step_is_the_papers_update_with_batchnorm(beta: float) -> None:
    """bn=separate: the step equals g_lb + beta (g_lb - g_b) of two separate backward
    passes, each batch normalised with its own statistics (BatchNorm in training mode)."""
    method = gerne(batchnorm=True, beta=beta, c=0.5)
    assert method.hp["bn"] == "separate"
    model = method.ctx.new_model().train()
    batch = _one_batch(method)
    half = len(batch.y) // 2
    biased, less = batch.select(slice(0, half)), batch.select(slice(half, None))

    method.loss(model, batch).backward()
    single = _grads(model)
    F.cross_entropy(model(less.x), less.y).backward()
    grad_lb = _grads(model)
    F.cross_entropy(model(biased.x), biased.y).backward()
    grad_b = _grads(model)
    expected = [g_lb + beta * (g_lb - g_b) for g_lb, g_b in zip(grad_lb, grad_b, strict=True)]
    assert _rel_error(single, expected) < 1e-5
    if beta == -1.0:  # class-balanced ERM on the same batch composition: the biased batch
        cb = get_method("cb_erm")(method.ctx)
        assert method.loss(model, batch).item() == pytest.approx(cb.loss(model, biased).item())
        assert _rel_error(single, grad_b) < 1e-5


def test_joint_batchnorm_mixes_the_batches_and_differs_from_the_papers_step() -> None:
    method = gerne(batchnorm=True, beta=1.0, c=0.5, bn="joint")
    model = method.ctx.new_model().train()
    batch = _one_batch(method)
    method.loss(model, batch).backward()
    joint = _grads(model)
    separate = gerne(batchnorm=True, beta=1.0, c=0.5)
    separate.loss(model, batch).backward()
    exact = _grads(model)
    assert _rel_error(joint, exact) > 1e-3


@pytest.mark.parametrize(("batchnorm", "bn"), [(False, "joint"), (True, "frozen")])
@pytest.mark.parametrize("beta", [-1.0, 0.0, 0.7, 2.5])
def test_single_backward_equals_two_backward_extrapolation(batchnorm, bn, beta) -> None:
    method = gerne(batchnorm=batchnorm, bn=bn, beta=beta, c=0.5)
    model = method.ctx.new_model().train()
    if batchnorm:  # non-trivial running statistics, used by both computations
        norm = model.body[1]
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    batch = _one_batch(method)
    half = len(batch.y) // 2

    loss = method.loss(model, batch)
    loss.backward()
    single = _grads(model)

    if batchnorm:
        model.body[1].eval()  # what bn="frozen" does during the step
    loss_b, loss_lb = _losses(model, batch, half)
    loss_lb.backward()
    grad_lb = _grads(model)
    _losses(model, batch, half)[0].backward()
    grad_b = _grads(model)

    assert loss.item() == pytest.approx(((1 + beta) * loss_lb - beta * loss_b).item(), rel=1e-6)
    for g, g_lb, g_b in zip(single, grad_lb, grad_b, strict=True):
        torch.testing.assert_close(g, (1 + beta) * g_lb - beta * g_b, rtol=1e-5, atol=1e-6)


def test_train_step_logs_both_batches_and_steps_once() -> None:
    method = gerne(beta=1.0)
    model = method.ctx.new_model().train()
    batch = _one_batch(method)
    half = len(batch.y) // 2
    with torch.no_grad():
        loss_b, loss_lb = _losses(model, batch, half)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    terms = method.train_step(model, batch, {"model": optimizer})
    assert terms["loss_biased"] == pytest.approx(loss_b.item(), rel=1e-6)
    assert terms["loss_less_biased"] == pytest.approx(loss_lb.item(), rel=1e-6)
    assert terms["loss"] == pytest.approx(2 * loss_lb.item() - loss_b.item(), rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_runaway_extrapolated_loss_warns_and_stops() -> None:
    method = gerne(beta=1.0)
    model = method.ctx.new_model()
    method.on_epoch_end(0, model, {"loss": 0.4, "loss_biased": 0.3, "loss_less_biased": 0.35})
    assert method.stop_reason() is None
    with pytest.warns(UserWarning, match=r"ran away at epoch 3 \(mean -2.500 < 0.*training stops"):
        method.on_epoch_end(3, model, {"loss": -2.5, "loss_biased": 6.0, "loss_less_biased": 1.75})
    assert method.stop_reason() is not None and "lower beta (now 1)" in method.stop_reason()
    assert method.run_report()["runaway"] == method.stop_reason()
    resumed = gerne(beta=1.0)
    resumed.load_state_dict(method.state_dict())
    assert resumed.stop_reason() == method.stop_reason()
    going_on = gerne(beta=1.0, on_runaway="warn")
    with pytest.warns(UserWarning, match="training goes on"):
        going_on.on_epoch_end(3, model, {"loss": -1.0, "loss_biased": 4.0, "loss_less_biased": 1.5})
    assert going_on.stop_reason() is None and going_on.run_report()["runaway"] is not None
    with pytest.raises(UnshortcutError, match="on_runaway='never'"):
        gerne(on_runaway="never")


def test_frozen_batchnorm_without_pretrained_weights_warns() -> None:
    with pytest.warns(UserWarning, match="bn=frozen on a model trained from scratch"):
        gerne(bn="frozen", pretrained=False)


def test_c_one_beta_zero_is_group_resampling() -> None:
    method = gerne(c=1.0, beta=0.0, batch_size=80)
    model = TinyNet()
    batch = _one_batch(method)
    half = len(batch.y) // 2
    groups = batch.group[half:].numpy()
    np.testing.assert_array_equal(np.bincount(groups, minlength=4), [10, 10, 10, 10])
    assert method.loss(model, batch).item() == pytest.approx(_losses(model, batch, half)[1].item())


def test_bn_modes_update_statistics_except_frozen() -> None:
    for bn, changes in (("separate", True), ("joint", True), ("frozen", False)):
        method = gerne(batchnorm=True, bn=bn)
        model = method.ctx.new_model().train()
        before = model.body[1].running_mean.clone()
        method.loss(model, _one_batch(method))
        assert model.body[1].training  # restored after the step
        assert (not torch.equal(before, model.body[1].running_mean)) is changes


def test_extrapolated_loss_by_hand() -> None:
    loss = extrapolated_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]), 2.0)
    assert loss.item() == pytest.approx(3 * 0.5 - 2 * 2.0)


def test_pseudo_minority_and_report_by_hand() -> None:
    split = make_split([[3, 1], [1, 3]])  # true minority: rows 3 (class 0) and 4 (class 1)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]] + [[0.5, 0.5]] * 4)
    probs[4:, 1] = [0.1, 0.9, 0.8, 0.95]
    probs[4:, 0] = 1 - probs[4:, 1]
    pseudo = pseudo_minority(probs, split.labels, 0.5)
    # floor(0.5 * 4) = 2 lowest true-class probabilities per class
    np.testing.assert_array_equal(pseudo, [0, 1, 0, 1, 1, 0, 1, 0])
    report = identification_report(split, pseudo)
    assert report["precision"] == pytest.approx(2 / 4) and report["recall"] == pytest.approx(1.0)
    unknown = split.with_attributes(np.zeros(8, dtype=np.int64), 1)
    assert identification_report(unknown, pseudo)["precision"] is None


def test_gerne_unknown_prepares_pseudo_groups_and_resumes() -> None:
    method = gerne(name="gerne_unknown", t=0.25, epochs=2)
    ctx = method.ctx
    labels = ctx.train.labels
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, len(labels))
    minority = ctx.train.attributes == np.array([1, 0])[labels]
    confidence[minority] = rng.uniform(0.0, 0.4, minority.sum())  # least confident
    probs = np.empty((len(labels), 2))
    probs[np.arange(len(labels)), labels] = confidence
    probs[np.arange(len(labels)), 1 - labels] = 1 - confidence
    ctx.auxiliary_probs = probs
    method.prepare()
    assert ctx.auxiliary_calls == [
        {
            "method": "cb_erm",
            "epochs": 2,
            "lr_factor": 0.1,
            "weight_decay_factor": 2.0,
            "select_by": "balanced_accuracy",
        }
    ]
    # floor(0.25 * 100) = 25 per class; true minority: 10 (class 0) + 20 (class 1) rows
    assert method.report["pseudo_minority_rows"] == 50
    assert method.report["recall"] == pytest.approx(1.0)
    assert method.report["precision"] == pytest.approx(30 / 50)
    alpha = method.sampling_split().attribute_given_class()
    np.testing.assert_allclose(alpha, [[0.75, 0.25], [0.75, 0.25]])

    resumed = get_method("gerne_unknown")(ctx, t=0.25, epochs=2)
    resumed.load_state_dict(method.state_dict())
    np.testing.assert_array_equal(resumed.pseudo, method.pseudo)
    assert resumed.report == method.report
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(
        next(method.epoch_batches(0, rng_a)), next(resumed.epoch_batches(0, rng_b))
    )


def test_gerne_unknown_bounds_use_pseudo_group_sizes() -> None:
    # t = 0.2: alpha_max = 0.8 with A = 2, c = 0.5 -> beta_max = 0.8 / (0.5 * 0.3) - 1
    bound = 0.8 / 0.15 - 1
    gerne(name="gerne_unknown", t=0.2, c=0.5, beta=bound)
    with pytest.raises(UnshortcutError, match="outside"):
        gerne(name="gerne_unknown", t=0.2, c=0.5, beta=bound + 0.01)
    with pytest.raises(UnshortcutError, match=r"raise t"):
        gerne(counts=[[2, 2], [50, 50]], name="gerne_unknown", t=0.2)
    with pytest.raises(UnshortcutError, match=r"t=0.5 must lie in \(0, 0.5\)"):
        gerne(name="gerne_unknown", t=0.5)
