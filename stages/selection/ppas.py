r"""Stage II: PPAS, privacy-preserving attribute selection (Li & Lin 2019, AnonymousNet).

Stage I predicts 40 binary attributes per face. The policy splits them into attributes to
**preserve** (released as predicted, e.g. the expression) and attributes to **obfuscate**
(re-selected here; Stage III renders the face with the selected values). Every other
attribute is also kept as predicted. Write ``x ∈ {0,1}^k`` for a face's predicted values of
the ``k`` obfuscated attributes (probability ≥ 0.5 counts as 1) and ``y ∈ {0,1}^k`` for the
values released in its place.

**Neighbouring relation.** Selection is ε-differentially private *per face* in the local
model: for any two inputs ``x, x'`` (any values of all ``k`` obfuscated attributes, i.e.
replacing the face's whole obfuscated-attribute vector) and every output ``y``,
``P(y | x) ≤ e^ε · P(y | x')``. Whatever an observer knows in advance, seeing ``y`` multiplies
the odds between any two hypotheses about ``x`` by at most ``e^ε``. Preserved and other
attributes are released as predicted and are not covered. Two mechanisms from diffprivlib:

* ``exponential`` (default): the exponential mechanism (McSherry & Talwar) over the
  combinations ``c`` of the obfuscated attributes that are **plausible** in CelebA (seen at
  least ``PLAUSIBLE_MIN_COUNT`` times among its 202,599 annotated faces), with the population
  frequency ``w(c)`` as base measure and utility ``u(x, c) = -d_H(x, c)`` (Hamming distance)::

      P(c | x) = w(c) · exp(-ε · d_H(x, c) / (2k)) / Σ_c' w(c') · exp(-ε · d_H(x, c') / (2k))

  Replacing ``x`` changes ``u`` by at most ``Δ = k``, so each factor of the ratio is bounded
  by ``e^{ε/2}`` and the mechanism is ε-DP for the relation above. The released combination
  is always one that real faces have (no bald person with bangs and blond hair), which is
  what a generator can render naturally. Limited to ``EXPONENTIAL_MAX_ATTRIBUTES``.
* ``randomised_response``: ``diffprivlib.mechanisms.Binary`` on each obfuscated attribute
  with ``ε/k`` (sequential composition gives ε per face): the value is kept with probability
  ``q = e^{ε/k} / (1 + e^{ε/k})`` and flipped otherwise. It scales to any ``k`` but ignores
  which combinations are plausible.

**t-closeness** (Li, Li & Venkatasubramanian 2007). For each obfuscated attribute ``a``, the
faces sharing a released value ``y_a = v`` form a group; the distribution of their original
values must be within ``t`` of the reference distribution. For one binary attribute the earth
mover's distance is ``|p_group − p_ref|``.

* *Closed form* (checked before any image is touched): with the CelebA population ``π`` over
  combinations as the prior, ``P(x_a = 1 | y_a = v) = Σ_{x_a=1, c_a=v} π(x) P(c|x) /
  Σ_{c_a=v} P(c | x) π(x)``, compared with the population prevalence ``π_a``. For randomised
  response this is ``π_a q / (π_a q + (1 − π_a)(1 − q))`` for ``v = 1`` and
  ``π_a (1 − q) / (π_a (1 − q) + (1 − π_a) q)`` for ``v = 0``. A policy whose closed form
  exceeds ``t`` is refused, naming the attribute and the largest ε (found by bisection) and
  the smallest t that would work.
* *Measured* on the release batch (the gate after this stage): the group's share of
  originally-positive faces against the batch's own share (the table distribution of the
  classical definition). Groups smaller than the policy's ``min_group_faces`` are reported
  but not judged: their share is dominated by sampling noise (standard error ≈ 0.5/√n) and
  the closed form is what protects them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.attributes.names import ATTRIBUTES

PLAUSIBLE_MIN_COUNT = 20         # of 202,599 CelebA faces (0.01%): rarer combinations are not drawn
EXPONENTIAL_MAX_ATTRIBUTES = 10  # the closed form enumerates up to 2^k × 2^k combinations
MECHANISMS = ("exponential", "randomised_response")


class PolicyInfeasible(ValueError):
    """The policy's t cannot be met with its ε on the population; ``violations`` lists, per
    attribute, the closed-form distance, the largest ε and the smallest t that would work."""

    def __init__(self, violations: list[dict], t: float, epsilon: float):
        self.violations = violations
        lines = [f"'{v['attribute']}': released groups would differ from the population by up to "
                 f"{v['distance']:.3f} > t = {t}" for v in violations]
        epsilon_ok = min(v["max_epsilon"] for v in violations)
        t_ok = max(v["min_t"] for v in violations)
        super().__init__("; ".join(lines) + f". With epsilon = {epsilon} use t >= {t_ok:.2f}, or keep t and "
                         f"lower epsilon to {epsilon_ok:.3g} or less")


@dataclass(frozen=True)
class Population:
    """CelebA's attribute statistics shipped with the Stage I model."""

    prevalence: np.ndarray  # (40,)
    codes: np.ndarray       # (m,) uint64: bit i = ATTRIBUTES[i]
    counts: np.ndarray      # (m,) how many CelebA faces have each combination

    def combinations(self, indices: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The observed combinations of the attributes at ``indices`` (rows of bools) and
        their counts, aggregated over the other attributes."""
        bits = ((self.codes[:, None] >> np.array(indices, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(bool)
        packed = bits.astype(np.int64) @ (1 << np.arange(len(indices), dtype=np.int64))
        unique, inverse = np.unique(packed, return_inverse=True)
        counts = np.bincount(inverse, weights=self.counts.astype(np.float64))
        combos = ((unique[:, None] >> np.arange(len(indices))[None, :]) & 1).astype(bool)
        return combos, counts


def attribute_indices(names: list[str] | tuple[str, ...]) -> tuple[int, ...]:
    return tuple(ATTRIBUTES.index(name) for name in names)


def _hamming(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n, m) Hamming distances between the rows of x (n, k) and c (m, k)."""
    return (x[:, None, :] != c[None, :, :]).sum(axis=2)


@dataclass(frozen=True)
class Selection:
    """A configured PPAS mechanism for one policy."""

    mechanism: str
    epsilon: float
    attributes: tuple[str, ...]    # obfuscated, in policy order
    candidates: np.ndarray         # (m, k) plausible combinations (exponential)
    measure: np.ndarray            # (m,) their population shares (exponential)
    prior: np.ndarray              # (p, k) all observed combinations (closed form)
    prior_weights: np.ndarray      # (p,) their population shares
    prevalence: np.ndarray         # (k,) population prevalence of each obfuscated attribute

    @property
    def k(self) -> int:
        return len(self.attributes)

    @property
    def epsilon_per_face(self) -> float:
        return self.epsilon if self.k else 0.0

    @property
    def keep_probability(self) -> float:
        """Randomised response: probability that one attribute keeps its value."""
        share = self.epsilon / self.k
        return float(np.exp(share) / (1 + np.exp(share)))

    def output_probabilities(self, x: np.ndarray) -> np.ndarray:
        """Exponential mechanism: P(candidate | x) for each row of x, shape (n, m)."""
        scores = -self.epsilon * _hamming(x, self.candidates) / (2 * self.k)
        weights = self.measure[None, :] * np.exp(scores - scores.max(axis=1, keepdims=True))
        return weights / weights.sum(axis=1, keepdims=True)

    def select(self, x: np.ndarray, random_state=None) -> np.ndarray:
        """Released values (n, k) for predicted values x (n, k), drawn with diffprivlib.
        ``random_state=None`` uses the operating system's secure generator (secrets)."""
        from diffprivlib.mechanisms import Binary, Exponential
        from sklearn.utils import check_random_state

        x = np.asarray(x, dtype=bool)
        if self.k == 0:
            return x.copy()
        rng = None if random_state is None else check_random_state(random_state)
        out = np.empty_like(x)
        if self.mechanism == "randomised_response":
            flips = Binary(epsilon=self.epsilon / self.k, value0="0", value1="1", random_state=rng)
            for i, j in np.ndindex(x.shape):
                out[i, j] = flips.randomise("1" if x[i, j] else "0") == "1"
            return out
        measure = self.measure.tolist()
        rows, inverse = np.unique(x, axis=0, return_inverse=True)
        for r, row in enumerate(rows):
            utility = (-_hamming(row[None, :], self.candidates)[0]).astype(float).tolist()
            chooser = Exponential(epsilon=self.epsilon, sensitivity=self.k, utility=utility, measure=measure,
                                  random_state=rng)
            for i in np.flatnonzero(inverse.ravel() == r):
                out[i] = self.candidates[chooser.randomise()]
        return out

    def joint(self) -> np.ndarray:
        """Exponential: P(x, c) under the population prior, shape (p, m)."""
        return self.prior_weights[:, None] * self.output_probabilities(self.prior)

    def closed_form_distances(self) -> np.ndarray:
        """Per obfuscated attribute: the largest |P(x_a = 1 | y_a = v) − π_a| over v."""
        if self.k == 0:
            return np.zeros(0)
        prevalence = self.prevalence
        if self.mechanism == "randomised_response":
            q = self.keep_probability
            released_one = prevalence * q + (1 - prevalence) * (1 - q)
            positive_given_one = prevalence * q / released_one
            positive_given_zero = prevalence * (1 - q) / (1 - released_one)
        else:
            joint = self.joint()
            released_one = joint @ self.candidates.astype(float)               # (p, k): P(x, y_a = 1)
            p_one = released_one.sum(axis=0)
            both = (released_one * self.prior).sum(axis=0)                     # P(x_a = 1, y_a = 1)
            prevalence = (self.prior_weights[:, None] * self.prior).sum(axis=0)
            positive_given_one = np.divide(both, p_one, out=prevalence.copy(), where=p_one > 0)
            positive_given_zero = np.divide(prevalence - both, 1 - p_one, out=prevalence.copy(), where=p_one < 1)
        return np.maximum(np.abs(positive_given_one - prevalence), np.abs(positive_given_zero - prevalence))

    def expected_changes(self) -> float:
        """Expected number of obfuscated attributes whose released value differs from the
        predicted one, for a face drawn from the population."""
        if self.k == 0:
            return 0.0
        if self.mechanism == "randomised_response":
            return self.k * (1 - self.keep_probability)
        return float((self.joint() * _hamming(self.prior, self.candidates)).sum())

    def with_epsilon(self, epsilon: float) -> Selection:
        return Selection(self.mechanism, epsilon, self.attributes, self.candidates, self.measure, self.prior,
                         self.prior_weights, self.prevalence)


def build_selection(population: Population, obfuscate: list[str] | tuple[str, ...], epsilon: float,
                    mechanism: str = "exponential") -> Selection:
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r}; use one of {MECHANISMS}")
    indices = attribute_indices(obfuscate)
    if mechanism == "exponential" and len(indices) > EXPONENTIAL_MAX_ATTRIBUTES:
        raise ValueError(f"the exponential mechanism takes at most {EXPONENTIAL_MAX_ATTRIBUTES} obfuscated "
                         f"attributes (got {len(indices)}); use randomised_response for more")
    prior, counts = population.combinations(indices)
    weights = counts / counts.sum()
    plausible = counts >= PLAUSIBLE_MIN_COUNT
    candidates, measure = prior[plausible], counts[plausible] / counts[plausible].sum()
    return Selection(mechanism, float(epsilon), tuple(obfuscate), candidates, measure, prior, weights,
                     population.prevalence[list(indices)] if indices else np.zeros(0))


def check_t_closeness(selection: Selection, t: float) -> list[dict]:
    """Closed-form check of t for every obfuscated attribute; returns the violations (empty
    when the policy is feasible), each with the largest ε and smallest t that would work."""
    distances = selection.closed_form_distances()
    violations = []
    for name, distance, position in zip(selection.attributes, distances, range(selection.k)):
        if distance <= t:
            continue
        low, high = 0.0, selection.epsilon
        for _ in range(40):  # the distance grows with ε: bisect for the largest ε that meets t
            middle = (low + high) / 2
            if selection.with_epsilon(middle).closed_form_distances()[position] <= t:
                low = middle
            else:
                high = middle
        violations.append({"attribute": name, "distance": float(distance), "max_epsilon": low,
                           "min_t": float(np.ceil(distance * 100) / 100)})
    return violations


def require_feasible(selection: Selection, t: float) -> None:
    violations = check_t_closeness(selection, t)
    if violations:
        raise PolicyInfeasible(violations, t, selection.epsilon)


def binarize(probabilities: np.ndarray) -> np.ndarray:
    return np.asarray(probabilities) >= 0.5


def measured_t_closeness(original: np.ndarray, released: np.ndarray, attributes: tuple[str, ...],
                         min_group_faces: int) -> list[dict]:
    """Per obfuscated attribute, on a release batch: each released-value group's share of
    originally-positive faces against the batch's share, |p_group − p_batch|; ``distance``
    is the largest over groups with at least ``min_group_faces`` faces (None when none is)."""
    original, released = np.asarray(original, dtype=bool), np.asarray(released, dtype=bool)
    results = []
    for j, name in enumerate(attributes):
        batch = float(original[:, j].mean()) if len(original) else float("nan")
        groups, judged = [], []
        for value in (False, True):
            members = released[:, j] == value
            if not members.any():
                continue
            share = float(original[members, j].mean())
            judged_here = int(members.sum()) >= min_group_faces
            groups.append({"released": int(value), "faces": int(members.sum()), "original_share": share,
                           "distance": abs(share - batch), "judged": judged_here})
            if judged_here:
                judged.append(abs(share - batch))
        results.append({"attribute": name, "batch_share": batch, "groups": groups,
                        "distance": max(judged) if judged else None})
    return results


def _predicted(face_rows: list[dict]) -> np.ndarray:
    from stages.common.facetable import ATTRIBUTE_COLUMNS

    return binarize(np.array([[row[c] for c in ATTRIBUTE_COLUMNS] for row in face_rows], dtype=np.float64))


def select_face_rows(face_rows: list[dict], selection: Selection, random_state=None) -> list[dict]:
    """Stage II on the face table: ``target_attributes`` (40 booleans), ``changed_attributes``
    and ``epsilon_spent`` for every face that has Stage I predictions."""
    if not face_rows:
        return face_rows
    predicted = _predicted(face_rows)
    indices = list(attribute_indices(selection.attributes))
    targets = predicted.copy()
    if indices:
        targets[:, indices] = selection.select(predicted[:, indices], random_state)
    rows = []
    for row, before, after in zip(face_rows, predicted, targets):
        changed = [ATTRIBUTES[i] for i in indices if before[i] != after[i]]
        rows.append(row | {"target_attributes": after.tolist(), "changed_attributes": changed,
                           "epsilon_spent": selection.epsilon_per_face})
    return rows


def t_closeness_of_rows(face_rows: list[dict], selection: Selection, min_group_faces: int) -> list[dict]:
    """Measured t-closeness (see :func:`measured_t_closeness`) of a release's face rows."""
    indices = list(attribute_indices(selection.attributes))
    if not face_rows or not indices:
        return []
    original = _predicted(face_rows)[:, indices]
    released = np.array([row["target_attributes"] for row in face_rows], dtype=bool)[:, indices]
    return measured_t_closeness(original, released, selection.attributes, min_group_faces)


def stage_two_targets(crops: np.ndarray, selection: Selection) -> np.ndarray:
    """The release's Stage I -> Stage II on aligned crops: N×40 target attributes drawn by
    the policy's mechanism from the predicted ones."""
    from stages.attributes.predict import (
        default_model as attribute_model,  # Stage I loads torch: only when asked
    )
    from stages.common.facetable import ATTRIBUTE_COLUMNS

    rows = [dict(zip(ATTRIBUTE_COLUMNS, map(float, p))) for p in attribute_model().predict(crops)]
    return np.array([row["target_attributes"] for row in select_face_rows(rows, selection)])
