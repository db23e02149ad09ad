"""Patient-level splits: no patient in two splits, k-fold coverage, fractions, determinism, fixed split columns."""

import json

import numpy as np
import pytest

from calciscope.errors import CalciscopeError
from calciscope.training.config import SplitConfig
from calciscope.training.splits import describe_splits, make_splits, stratification_key

LABELS = ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]


def cohort(n_patients: int = 80, seed: int = 0, prevalence=(0.4, 0.3, 0.25, 0.15)):
    """Patients with 1–3 examples each and multi-label y (examples of a patient share some findings)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, n_patients)
    patients = np.repeat([f"P{i:04d}" for i in range(n_patients)], counts)
    patient_y = rng.random((n_patients, len(prevalence))) < np.array(prevalence)
    y = np.repeat(patient_y, counts, axis=0) & (rng.random((len(patients), len(prevalence))) < 0.8)
    return list(patients), y.astype(np.float32)


def patients_of(patients, indices):
    return {patients[i] for i in indices}


@pytest.mark.parametrize("config", [SplitConfig(val_fraction=0.2), SplitConfig(val_fraction=0.25, test_fraction=0.15),
                                    SplitConfig(test_fraction=0.2, folds=5)])
def test_no_patient_is_in_two_splits_in_any_fold(config):
    patients, y = cohort()
    test, folds = make_splits(patients, y, config, seed=1)
    assert len(folds) == config.folds
    for fold in folds:
        train, val, held = (patients_of(patients, part) for part in (fold.train, fold.val, test))
        assert not train & val and not train & held and not val & held
        assert len(fold.train) + len(fold.val) + len(test) == len(patients)


def test_k_fold_puts_every_non_test_example_in_exactly_one_validation_fold():
    patients, y = cohort()
    test, folds = make_splits(patients, y, SplitConfig(test_fraction=0.15, folds=4), seed=2)
    counts = np.zeros(len(patients), int)
    for fold in folds:
        counts[fold.val] += 1
        assert len(np.intersect1d(fold.train, fold.val)) == 0
    assert np.all(counts[test] == 0)
    assert np.all(np.delete(counts, test) == 1)


def test_split_sizes_are_near_the_asked_fractions():
    patients, y = cohort(n_patients=200)
    n = len(patients)
    test, (fold,) = make_splits(patients, y, SplitConfig(val_fraction=0.25, test_fraction=0.15), seed=3)
    assert abs(len(test) / n - 1 / 7) < 0.03  # 0.15 is made as 1 of 7 folds
    assert abs(len(fold.val) / (n - len(test)) - 0.25) < 0.03
    _, (fold,) = make_splits(patients, y, SplitConfig(val_fraction=0.4), seed=3)
    assert abs(len(fold.val) / n - 0.4) < 0.03  # 2 of 5 folds


def test_validation_folds_keep_each_labels_prevalence():
    patients, y = cohort(n_patients=200)
    _, folds = make_splits(patients, y, SplitConfig(folds=5), seed=4)
    overall = y.mean(axis=0)
    for fold in folds:
        assert np.all(np.abs(y[fold.val].mean(axis=0) - overall) < 0.06), fold.index


def test_same_seed_same_split_and_different_seed_different_split():
    patients, y = cohort()
    config = SplitConfig(val_fraction=0.2, test_fraction=0.1)
    test_a, (fold_a,) = make_splits(patients, y, config, seed=7)
    test_b, (fold_b,) = make_splits(patients, y, config, seed=7)
    test_c, (fold_c,) = make_splits(patients, y, config, seed=8)
    assert np.array_equal(test_a, test_b) and np.array_equal(fold_a.val, fold_b.val)
    assert not np.array_equal(fold_a.val, fold_c.val)


def test_multiclass_ids_are_split_by_patient_too():
    rng = np.random.default_rng(5)
    patients = [f"P{i // 2}" for i in range(120)]
    y = rng.integers(0, 3, 120)
    test, (fold,) = make_splits(patients, y, SplitConfig(val_fraction=0.2, test_fraction=0.2), seed=0)
    assert not patients_of(patients, fold.train) & patients_of(patients, fold.val)
    assert set(y[fold.train]) == {0, 1, 2}


def test_rare_label_combinations_get_a_coarser_stratification_key():
    y = np.array([[0, 0]] * 6 + [[1, 0]] * 5 + [[1, 1]] * 2 + [[0, 1]] * 1)
    keys = stratification_key(y, n_splits=5)
    assert list(keys[:11]) == ["00"] * 6 + ["10"] * 5
    assert set(keys[11:]) == {"rest"}  # "11" (2) and "01" (1) are rare; "n2"/"n1"/"pos" would still be rare


def test_fixed_split_column_is_honoured_and_blank_rows_follow_their_patient():
    patients = ["A", "A", "B", "C", "C", "D"]
    y = np.eye(2)[[0, 1, 0, 1, 0, 1]]
    fixed = ["train", None, "val", "train", "train", "test"]
    test, (fold,) = make_splits(patients, y, SplitConfig(), seed=0, fixed=fixed)
    assert fold.train.tolist() == [0, 1, 3, 4] and fold.val.tolist() == [2] and test.tolist() == [5]


def test_fixed_split_with_only_test_marked_splits_the_rest_at_random():
    patients, y = cohort(n_patients=40)
    fixed = ["test" if p in {"P0000", "P0001", "P0002"} else None for p in patients]
    test, folds = make_splits(patients, y, SplitConfig(folds=3), seed=0, fixed=fixed)
    assert patients_of(patients, test) == {"P0000", "P0001", "P0002"} and len(folds) == 3
    assert all(not patients_of(patients, f.val) & patients_of(patients, test) for f in folds)


def test_fixed_split_that_puts_a_patient_in_two_splits_names_the_patient():
    patients = ["P1", "P1", "P2", "P3"]
    with pytest.raises(CalciscopeError, match="P1 in train and val"):
        make_splits(patients, np.eye(2)[[0, 1, 0, 1]], SplitConfig(), seed=0, fixed=["train", "val", "train", "val"])


def test_unknown_split_name_is_refused():
    with pytest.raises(CalciscopeError, match="unknown split 'holdout'"):
        make_splits(["a", "b"], np.eye(2), SplitConfig(), seed=0, fixed=["train", "holdout"])


def test_a_train_and_test_split_column_carves_validation_from_the_train_patients():
    patients, y = cohort(n_patients=40)
    test_patients = {"P0000", "P0001", "P0002", "P0003"}
    fixed = ["test" if p in test_patients else "train" for p in patients]
    test, (fold,) = make_splits(patients, y, SplitConfig(val_fraction=0.25), seed=0, fixed=fixed)
    assert patients_of(patients, test) == test_patients
    train, val = patients_of(patients, fold.train), patients_of(patients, fold.val)
    assert val and not train & val and not (train | val) & test_patients
    assert abs(len(val) / 36 - 0.25) < 0.05


def test_a_split_column_without_train_examples_is_refused():
    with pytest.raises(CalciscopeError, match="no 'train' examples"):
        make_splits(["a", "b", "c"], np.eye(3)[:, :2], SplitConfig(), seed=0, fixed=["val", "val", "test"])


def test_too_few_patients_for_the_folds_is_refused():
    with pytest.raises(CalciscopeError, match="3 patient\\(s\\) cannot make 5 folds"):
        make_splits(["a", "a", "b", "c"], np.eye(2)[[0, 1, 0, 1]], SplitConfig(folds=5), seed=0)
    with pytest.raises(CalciscopeError, match="at least 3 are needed"):
        make_splits(["a", "b"], np.eye(2), SplitConfig(test_fraction=0.2), seed=0)


def test_a_label_without_positives_in_a_training_split_is_named():
    patients, y = cohort(n_patients=30)
    y[:, 3] = 0
    y[[i for i, p in enumerate(patients) if p == "P0007"], 3] = 1  # vasculitis: one patient only
    with pytest.raises(CalciscopeError, match="fold \\d train split has no positive example of 'vasculitis'"):
        make_splits(patients, y, SplitConfig(folds=3), seed=0, labels=LABELS)


def test_describe_splits_counts_patients_examples_and_positives_as_json():
    patients = ["A", "A", "B", "C", "D"]
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1], [1, 0]], np.float32)
    test, folds = make_splits(patients, y, SplitConfig(), seed=0, fixed=["train", "train", "val", "train", "test"])
    summary = json.loads(json.dumps(describe_splits(patients, y, ["a", "b"], test, folds)))
    assert summary["folds"][0]["train"] == {"patients": 2, "examples": 3, "positives": {"a": 2, "b": 2}}
    assert summary["folds"][0]["val"] == {"patients": 1, "examples": 1, "positives": {"a": 0, "b": 0}}
    assert summary["test"] == {"patients": 1, "examples": 1, "positives": {"a": 1, "b": 0}}
