"""The report: settings and their numbers, rendering, and the page in a real headless browser."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_data import write_toy_patch_set
from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.report.build import write_report
from unshortcut.report.document import Document, Figure, Paragraph, Section, Table
from unshortcut.report.html import render_html
from unshortcut.report.markdown import render_markdown
from unshortcut.report.run_folders import find_runs
from unshortcut.report.settings import group_settings
from unshortcut.train import train

BROWSER_SETUP = (
    "headless Chromium is not installed: `make browser` installs Debian's chromium and "
    "chromium-driver with apt-get (needs root); `make test` runs it first"
)


# --------------------------------------------------------------------------- settings


def _fake_run(folder: Path, method: str, seed: int, wga: float, **config: Any) -> Path:
    folder.mkdir(parents=True)
    resolved = {"method": method, "seed": seed, "out": str(folder), "epochs": 3, "hp": {}} | config
    split = {"worst_group_accuracy": wga, "worst_group_accuracy_ci": [wga - 0.1, wga + 0.05]}
    metrics = {"selection": {"criterion": "worst_group_accuracy", "epoch": 2}, "val": split}
    (folder / "config.json").write_text(json.dumps(resolved))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_settings_pool_seeds_and_name_what_differs(tmp_path: Path) -> None:
    _fake_run(tmp_path / "b" / "gerne-1", "gerne", 0, 0.7, hp={"beta": 1.0})
    _fake_run(tmp_path / "a" / "erm-s0", "erm", 0, 0.6)
    _fake_run(tmp_path / "a" / "erm-s1", "erm", 1, 0.8)
    _fake_run(tmp_path / "b" / "gerne-05", "gerne", 0, 0.75, hp={"beta": 0.5})
    (tmp_path / "a" / "erm-s0" / "evaluation" / "x").mkdir(parents=True)  # not a run
    (tmp_path / "a" / "erm-s0" / "evaluation" / "x" / "metrics.json").write_text("{}")
    settings = group_settings(find_runs(tmp_path))
    assert [s.label for s in settings] == ["erm", "gerne (hp.beta=0.5)", "gerne (hp.beta=1.0)"]
    assert [r.seed for r in settings[0].runs] == [0, 1]
    # Several seeds: mean ± sample standard deviation; one run: value [interval].
    assert settings[0].summary("val", "worst_group_accuracy") == "70.0 ± 14.1"
    assert settings[1].summary("val", "worst_group_accuracy") == "75.0 [65.0, 80.0]"
    assert settings[0].summary("test", "worst_group_accuracy") == "n/a"


def test_find_runs_refuses_folders_without_runs(tmp_path: Path) -> None:
    with pytest.raises(UnshortcutError, match="no run folders below it"):
        find_runs(tmp_path)
    with pytest.raises(UnshortcutError, match="no such folder"):
        find_runs(tmp_path / "missing")
    run = _fake_run(tmp_path / "run", "erm", 0, 0.5)
    with pytest.raises(UnshortcutError, match=r"give an \.html file name"):
        write_report(run, tmp_path / "report.pdf")


# --------------------------------------------------------------------------- rendering


def test_html_and_markdown_render_one_document_safely() -> None:
    png = _tiny_png()
    table = Table(("group", "n"), (("tumor|tissue_ratio<0.5", "3"),), "counts <raw>")
    document = Document(
        "t <b>",
        sections=[
            Section(
                "One",
                [Paragraph("<script>alert(1)</script>"), table, Figure(png, "a", "fig")],
                [Section("Two", [Figure(png, "b", "fig")])],
            )
        ],
    )
    html = render_html(document)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<td>tumor|tissue_ratio&lt;0.5</td>" in html
    assert html.count("data:image/png;base64,") == 2
    markdown, files = render_markdown(document, "figs")
    assert "| tumor\\|tissue_ratio<0.5 | 3 |" in markdown
    assert "|---|---:|" in markdown
    assert list(files) == ["fig.png", "fig-2.png"]
    assert "![a](figs/fig.png)" in markdown and "![b](figs/fig-2.png)" in markdown
    assert "### Two" in markdown


def _tiny_png() -> bytes:
    from unshortcut.report.plots import error_png

    return error_png("x", ("a", "b"), (), {"s": np.array([[0.1, 0.2], [0.3, np.nan]])})


# --------------------------------------------------------------------------- real runs, browser

HEADINGS = (
    "Shortcut audit",
    "Accuracy per group",
    "Selection criteria",
    "Training curves",
    "Error against the attribute",
    "Selection protocol",
    "Configuration",
    "Warnings",
)
FAST = {
    "epochs": 3,
    "batch_size": 32,
    "bootstrap": 20,
    "lr": 0.02,
    "device": "cpu",
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """erm with seeds 0 and 1, gerne with seed 0, trained on the toy patch set."""
    root = tmp_path_factory.mktemp("report")
    patches = write_toy_patch_set(root / "patches", n=240)
    for method, seed in (("erm", 0), ("erm", 1), ("gerne", 0)):
        out = root / "runs" / f"{method}-s{seed}"
        train(
            TrainConfig(patches=patches, out=out, method=method, seed=seed, **FAST), progress=False
        )
    return root / "runs"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Selenium, collecting the console log."""
    binary = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(BROWSER_SETUP)
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium: pip install -e '.[dev]'"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_window_size(1200, 900)
    yield driver
    driver.quit()


def _open(browser: Any, page: Path) -> str:
    """Load ``page``; check every image decoded and the console stayed clean; return the text."""
    browser.get_log("browser")  # drop messages of earlier pages
    browser.get(page.resolve().as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);"
    )
    assert images, "the report has no images"
    assert all(complete and width > 0 for complete, width in images), images
    problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert problems == []
    return browser.find_element("tag name", "body").text


def _metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


def _pct_ci(split: dict[str, Any], key: str) -> str:
    lo, hi = split[f"{key}_ci"]
    return f"{100 * split[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


@pytest.mark.slow
def test_single_run_report_renders_in_chromium(runs: Path, browser: Any, tmp_path: Path) -> None:
    run = runs / "gerne-s0"
    files = write_report(run, tmp_path / "one.html", n_bootstrap=50)
    html = files.html.read_text()
    assert 'src="http' not in html and "<script" not in html and "<link" not in html
    text = _open(browser, files.html)
    metrics = _metrics(run)
    for split in ("val", "test"):
        for key in ("worst_group_accuracy", "balanced_accuracy", "auroc", "robust_auroc"):
            assert _pct_ci(metrics[split], key) in text, (split, key)
    for heading in HEADINGS:
        assert heading in text
    assert "strong tissue-size shortcut" in text or "moderate tissue-size shortcut" in text
    assert "checkpoint chosen by validation worst_group_accuracy" in text
    markdown = files.markdown.read_text()
    assert _pct_ci(metrics["test"], "worst_group_accuracy") in markdown
    for name in (files.figures).iterdir():
        assert f"]({files.figures.name}/{name.name})" in markdown


@pytest.mark.slow
def test_folder_report_puts_methods_side_by_side_in_chromium(runs: Path, browser: Any) -> None:
    files = write_report(runs, n_bootstrap=50)
    assert files.html == runs / "report.html"
    text = _open(browser, files.html)
    erm = [_metrics(runs / f"erm-s{s}")["test"]["worst_group_accuracy"] for s in (0, 1)]
    expected = f"{100 * np.mean(erm):.1f} ± {100 * np.std(erm, ddof=1):.1f}"
    lines = text.splitlines()
    assert any(line.startswith("erm 2 (seed 0, 1)") and expected in line for line in lines)
    gerne = _metrics(runs / "gerne-s0")["test"]
    assert any(
        line.startswith("gerne 1 (seed 0)") and _pct_ci(gerne, "worst_group_accuracy") in line
        for line in lines
    )
    # Method columns of the per-group table, and no ranking by test numbers: erm first.
    assert "erm val erm test gerne val gerne test" in text
    assert files.markdown.read_text().index("| erm |") < files.markdown.read_text().index(
        "| gerne |"
    )
    # A second report of the same folder replaces the first and ignores it.
    assert write_report(runs, n_bootstrap=50).html == files.html
