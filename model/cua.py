"""The CUA-pattern score: calcification AND thrombosis/occlusion AND NOT vasculitis.

Pathology logic: the biopsy picture that supports calciphylaxis (calcific uremic arteriolopathy) is
calcification of subcutaneous small vessels together with their thrombosis/occlusion, in the absence
of vasculitis. McMullen et al. (Am J Surg Pathol 2019) found H&E-visible small-vessel calcification
specific but only 56% sensitive, while calcium deposits plus thrombosis of subcutaneous small vessels
reached 85% sensitivity and 88% specificity. Vasculitis is the exclusion that matters in the differential.

The rule works on calibrated finding probabilities, each group reduced by its maximum:

    calcification = max p over ``rule.calcification`` labels (medial OR small-vessel)
    occlusion     = max p over ``rule.occlusion`` labels
    no_exclusion  = 1 - max p over ``rule.exclusion`` labels (1 when the group is empty)

    combine="product" (default): score = calcification * occlusion * no_exclusion
        (fuzzy AND treating the findings as independent: the probability that all three hold)
    combine="min":               score = min(calcification, occlusion, no_exclusion)
        (Gödel fuzzy AND: the weakest term bounds the score)

The score is a transparent summary for a pathologist, not a calibrated probability of calciphylaxis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calciscope.errors import CalciscopeError

COMBINES = ("product", "min")
TERMS = ("calcification", "occlusion", "no_exclusion")


@dataclass(frozen=True)
class CUARule:
    """Which findings form each term of the CUA-pattern rule, and how the terms are combined."""

    calcification: tuple[str, ...] = ("medial_calcification", "small_vessel_calcification")
    occlusion: tuple[str, ...] = ("thrombosis",)
    exclusion: tuple[str, ...] = ("vasculitis",)
    combine: str = "product"

    def __post_init__(self) -> None:
        for name in ("calcification", "occlusion", "exclusion"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise CalciscopeError(f"CUA rule: '{name}' must be a list of label names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.calcification or not self.occlusion:
            raise CalciscopeError("CUA rule: 'calcification' and 'occlusion' each need at least one label")
        if self.combine not in COMBINES:
            raise CalciscopeError(f"CUA rule: combine must be one of {list(COMBINES)}, got {self.combine!r}")

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label the rule reads."""
        return self.calcification + self.occlusion + self.exclusion

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the model card's ``cua_rule``."""
        return {"calcification": list(self.calcification), "occlusion": list(self.occlusion),
                "exclusion": list(self.exclusion), "combine": self.combine}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CUARule:
        """Inverse of ``to_dict``; an empty/None mapping gives the default rule; unknown keys are an error."""
        data = dict(data or {})
        unknown = sorted(set(data) - {"calcification", "occlusion", "exclusion", "combine"})
        if unknown:
            raise CalciscopeError(f"CUA rule: unknown key(s) {unknown}")
        return cls(**data)


def _check_labels(rule: CUARule, labels: Sequence[str]) -> None:
    missing = [label for label in rule.labels if label not in labels]
    if missing:
        raise CalciscopeError(f"CUA rule needs finding(s) {missing} that the model does not output "
                              f"(model labels: {list(labels)})")


def _term_arrays(p: np.ndarray, labels: Sequence[str], rule: CUARule) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each term: (value (N,), index into the group of the finding that drove it (N,))."""
    col = {label: i for i, label in enumerate(labels)}
    out = {}
    for term, group in (("calcification", rule.calcification), ("occlusion", rule.occlusion)):
        g = p[:, [col[label] for label in group]]
        out[term] = (g.max(axis=1), g.argmax(axis=1))
    if rule.exclusion:
        g = p[:, [col[label] for label in rule.exclusion]]
        out["no_exclusion"] = (1.0 - g.max(axis=1), g.argmax(axis=1))
    else:
        out["no_exclusion"] = (np.ones(len(p)), np.zeros(len(p), dtype=int))
    return out


def _as_matrix(probs: Mapping[str, float] | np.ndarray,
               labels: Sequence[str] | None) -> tuple[np.ndarray, list[str], bool]:
    if isinstance(probs, Mapping):
        labels = list(probs)
        p = np.asarray([[float(probs[label]) for label in labels]], dtype=np.float64)
        single = True
    else:
        if labels is None:
            raise CalciscopeError("cua_score of an array needs labels naming its columns")
        p = np.asarray(probs, dtype=np.float64)
        single = p.ndim == 1
        p = np.atleast_2d(p)
        labels = list(labels)
        if p.ndim != 2 or p.shape[1] != len(labels):
            raise CalciscopeError(f"probabilities of shape {np.shape(probs)} do not match {len(labels)} labels")
    if not np.all(np.isfinite(p)) or p.min(initial=0) < 0 or p.max(initial=0) > 1:
        raise CalciscopeError("CUA rule needs probabilities in [0, 1] (apply sigmoid and calibration first)")
    return p, labels, single


def _combine(values: list[np.ndarray], combine: str) -> np.ndarray:
    stacked = np.stack(values)
    return stacked.prod(axis=0) if combine == "product" else stacked.min(axis=0)


def cua_score(probs: Mapping[str, float] | np.ndarray, rule: CUARule | None = None,
              labels: Sequence[str] | None = None) -> float | np.ndarray:
    """CUA-pattern score from calibrated finding probabilities.

    probs: {label: p} -> float; or an array (L,) -> float / (N, L) -> (N,) with ``labels`` naming the columns.
    """
    rule = rule or CUARule()
    p, labels, single = _as_matrix(probs, labels)
    _check_labels(rule, labels)
    terms = _term_arrays(p, labels, rule)
    score = _combine([terms[t][0] for t in TERMS], rule.combine)
    return float(score[0]) if single else score


def explain(probs: Mapping[str, float], rule: CUARule | None = None) -> dict[str, Any]:
    """Each term's value and the finding that drove it, for the report.

    Returns {"score", "combine", "rule", "limiting_term", "terms": {term: {"value", "driver", "driver_prob",
    "inputs": {label: p}}}}; for "no_exclusion", value = 1 - driver_prob.
    """
    rule = rule or CUARule()
    p, labels, _ = _as_matrix(probs, None)
    _check_labels(rule, labels)
    terms = _term_arrays(p, labels, rule)
    groups = {"calcification": rule.calcification, "occlusion": rule.occlusion, "no_exclusion": rule.exclusion}
    explained = {}
    for term in TERMS:
        value, which = terms[term]
        group = groups[term]
        driver = group[int(which[0])] if group else None
        explained[term] = {
            "value": float(value[0]),
            "driver": driver,
            "driver_prob": float(probs[driver]) if driver else None,
            "inputs": {label: float(probs[label]) for label in group},
        }
    score = float(_combine([terms[t][0] for t in TERMS], rule.combine)[0])
    limiting = min(TERMS, key=lambda t: explained[t]["value"])
    return {"score": score, "combine": rule.combine, "rule": rule.to_dict(), "limiting_term": limiting,
            "terms": explained}
