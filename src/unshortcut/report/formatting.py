"""Number formats shared by the console, the HTML page and the Markdown twin."""

from __future__ import annotations

from collections.abc import Sequence

MISSING = "n/a"


def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage without the sign: 0.8123 -> '81.2'."""
    return MISSING if value is None else f"{100 * value:.{digits}f}"


def pct_ci(value: float | None, ci: Sequence[float] | None) -> str:
    """'81.2 [75.0, 86.1]' (percent), or the value alone without an interval."""
    if value is None or not ci:
        return pct(value)
    return f"{pct(value)} [{pct(ci[0])}, {pct(ci[1])}]"


def auc(value: float | None, ci: Sequence[float] | None = None) -> str:
    """An AUROC with two decimals and its interval: '0.72 [0.68, 0.76]'."""
    if value is None:
        return MISSING
    return f"{value:.2f}" if not ci else f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def number(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"
