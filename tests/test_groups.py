"""Group definitions: CLI parsing, binning, names, JSON round trip, and every user error."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from unshortcut.errors import UnshortcutError
from unshortcut.groups import (
    AttributeSpec,
    BinnedAttribute,
    GroupScheme,
    fit_groups,
    parse_attribute_specs,
)


def _table() -> pd.DataFrame:
    """Eight patches: each label x (tissue < 0.5, >= 0.5) x site (A, B) once."""
    return pd.DataFrame(
        {
            "label": [0, 0, 0, 0, 1, 1, 1, 1],
            "tissue_ratio": [0.05, 0.2, 0.5, 0.9, 0.1, 0.3, 0.7, 1.0],
            "site": ["A", "B", "A", "B", "A", "B", "A", "B"],
            "scanner": [1, 2, 1, 2, 2, 1, 2, 1],
        }
    )


# --- parsing -----------------------------------------------------------------------------


def test_parse_bare_names_take_the_taus_and_decide_numeric_or_categorical_at_fit_time() -> None:
    assert parse_attribute_specs(["tissue_ratio"], []) == [
        AttributeSpec("tissue_ratio", categorical=None)
    ]
    assert parse_attribute_specs(["tissue_ratio", "site"], [0.6, 0.3]) == [
        AttributeSpec("tissue_ratio", thresholds=(0.3, 0.6), categorical=None),
        AttributeSpec("site", thresholds=(0.3, 0.6), categorical=None),
    ]
    assert parse_attribute_specs([], []) == [AttributeSpec("tissue_ratio", categorical=None)]


def test_parse_inline_thresholds_quantiles_and_categorical() -> None:
    specs = parse_attribute_specs(["tissue_ratio:0.6,0.3", "tumor_fraction:q4", "scanner:cat"], [])
    assert specs == [
        AttributeSpec("tissue_ratio", thresholds=(0.3, 0.6)),
        AttributeSpec("tumor_fraction", quantiles=4),
        AttributeSpec("scanner", categorical=True),
    ]


@pytest.mark.parametrize(
    ("attributes", "taus", "message"),
    [
        (["tissue_ratio:abc"], [], "--attribute 'tissue_ratio:abc': after ':' give thresholds"),
        (["tissue_ratio:q1"], [], "quantile bins read like q4"),
        ([":0.5"], [], "the column name is missing"),
        ([""], [], "give a column name"),
        (["tissue_ratio:0.3,0.3"], [], "thresholds must be distinct"),
        (["tissue_ratio", "tissue_ratio:q4"], [], "tissue_ratio given more than once"),
        (["tissue_ratio"], [float("nan")], "--tau: thresholds must be finite numbers"),
        (["tissue_ratio:q4"], [0.3], "--tau: applies to bare attribute names only"),
    ],
)
def test_parse_errors(attributes: list[str], taus: list[float], message: str) -> None:
    with pytest.raises(UnshortcutError, match=message.replace("(", r"\(")):
        parse_attribute_specs(attributes, taus)


def test_spec_refuses_contradictory_ways() -> None:
    with pytest.raises(ValueError, match="quantiles exclude"):
        AttributeSpec("x", thresholds=(0.5,), quantiles=4)
    with pytest.raises(ValueError, match="takes no thresholds"):
        AttributeSpec("x", thresholds=(0.5,), categorical=True)


# --- names and indices -------------------------------------------------------------------


def test_default_tau_names_and_indices() -> None:
    table = _table()
    scheme = fit_groups(table, parse_attribute_specs(["tissue_ratio"], []))
    assert (scheme.n_classes, scheme.n_attributes, scheme.n_groups) == (2, 2, 4)
    assert scheme.attribute_names == ("tissue_ratio<0.5", "tissue_ratio>=0.5")
    assert scheme.group_names == (
        "non-tumor|tissue_ratio<0.5",
        "non-tumor|tissue_ratio>=0.5",
        "tumor|tissue_ratio<0.5",
        "tumor|tissue_ratio>=0.5",
    )
    # 0.5 itself is in the upper bin, as ">=" says.
    assert scheme.attribute_index(table).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert scheme.group_index(table).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert scheme.group_index(table).dtype == np.int64


def test_three_bins_from_several_taus() -> None:
    table = _table()
    scheme = fit_groups(table, parse_attribute_specs(["tissue_ratio"], [0.3, 0.6]))
    assert scheme.attribute_names == (
        "tissue_ratio<0.3",
        "0.3<=tissue_ratio<0.6",
        "tissue_ratio>=0.6",
    )
    assert scheme.attribute_index(table).tolist() == [0, 0, 1, 2, 0, 1, 2, 2]
    assert scheme.group_names[4] == "tumor|0.3<=tissue_ratio<0.6"


def test_categorical_auto_forced_and_boolean() -> None:
    table = _table().assign(synthetic=[True, False] * 4)
    scheme = fit_groups(table, parse_attribute_specs(["site"], []))
    assert scheme.attribute_names == ("site=A", "site=B")
    assert scheme.attribute_index(table).tolist() == [0, 1] * 4
    forced = fit_groups(table, parse_attribute_specs(["scanner:cat"], []))
    assert forced.attribute_names == ("scanner=1", "scanner=2")
    assert fit_groups(table, parse_attribute_specs(["synthetic"], [])).attribute_names == (
        "synthetic=False",
        "synthetic=True",
    )


def test_intersection_names_and_mixed_radix_index() -> None:
    table = _table()
    scheme = fit_groups(table, parse_attribute_specs(["tissue_ratio", "site"], [0.5]))
    assert scheme.attribute_names == (
        "tissue_ratio<0.5&site=A",
        "tissue_ratio<0.5&site=B",
        "tissue_ratio>=0.5&site=A",
        "tissue_ratio>=0.5&site=B",
    )
    assert scheme.n_groups == 8
    assert scheme.group_names[1] == "non-tumor|tissue_ratio<0.5&site=B"
    assert scheme.group_names[7] == "tumor|tissue_ratio>=0.5&site=B"
    # group = label * 4 + tissue_bin * 2 + site_bin; every row lands in its own group.
    assert scheme.group_index(table).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_quantiles_are_fitted_on_the_training_split_only() -> None:
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"label": np.tile([0, 1], 50), "tissue_ratio": rng.random(100)})
    scheme = fit_groups(train, [AttributeSpec("tissue_ratio", quantiles=4)])
    expected = np.quantile(train["tissue_ratio"], [0.25, 0.5, 0.75])
    assert scheme.attributes[0].edges == pytest.approx(tuple(expected))
    assert np.bincount(scheme.attribute_index(train)).tolist() == [25, 25, 25, 25]
    # Test data from another distribution is binned with the training edges.
    test = pd.DataFrame({"label": [0, 1], "tissue_ratio": [0.0, 0.99]})
    assert scheme.attribute_index(test).tolist() == [0, 3]
    e = [f"{v:.4g}" for v in expected]
    assert scheme.attribute_names[1] == f"{e[0]}<=tissue_ratio<{e[1]}"


def test_quantile_ties_merge_bins() -> None:
    # 60% of the patches are full of tissue: the upper quartile edges collapse onto 1.0.
    values = np.r_[np.linspace(0.1, 0.6, 8), np.ones(12)]
    train = pd.DataFrame({"label": np.tile([0, 1], 10), "tissue_ratio": values})
    scheme = fit_groups(train, parse_attribute_specs(["tissue_ratio:q4"], []))
    assert scheme.attributes[0].edges == (pytest.approx(np.quantile(values, 0.25)), 1.0)
    assert scheme.attribute_names[-1] == "tissue_ratio>=1"


def test_names_keep_close_edges_apart() -> None:
    attribute = BinnedAttribute("x", edges=(0.123451, 0.123459))
    # Four significant digits would name both 0.1235; five tell them apart.
    assert attribute.bin_names == ["x<0.12345", "0.12345<=x<0.12346", "x>=0.12346"]


def test_json_round_trip() -> None:
    table = _table()
    scheme = fit_groups(table, parse_attribute_specs(["tissue_ratio:0.5", "site"], []))
    data = json.loads(json.dumps(scheme.to_dict()))
    assert data["group_names"][0] == "non-tumor|tissue_ratio<0.5&site=A"
    again = GroupScheme.from_dict(data)
    assert again == scheme
    assert again.group_names == scheme.group_names
    assert np.array_equal(again.group_index(table), scheme.group_index(table))


def test_counts_table() -> None:
    table = pd.concat([_table(), _table().iloc[[4, 5, 6]]], ignore_index=True)
    scheme = fit_groups(table, parse_attribute_specs(["tissue_ratio"], []))
    counts = scheme.counts(table)
    assert counts["group"].tolist() == list(scheme.group_names)
    assert counts["class"].tolist() == ["non-tumor", "non-tumor", "tumor", "tumor"]
    assert counts["attribute"].tolist() == ["tissue_ratio<0.5", "tissue_ratio>=0.5"] * 2
    # tumor rows: 0.1, 0.3, 0.7, 1.0 plus the repeated 0.1, 0.3, 0.7 -> 4 below, 3 above.
    assert counts["n"].tolist() == [2, 2, 4, 3]
    assert counts["share"].tolist() == pytest.approx([2 / 11, 2 / 11, 4 / 11, 3 / 11])
    assert counts["share_within_class"].tolist() == pytest.approx([0.5, 0.5, 4 / 7, 3 / 7])


# --- errors ------------------------------------------------------------------------------


def test_unknown_column_lists_the_available_ones() -> None:
    with pytest.raises(UnshortcutError) as info:
        fit_groups(_table(), parse_attribute_specs(["stain"], []), source="runs/p")
    assert str(info.value) == (
        "runs/p: no column 'stain' (available: label, tissue_ratio, site, scanner)"
    )


def test_non_numeric_column_with_thresholds() -> None:
    with pytest.raises(UnshortcutError, match=r"column 'site' is not numeric.*site:cat"):
        fit_groups(_table(), parse_attribute_specs(["site:0.3"], []))
    with pytest.raises(UnshortcutError, match="column 'site' is not numeric"):
        fit_groups(_table(), parse_attribute_specs(["site:q4"], []))


def test_tau_outside_the_training_range() -> None:
    with pytest.raises(UnshortcutError) as info:
        fit_groups(_table(), parse_attribute_specs(["tissue_ratio"], [1.2]), source="p")
    assert str(info.value) == (
        "p: --tau 1.2 is outside tissue_ratio's range [0.05, 1.00] in the training split"
    )
    with pytest.raises(UnshortcutError, match=r"threshold -0\.1 of --attribute tissue_ratio"):
        fit_groups(_table(), parse_attribute_specs(["tissue_ratio:-0.1"], []))
    low = _table().assign(tissue_ratio=np.linspace(0.01, 0.2, 8))
    with pytest.raises(UnshortcutError, match=r"the default --tau 0.5 is outside .*\[0.01, 0.20\]"):
        fit_groups(low, parse_attribute_specs(["tissue_ratio"], []))


def test_empty_training_groups_are_named() -> None:
    table = _table().assign(tissue_ratio=[0.1, 0.2, 0.6, 0.9, 0.6, 0.7, 0.8, 1.0])
    with pytest.raises(UnshortcutError) as info:
        fit_groups(table, parse_attribute_specs(["tissue_ratio"], []), source="p")
    assert str(info.value) == (
        "p: empty training groups: tumor|tissue_ratio<0.5 (choose other thresholds or fewer bins)"
    )


def test_missing_class() -> None:
    with pytest.raises(UnshortcutError, match="the training split has no tumor rows"):
        fit_groups(_table().query("label == 0"), parse_attribute_specs(["site"], []))


def test_bad_labels_and_missing_values() -> None:
    with pytest.raises(UnshortcutError, match=r"column 'label' must hold 0 .* or 1"):
        fit_groups(
            _table().assign(label=[0, 1, 2, 0, 1, 0, 1, 0]),
            [AttributeSpec("site", categorical=True)],
        )
    with pytest.raises(UnshortcutError, match="column 'tissue_ratio' has 1 missing value"):
        fit_groups(
            _table().assign(tissue_ratio=[np.nan, *[0.2, 0.5, 0.9, 0.1, 0.3, 0.7, 1.0]]),
            [AttributeSpec("tissue_ratio")],
        )


def test_constant_column_cannot_give_quantile_bins() -> None:
    with pytest.raises(UnshortcutError, match="'tissue_ratio:q4' gives a single bin"):
        fit_groups(_table().assign(tissue_ratio=1.0), [AttributeSpec("tissue_ratio", quantiles=4)])


def test_unseen_category_in_a_later_split() -> None:
    scheme = fit_groups(_table(), parse_attribute_specs(["site"], []))
    test = pd.DataFrame({"label": [0, 1], "site": ["A", "C"]})
    with pytest.raises(UnshortcutError) as info:
        scheme.attribute_index(test, source="test split")
    assert str(info.value) == (
        "test split: column 'site' has value(s) C not seen in the training split (known: A, B)"
    )


def test_attribute_none_groups_are_the_classes() -> None:
    table = pd.DataFrame({"label": [0, 1, 1, 0, 1], "tissue_ratio": [1.0] * 5})
    assert parse_attribute_specs(["none"], []) == []
    scheme = fit_groups(table, parse_attribute_specs(["none"], []))
    assert scheme.group_names == ("non-tumor|all", "tumor|all")
    assert scheme.group_index(table).tolist() == [0, 1, 1, 0, 1]
    assert GroupScheme.from_dict(scheme.to_dict()).group_names == scheme.group_names
    with pytest.raises(UnshortcutError, match="--attribute none has no thresholds"):
        parse_attribute_specs(["none"], [0.5])
