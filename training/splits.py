"""Patient-level splits: train / validation (one split or k folds) and an optional frozen test split.

No patient is ever in two of train, validation and test, in any fold: every split is made with scikit-learn's
``StratifiedGroupKFold`` over patient groups. An example is a slide (or a tile, for the "tiles" source).

Stratification key (one per example): the example's label combination (``"0110"`` for a multi-label row, the
class id for a multi-class one). A combination held by fewer examples than the number of splits cannot be spread
over the splits, so it is collapsed into a coarser key: the number of positive labels (``"n2"``), then
positive / negative, then one shared ``"rest"`` key. The common combinations (all-negative, single findings)
are balanced exactly; rare ones still count toward how many findings each split holds.

A split fraction ``f`` is made as ``m`` of ``k`` stratified group folds with ``m / k`` closest to ``f``
(``k`` ≤ 10 and ≤ the number of patients; 0.2 → 1 of 5, 0.34 → 1 of 3, 0.4 → 2 of 5).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from calciscope.errors import CalciscopeError
from calciscope.training.config import SplitConfig

SPLIT_NAMES = ("train", "val", "test")
MAX_SPLITS_PER_FRACTION = 10


@dataclass(frozen=True)
class Fold:
    """One train / validation split; ``train`` and ``val`` are sorted int indices into the example list."""

    index: int
    train: np.ndarray
    val: np.ndarray


def make_splits(patient_ids: Sequence[str], y: np.ndarray, config: SplitConfig, seed: int,
                fixed: Sequence[str | None] | None = None, *,
                labels: Sequence[str] | None = None) -> tuple[np.ndarray, list[Fold]]:
    """Split examples by patient; returns ``(test_indices, folds)``, deterministic per ``seed``.

    ``y``: (N, L) 0/1 labels or (N,) class ids. ``fixed``: an optional per-example split column from the
    manifest ("train" / "val" / "test" / None); when it names any split it replaces random splitting
    (see :func:`fixed_splits`). ``labels`` only names the labels in error messages.
    """
    groups = np.asarray([str(p) for p in patient_ids])
    y = np.asarray(y)
    if len(groups) != len(y):
        raise CalciscopeError(f"split: {len(groups)} patient ids but {len(y)} label rows")
    if len(groups) == 0:
        raise CalciscopeError("split: no examples to split")
    if fixed is not None and any(_split_name(v, i) is not None for i, v in enumerate(fixed)):
        test, folds = fixed_splits(groups, y, config, seed, fixed)
    else:
        test, folds = _random_splits(groups, y, config, seed)
    _check_positives(y, folds, labels)
    return test, folds


def fixed_splits(groups: np.ndarray, y: np.ndarray, config: SplitConfig, seed: int,
                 fixed: Sequence[str | None]) -> tuple[np.ndarray, list[Fold]]:
    """Honour a manifest's split column.

    An example without a split takes its patient's. If the column names no "val" (only "test", or "train" and
    "test": the usual train/test folders), validation is carved out of the other patients at random as ``config``
    says (``split.val_fraction``, ``split.folds``; ``test_fraction`` is then ignored); otherwise every patient must
    have a split and the column gives the one fold.
    """
    if len(fixed) != len(groups):
        raise CalciscopeError(f"split column: {len(fixed)} values for {len(groups)} examples")
    names = [_split_name(v, i) for i, v in enumerate(fixed)]
    by_patient: dict[str, set[str]] = {}
    for patient, name in zip(groups, names):
        by_patient.setdefault(patient, set())
        if name is not None:
            by_patient[patient].add(name)
    mixed = {p: sorted(s, key=SPLIT_NAMES.index) for p, s in by_patient.items() if len(s) > 1}
    if mixed:
        shown = "; ".join(f"{p} in {' and '.join(s)}" for p, s in sorted(mixed.items())[:5])
        more = f" (and {len(mixed) - 5} more)" if len(mixed) > 5 else ""
        raise CalciscopeError(f"split column puts a patient's examples in two splits: {shown}{more}; "
                              "a patient's examples must all be in one split")
    patient_split = np.array([next(iter(by_patient[p]), "") for p in groups])
    used = set(patient_split) - {""}
    if "val" not in used:
        test = np.flatnonzero(patient_split == "test")
        rest = np.flatnonzero(patient_split != "test")
        if len(rest) == 0:
            raise CalciscopeError("split column puts every example in test: the train split is empty (mark some "
                                  "examples train, or leave their split empty)")
        no_test = SplitConfig(val_fraction=config.val_fraction, test_fraction=0.0, folds=config.folds)
        _, folds = _random_splits(groups[rest], y[rest], no_test, seed)
        return test, [Fold(f.index, rest[f.train], rest[f.val]) for f in folds]
    unassigned = sorted({p for p, s in by_patient.items() if not s})
    if unassigned:
        shown = ", ".join(unassigned[:5]) + (f" (and {len(unassigned) - 5} more)" if len(unassigned) > 5 else "")
        raise CalciscopeError(f"split column leaves {len(unassigned)} patient(s) without a split: {shown}; "
                              "give every patient train/val/test, or leave val out (validation is then carved from "
                              "the train patients)")
    if config.folds > 1:
        raise CalciscopeError(f"split.folds = {config.folds} cannot be used with a split column that names train "
                              "and val; remove the column's train/val values or set split.folds: 1")
    if "train" not in used:
        raise CalciscopeError("split column has no 'train' examples: the train split would be empty")
    test = np.flatnonzero(patient_split == "test")
    fold = Fold(0, np.flatnonzero(patient_split == "train"), np.flatnonzero(patient_split == "val"))
    return test, [fold]


def stratification_key(y: np.ndarray, n_splits: int) -> np.ndarray:
    """One string per example: its label combination, coarsened where fewer than ``n_splits`` examples share it."""
    y = np.asarray(y)
    if y.ndim == 1:
        coarse = [lambda row: str(int(row))]
    else:
        y = (y > 0.5).astype(np.int8)
        coarse = [lambda row: "".join(map(str, row)), lambda row: f"n{int(row.sum())}",
                  lambda row: "pos" if row.any() else "neg"]
    keys = np.array([coarse[0](row) for row in y], dtype=object)
    for make in [*coarse[1:], lambda row: "rest"]:
        counts = Counter(keys)
        rare = np.array([counts[k] < n_splits for k in keys])
        if not rare.any():
            break
        keys[rare] = [make(row) for row in y[rare]]
    return keys.astype(str)


def describe_splits(patient_ids: Sequence[str], y: np.ndarray, labels: Sequence[str] | None,
                    test: np.ndarray, folds: Sequence[Fold]) -> dict:
    """Patients, examples and positives per label in every split (JSON-serialisable, for ``splits.json``)."""
    groups = np.asarray([str(p) for p in patient_ids])
    y = np.asarray(y)
    onehot = _onehot(y)
    labels = list(labels) if labels is not None else [f"label_{j}" for j in range(onehot.shape[1])]

    def count(indices: np.ndarray) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        return {"patients": int(len(np.unique(groups[indices]))), "examples": int(len(indices)),
                "positives": {name: int(onehot[indices, j].sum()) for j, name in enumerate(labels)}}

    return {
        "patients": int(len(np.unique(groups))),
        "examples": int(len(groups)),
        "test": count(test),
        "folds": [{"index": int(f.index), "train": count(f.train), "val": count(f.val)} for f in folds],
    }


# -- helpers ---------------------------------------------------------------------------------------------------
def _random_splits(groups: np.ndarray, y: np.ndarray, config: SplitConfig, seed: int) -> tuple[np.ndarray, list[Fold]]:
    n_patients = len(np.unique(groups))
    folds_needed = max(2, config.folds)
    needed = folds_needed + (1 if config.test_fraction > 0 else 0)
    if n_patients < needed:
        what = f"{config.folds} folds" if config.folds > 1 else "a train and a validation split"
        test = " plus a test split" if config.test_fraction > 0 else ""
        raise CalciscopeError(f"split: {n_patients} patient(s) cannot make {what}{test}; at least {needed} are needed "
                              "(lower split.folds or split.test_fraction, or add patients)")
    all_indices = np.arange(len(groups))
    test = np.array([], dtype=np.int64)
    if config.test_fraction > 0:
        # leave enough patients outside test for the folds
        test, rest = _fraction_split(groups, y, config.test_fraction, seed, max_k=n_patients,
                                     max_m=n_patients - folds_needed)
        if len(test) == 0:
            raise CalciscopeError(f"split: split.test_fraction {config.test_fraction} gave an empty test split; raise it")
    else:
        rest = all_indices
    rest_groups, rest_y = groups[rest], y[rest]
    n_rest = len(np.unique(rest_groups))
    if config.folds > 1:
        if n_rest < config.folds:
            raise CalciscopeError(f"split: {n_rest} patient(s) outside the test split cannot make {config.folds} folds "
                                  "(lower split.folds)")
        folds = [Fold(i, rest[tr], rest[va]) for i, (tr, va) in
                 enumerate(_group_kfold(rest_groups, rest_y, config.folds, seed))]
    else:
        val, train = _fraction_split(rest_groups, rest_y, config.val_fraction, seed, max_k=n_rest, max_m=n_rest - 1)
        folds = [Fold(0, rest[train], rest[val])]
    for fold in folds:
        for name, part in (("train", fold.train), ("validation", fold.val)):
            if len(part) == 0:
                raise CalciscopeError(f"split: fold {fold.index} has an empty {name} split "
                                      f"({n_rest} patients, split.val_fraction {config.val_fraction}, split.folds "
                                      f"{config.folds}); change one of them")
    return np.sort(test).astype(np.int64), folds


def _fraction_split(groups, y, fraction: float, seed: int, *, max_k: int, max_m: int) -> tuple[np.ndarray, np.ndarray]:
    """(picked, rest): ``m`` of ``k`` stratified group folds, ``m / k`` closest to ``fraction``."""
    max_k = min(MAX_SPLITS_PER_FRACTION, max_k)
    candidates = [(abs(m / k - fraction), k, m) for k in range(2, max_k + 1) for m in range(1, min(k - 1, max_m) + 1)]
    if not candidates:
        n_patients = len(np.unique(groups))
        raise CalciscopeError(f"split: {n_patients} patient(s) are too few to split off a fraction {fraction} "
                              "(split.val_fraction / split.test_fraction)")
    _, k, m = min(candidates)
    parts = [val for _, val in _group_kfold(groups, y, k, seed)]
    picked = np.sort(np.concatenate(parts[:m]))
    rest = np.setdiff1d(np.arange(len(groups)), picked)
    return picked, rest


def _group_kfold(groups: np.ndarray, y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    key = stratification_key(y, k)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only n members": the key already coarsens those
        warnings.simplefilter("ignore", UserWarning)
        return [(np.sort(tr).astype(np.int64), np.sort(va).astype(np.int64))
                for tr, va in splitter.split(np.zeros(len(groups)), key, groups)]


def _check_positives(y: np.ndarray, folds: Sequence[Fold], labels: Sequence[str] | None) -> None:
    onehot = _onehot(y)
    classes = np.unique(y) if y.ndim == 1 else None
    for fold in folds:
        missing = np.flatnonzero(onehot[fold.train].sum(axis=0) == 0)
        if y.ndim == 1:  # class ids: only classes present somewhere in the data count
            missing = [j for j in missing if j in classes]
        if len(missing):
            names = ", ".join(repr(labels[j]) if labels is not None and j < len(labels)
                              else f"{'class' if y.ndim == 1 else 'label'} {j}" for j in missing)
            raise CalciscopeError(f"split: fold {fold.index} train split has no positive example of {names} "
                                  f"({len(fold.train)} training examples); add positives, lower split.folds or "
                                  "split.val_fraction, or drop the label from data.labels")


def _onehot(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 1:
        ids = y.astype(np.int64)
        out = np.zeros((len(ids), int(ids.max()) + 1 if len(ids) else 0), dtype=np.int64)
        out[np.arange(len(ids)), ids] = 1
        return out
    return (y > 0.5).astype(np.int64)


def _split_name(value, row: int) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    name = str(value).strip().lower()
    if name == "":
        return None
    if name not in SPLIT_NAMES:
        raise CalciscopeError(f"split column, example {row}: unknown split {value!r}; "
                              "use train, val or test (or leave it empty)")
    return name
