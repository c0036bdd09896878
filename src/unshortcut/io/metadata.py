"""metadata.csv: image-level attributes, patient ids and fixed splits (contract 3.1).

Ids are read as text (``0012`` stays ``0012``), surrounding spaces are stripped, and
split values are compared case-insensitively. Every problem is one UnshortcutError that
names the file, so a user fixes the CSV in one go rather than column by column.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from unshortcut.errors import UnshortcutError

SPLITS = ("train", "val", "test")
_TEXT_COLUMNS = ("image_id", "patient_id", "split")


def read_metadata(path: Path | str, image_ids: Sequence[str]) -> pd.DataFrame:
    """Rows for exactly ``image_ids``, in that order, with every column of the file.

    ``patient_id`` and ``split`` are kept only when the file has them; other columns are
    attributes with the types pandas infers (numbers stay numbers).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # A row longer than the header would silently become an index or lose cells.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(
                path,
                dtype=dict.fromkeys(_TEXT_COLUMNS, str),
                skipinitialspace=True,
                index_col=False,
            )
    except pd.errors.ParserWarning:
        raise UnshortcutError(f"{path}: a row has more fields than the header") from None
    except FileNotFoundError:
        raise UnshortcutError(f"{path}: no such file") from None
    except pd.errors.EmptyDataError:
        raise UnshortcutError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise UnshortcutError(f"{path}: not a readable CSV file ({exc})") from None
    table.columns = [str(column).strip() for column in table.columns]
    if "image_id" not in table.columns:
        found = ", ".join(table.columns)
        raise UnshortcutError(f"{path}: missing column image_id (found: {found})")
    if table.empty:
        raise UnshortcutError(f"{path}: has a header but no rows")
    for column in _TEXT_COLUMNS:
        if column in table.columns:
            table[column] = table[column].str.strip()
            empty = table.loc[table[column].isna() | (table[column] == ""), "image_id"]
            if len(empty):
                where = "rows " + ", ".join(str(i + 2) for i in empty.index)
                raise UnshortcutError(f"{path}: empty {column} in {where}")
    duplicated = sorted(set(table.loc[table["image_id"].duplicated(), "image_id"]))
    if duplicated:
        raise UnshortcutError(f"{path}: duplicate image ids: {', '.join(duplicated)}")
    if "split" in table.columns:
        table["split"] = table["split"].str.lower()
        bad = sorted(set(table["split"]) - set(SPLITS))
        if bad:
            raise UnshortcutError(
                f"{path}: invalid split values: {', '.join(bad)} (use train, val or test)"
            )
        if "patient_id" in table.columns:
            _refuse_shared_patients(path, table)
    listed = set(table["image_id"])
    unknown = sorted(listed - set(image_ids))
    if unknown:
        raise UnshortcutError(f"{path}: unknown image ids: {', '.join(unknown)}")
    missing = [image_id for image_id in image_ids if image_id not in listed]
    if missing:
        raise UnshortcutError(f"{path}: no row for images: {', '.join(missing)}")
    return table.set_index("image_id").loc[list(image_ids)].reset_index()


def _refuse_shared_patients(path: Path, table: pd.DataFrame) -> None:
    """A patient in two splits leaks their staining, scanner and anatomy into evaluation."""
    splits = table.groupby("patient_id")["split"].agg(lambda s: sorted(set(s), key=SPLITS.index))
    shared = splits[splits.map(len) > 1]
    if len(shared):
        named = "; ".join(f"{patient} in {', '.join(s)}" for patient, s in shared.head(5).items())
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        raise UnshortcutError(
            f"{path}: patient(s) in more than one split: {named}{more}. Their patches would "
            "be trained and evaluated on; give each patient one split"
        )
