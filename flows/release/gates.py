"""Data-quality gates between stages, as great-expectations 1.x suites.

A gate validates a table and reports, per expectation, the image ids of the rows that
failed. Row failures quarantine those photos (fail closed: a face that fails a gate is never
published as-is); a table-level failure (e.g. an input unaccounted for) fails the run.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common.facetable import leaks
from stages.common.obfuscate import SYNTHESIZING_METHODS


@dataclass
class GateResult:
    name: str
    passed: bool
    checks: int
    failures: list[str] = field(default_factory=list)          # human-readable, one per failed expectation
    failed_image_ids: set[str] = field(default_factory=set)   # rows to quarantine
    table_failed: bool = False                                 # a failure not tied to rows
    observed: dict = field(default_factory=dict)               # measurements the gate records (not judged)
    # great-expectations' own validation results (JSON), rendered into the release's Data Docs.
    validations: list[dict] = field(default_factory=list, repr=False)

    def details(self) -> str:
        return json.dumps({"checks": self.checks, "failures": self.failures,
                           "failed_image_ids": sorted(self.failed_image_ids)[:50]}
                          | ({"observed": self.observed} if self.observed else {}))


@functools.lru_cache(maxsize=1)
def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def warm_up() -> None:
    """Start great-expectations' context (a second or two) before the first gate needs it."""
    _context()


@functools.lru_cache(maxsize=None)
def _batch_definition(asset_name: str):
    context = _context()
    source = context.data_sources.add_or_update_pandas(f"anonymousnet_{asset_name}")
    asset = source.add_dataframe_asset(asset_name)
    return asset.add_batch_definition_whole_dataframe("whole")


def validate(name: str, frame: pd.DataFrame, expectations: list, row_id: str = "image_id") -> GateResult:
    """Run ``expectations`` (GX expectation objects) on ``frame``."""
    import great_expectations as gx

    frame = frame.reset_index(drop=True)
    batch_definition = _batch_definition(name.replace(":", "_"))  # creates the context first
    suite = gx.ExpectationSuite(name=f"{name}-suite")
    for expectation in expectations:
        suite.add_expectation(expectation)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    outcome = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    result = GateResult(name=name, passed=bool(outcome.success), checks=len(outcome.results),
                        validations=[outcome.to_json_dict()])
    for item in outcome.results:
        if item.success:
            continue
        config = item.expectation_config
        column = config.kwargs.get("column") or config.kwargs.get("column_list") or ""
        indices = item.result.get("unexpected_index_list")
        if indices:
            ids = {str(frame.loc[i, row_id]) if isinstance(i, (int, np.integer)) else str(i.get(row_id))
                   for i in indices}
            result.failed_image_ids |= ids
            result.failures.append(f"{config.type}({column}): {len(ids)} photo(s) failed, e.g. {sorted(ids)[:3]}")
        else:
            result.table_failed = True
            observed = item.result.get("observed_value")
            result.failures.append(f"{config.type}({column}): observed {observed}")
    return result


def ingest_gate(photos: pd.DataFrame, faces: pd.DataFrame) -> GateResult:
    """After ingest: every photo of the batch has an outcome; boxes lie inside their photo;
    landmarks and alignment matrices are finite."""
    import great_expectations.expectations as gxe

    photo_frame = photos[["image_id", "status"]].copy()
    # A photo that could not be searched for faces (detector error) is quarantined at ingest.
    set_aside = photos["status"].isin(["rejected", "quarantined"])
    photo_frame["set_aside_has_reason"] = ~set_aside | photos["reason"].notna()
    photo_result = validate("gate:ingest:photos", photo_frame, [
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["ingested", "rejected", "quarantined"]),
        gxe.ExpectColumnValuesToBeInSet(column="set_aside_has_reason", value_set=[True]),
    ])
    if faces.empty:
        return photo_result
    sizes = photos.set_index("image_id")[["width", "height"]]
    face_frame = faces[["image_id", "face_index", "box_left", "box_top", "box_right", "box_bottom"]].join(
        sizes, on="image_id")
    face_frame["landmarks_finite"] = [bool(np.all(np.isfinite(v))) for v in faces["landmarks"]]
    face_frame["alignment_finite"] = [bool(np.all(np.isfinite(v))) and abs(np.linalg.det(
        np.asarray(v, float).reshape(2, 3)[:, :2])) > 1e-9 for v in faces["align_matrix"]]
    face_result = validate("gate:ingest:faces", face_frame, [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_id", "face_index"]),
        gxe.ExpectColumnValuesToBeBetween(column="box_left", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="box_top", min_value=0),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="box_right", column_B="box_left"),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="box_bottom", column_B="box_top"),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="width", column_B="box_right", or_equal=True),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="height", column_B="box_bottom", or_equal=True),
        gxe.ExpectColumnValuesToBeInSet(column="landmarks_finite", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="alignment_finite", value_set=[True]),
    ])
    return _merge("gate:ingest", photo_result, face_result)


def attributes_gate(faces: pd.DataFrame) -> GateResult:
    """After Stage I: every face has 40 attribute probabilities, each finite and in [0, 1]
    (NaN counts as missing; infinity falls outside the range)."""
    import great_expectations.expectations as gxe

    from stages.common.facetable import ATTRIBUTE_COLUMNS

    frame = faces.reindex(columns=["image_id", "face_index", *ATTRIBUTE_COLUMNS])
    frame[list(ATTRIBUTE_COLUMNS)] = frame[list(ATTRIBUTE_COLUMNS)].astype(float)
    expectations = []
    for column in ATTRIBUTE_COLUMNS:
        expectations += [gxe.ExpectColumnValuesToNotBeNull(column=column),
                         gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0, max_value=1)]
    return validate("gate:attributes", frame, expectations)


def ppas_gate(faces: pd.DataFrame, closeness: list[dict], preserve: list[str], epsilon: float,
              t: float) -> GateResult:
    """After Stage II: every face has 40 boolean targets; preserved attributes equal their
    prediction; no face spent more than the policy's epsilon; every judged group of
    faces sharing a released value is within t of the release's share (t-closeness). A
    failing group fails the photos of all its faces."""
    import great_expectations.expectations as gxe

    from stages.attributes.names import ATTRIBUTES
    from stages.common.facetable import ATTRIBUTE_COLUMNS

    frame = faces[["image_id", "epsilon_spent"]].copy().astype({"epsilon_spent": float})
    targets = pd.DataFrame([list(v) if v is not None and len(v) == len(ATTRIBUTES) else [None] * len(ATTRIBUTES)
                            for v in faces["target_attributes"]], columns=[f"target_{a}" for a in ATTRIBUTES])
    frame = pd.concat([frame, targets], axis=1)
    expectations = [gxe.ExpectColumnValuesToNotBeNull(column="epsilon_spent"),
                    gxe.ExpectColumnValuesToBeBetween(column="epsilon_spent", min_value=0, max_value=epsilon)]
    for name in ATTRIBUTES:
        expectations += [gxe.ExpectColumnValuesToNotBeNull(column=f"target_{name}"),
                         gxe.ExpectColumnValuesToBeInSet(column=f"target_{name}", value_set=[True, False])]
    for name in preserve:
        frame[f"predicted_{name}"] = faces[ATTRIBUTE_COLUMNS[ATTRIBUTES.index(name)]].astype(float) >= 0.5
        expectations.append(gxe.ExpectColumnPairValuesToBeEqual(column_A=f"target_{name}",
                                                                column_B=f"predicted_{name}"))
    face_result = validate("gate:ppas:faces", frame, expectations)
    groups = pd.DataFrame([{"group": f"{r['attribute']}={g['released']}", "distance": g["distance"]}
                           for r in closeness for g in r["groups"] if g["judged"]], columns=["group", "distance"])
    if groups.empty:
        return _merge("gate:ppas", face_result)
    group_result = validate("gate:ppas:t-closeness", groups, [
        gxe.ExpectColumnValuesToBeBetween(column="distance", min_value=0, max_value=t)], row_id="group")
    members = set()
    for group in group_result.failed_image_ids:   # "Attribute=value" -> the faces released with it
        attribute, value = group.rsplit("=", 1)
        released = targets[f"target_{attribute}"] == bool(int(value))
        members |= set(faces.loc[released.to_numpy(), "image_id"])
    group_result.failed_image_ids = members
    return _merge("gate:ppas", face_result, group_result)


def publish_gate(photos: pd.DataFrame, faces: pd.DataFrame, release_distance: float) -> GateResult:
    """Before publish: every photo has a final outcome with a reason when not released;
    a released photo has staged output; no face of a released photo verifies as its original."""
    import great_expectations.expectations as gxe

    photo_frame = photos[["image_id", "status"]].copy()
    released = photos["status"] == "released"
    staged = photos["staged_file"] if "staged_file" in photos else pd.Series(None, index=photos.index)
    photo_frame["released_has_output"] = ~released | staged.notna()
    photo_frame["held_has_reason"] = released | photos["reason"].notna()
    photo_result = validate("gate:publish:photos", photo_frame, [
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["released", "quarantined", "rejected"]),
        gxe.ExpectColumnValuesToBeInSet(column="released_has_output", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="held_has_reason", value_set=[True]),
    ])
    if faces.empty:
        return photo_result
    released_ids = set(photos.loc[released, "image_id"])
    distances = ["leak_distance", "leak_distance_at_box", "membership_distance", "blank_distance",
                 "sface_similarity", "sface_blank_similarity"]
    face_frame = faces[faces["image_id"].isin(released_ids)][["image_id", "face_index", *distances, "method",
                                                                "verifiable", "protected_over"]]
    if face_frame.empty:
        return photo_result
    face_frame = face_frame.assign(**{column: face_frame[column].astype(float) for column in distances})
    face_frame["verifies"] = [leaks(row, release_distance) for row in face_frame.to_dict("records")]
    # Fail closed on the second verifier too: every face the verifiers describe has SFace's measurement.
    face_frame["sface_measured"] = [not row["verifiable"] or np.isfinite(float(row["sface_similarity"]))
                                    for row in face_frame.to_dict("records")]
    face_result = validate("gate:publish:faces", face_frame, [
        *[gxe.ExpectColumnValuesToNotBeNull(column=column) for column in distances],
        gxe.ExpectColumnValuesToNotBeNull(column="verifiable"),
        # Zero leaks: no released face is within the policy's release distance (threshold +
        # safety margin) of its original, found again or at its box, nor of another original
        # face of its photo; a distance counts when it is also below the original's distance
        # to a blank chip (stages.common.facetable.leaks).
        # A face the verifier does not describe is protected over its box (leaks() checks it).
        # SFace's verdict is part of leaks(): at or above its threshold and above the blank one.
        gxe.ExpectColumnValuesToBeInSet(column="verifies", value_set=[False]),
        gxe.ExpectColumnValuesToBeInSet(column="sface_measured", value_set=[True]),
        gxe.ExpectColumnValuesToNotBeNull(column="method"),
    ])
    return _merge("gate:publish", photo_result, face_result)


def perturbation_gate(photos: pd.DataFrame, faces: pd.DataFrame, min_psnr_db: float) -> GateResult:
    """After anonymize with Stage IV on: every face of a released photo that is published as
    synthesized carries the perturbation or says why it was withdrawn (it cost identity
    protection: ``stages.common.anonymize``), and a carried one has a measured PSNR cost within the
    policy's bound (a face without a measurement fails: fail closed). Records the white-box
    fooling rate over the perturbed faces (reported, not judged: it is a property of the
    profiler) and the withdrawals."""
    import great_expectations.expectations as gxe

    released_ids = set(photos.loc[photos["status"] == "released", "image_id"])
    frame = faces[faces["image_id"].isin(released_ids) & faces["method"].isin(SYNTHESIZING_METHODS)] if not faces.empty else faces
    if frame.empty:
        return GateResult(name="gate:perturbation", passed=True, checks=0, observed={"faces_perturbed": 0})
    carried = frame["perturbed"].fillna(False).astype(bool).to_numpy()
    withdrawn = (frame["perturbation_withdrawn"] if "perturbation_withdrawn" in frame
                 else pd.Series(None, index=frame.index)).to_numpy()
    frame = pd.DataFrame({
        "image_id": frame["image_id"].to_numpy(),
        "accounted": carried | pd.Series(withdrawn).isin(["lost", "verifies"]).to_numpy(),
        # Only a carried perturbation has a cost and an effect to show.
        "perturbation_psnr_db": np.where(carried, frame["perturbation_psnr_db"].astype(float).to_numpy(), 1e9),
        "profiler_measured": ~carried | frame["profiler_fooled"].notna().to_numpy(),
    })
    result = validate("gate:perturbation", frame, [
        gxe.ExpectColumnValuesToBeInSet(column="accounted", value_set=[True]),
        gxe.ExpectColumnValuesToNotBeNull(column="perturbation_psnr_db"),
        gxe.ExpectColumnValuesToBeBetween(column="perturbation_psnr_db", min_value=min_psnr_db),
        gxe.ExpectColumnValuesToBeInSet(column="profiler_measured", value_set=[True]),
    ])
    fooled = faces.loc[faces["image_id"].isin(released_ids) & faces["method"].isin(SYNTHESIZING_METHODS), "profiler_fooled"]
    measured = fooled.dropna().astype(bool)
    costs = frame["perturbation_psnr_db"][carried]
    reasons = pd.Series(withdrawn).dropna()
    result.observed = {"faces_perturbed": int(carried.sum()), "faces_measured": int(len(measured)),
                       "faces_withdrawn": {str(k): int(v) for k, v in reasons.value_counts().items()},
                       "faces_fooled": int(measured.sum()),
                       "fooling_rate": float(measured.mean()) if len(measured) else None,
                       "median_psnr_db": float(costs.median()) if len(costs) else None,
                       "min_psnr_db": float(costs.min()) if len(costs) else None}
    return result


def accounting_gate(photos: pd.DataFrame, expected_ids: list[str]) -> GateResult:
    """End of run: every input photo is accounted for exactly once."""
    import great_expectations.expectations as gxe

    frame = photos[["image_id", "status"]].copy()
    return validate("gate:accounting", frame, [
        gxe.ExpectTableRowCountToEqual(value=len(expected_ids)),
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        gxe.ExpectColumnValuesToBeInSet(column="image_id", value_set=list(expected_ids)),
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["released", "quarantined", "rejected"]),
    ])


def _merge(name: str, *results: GateResult) -> GateResult:
    merged = GateResult(name=name, passed=all(r.passed for r in results), checks=sum(r.checks for r in results))
    for item in results:
        merged.failures += item.failures
        merged.failed_image_ids |= item.failed_image_ids
        merged.table_failed |= item.table_failed
        merged.validations += item.validations
    return merged


def build_data_docs(folder: Path, validations: list[tuple[str, str, dict]]) -> Path:
    """Render ``(run name, batch, validation result JSON)`` with great-expectations' own
    Data Docs site builder into ``folder`` (static HTML); returns its index page."""
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResultSchema,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site("release", {
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)}})
    schema = ExpectationSuiteValidationResultSchema()
    for run_name, batch, result in validations:
        loaded = schema.load(result)
        key = ValidationResultIdentifier(ExpectationSuiteIdentifier(loaded.suite_name),
                                         RunIdentifier(run_name=run_name), batch)
        context.validation_results_store.set(key, loaded)
    context.build_data_docs(site_names=["release"])
    return folder / "index.html"
