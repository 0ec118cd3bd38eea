"""Who may start which release: the checks a run passes before it reads a photo.

A release started from a deployment (the nightly schedule, the UI's *Run*, the REST API)
takes its parameters from whoever can reach the Prefect API. So such a run is admitted only
when, on the worker that runs it:

- its policy's sha256 is in the operator's approved list (``ANONYMOUSNET_APPROVED_POLICIES``:
  a folder of approved policies or a file of digests, see ``policy/approvals.py``);
- its input (folder or manifest, and ``manifest_root``) lies under one of
  ``ANONYMOUSNET_INPUT_ROOTS``, and its release folder and privacy ledger under one of
  ``ANONYMOUSNET_RELEASE_ROOTS`` (``os.pathsep``-separated, like ``PATH``; symbolic links are
  resolved first). Every photo of an admitted input is then inside the roots too: discovery
  refuses files that resolve outside the input folder;
- it keeps the deployment's ``dataset`` and ``ledger`` (they decide whose privacy budget
  the release spends: another name would start a fresh budget);
- it does not change the worker's ``ANONYMOUSNET_*`` or ``PREFECT_*`` settings through the
  run's job variables.

A deployment run on a worker where these settings are missing is refused, with what to set.
A manual ``anonymousnet release`` keeps working without them; where they are set, it is
held to them too. A refused run ends Failed in Prefect with the reasons (:class:`Refused`).
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from policy.approvals import APPROVED_POLICIES_ENV, ApprovalError, ApprovedPolicies
from policy.loader import LoadedPolicy
from stages.common.ingest import is_inside

INPUT_ROOTS_ENV = "ANONYMOUSNET_INPUT_ROOTS"
RELEASE_ROOTS_ENV = "ANONYMOUSNET_RELEASE_ROOTS"
# Parameters that decide whose privacy budget a release spends: fixed by the deployment.
BUDGET_PARAMETERS = ("dataset", "ledger")
PROTECTED_ENV_PREFIXES = ("ANONYMOUSNET_", "PREFECT_")
# The release folder's own records (lineage, reports, Data Docs).
RECORD_FOLDERS = ("_lineage", "_reports", "_data_docs")


class Refused(RuntimeError):
    """The run may not start; ``reasons`` say why and what to do. ``release_dir_allowed``
    tells whether the refusal may be recorded in the release folder's lineage."""

    def __init__(self, reasons: list[str], release_dir_allowed: bool):
        self.reasons, self.release_dir_allowed = reasons, release_dir_allowed
        super().__init__("release refused before reading any photo: " + "; ".join(reasons))


@dataclass(frozen=True)
class Confinement:
    """The worker's settings: the approved list and the roots (None: not configured)."""
    approved: ApprovedPolicies | None = None
    input_roots: tuple[Path, ...] | None = None
    release_roots: tuple[Path, ...] | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Confinement":
        def roots(name: str) -> tuple[Path, ...] | None:
            parts = [part for part in environ.get(name, "").split(os.pathsep) if part.strip()]
            return tuple(Path(part).expanduser().resolve() for part in parts) or None

        approved = environ.get(APPROVED_POLICIES_ENV, "").strip()
        return cls(ApprovedPolicies(Path(approved).expanduser().resolve()) if approved else None,
                   roots(INPUT_ROOTS_ENV), roots(RELEASE_ROOTS_ENV))


@dataclass(frozen=True)
class RunOrigin:
    """Who started this run and with what: recorded in lineage and the report."""
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    deployment_id: str | None = None
    deployment_name: str | None = None
    trigger: str = "direct call"     # schedule | deployment run (UI, API or CLI) | direct call
    parameters: dict = field(default_factory=dict)
    deployment_parameters: dict = field(default_factory=dict)
    job_variables: dict = field(default_factory=dict)

    @property
    def from_deployment(self) -> bool:
        return self.deployment_id is not None

    def overridden(self) -> list[str]:
        """Parameters this run was given that differ from its deployment's."""
        if not self.from_deployment:
            return []
        names = set(self.parameters) | set(self.deployment_parameters)
        return sorted(name for name in names if self.parameters.get(name) != self.deployment_parameters.get(name))

    def lineage_fields(self) -> dict[str, Any]:
        return {"flow_run_id": self.flow_run_id, "flow_run_name": self.flow_run_name,
                "deployment_id": self.deployment_id, "deployment_name": self.deployment_name,
                "trigger": self.trigger, "parameters": json.dumps(self.parameters, sort_keys=True, default=str),
                "parameters_overridden": self.overridden(),
                "job_variables": json.dumps(self.job_variables, sort_keys=True, default=str)
                if self.job_variables else None}


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(is_inside(root, path) for root in roots)


def _roots_text(roots: tuple[Path, ...]) -> str:
    return os.pathsep.join(str(root) for root in roots)


def admit(loaded: LoadedPolicy, input_location: str, output: str, ledger: str | None, manifest_root: str | None,
          origin: RunOrigin, confinement: Confinement) -> None:
    """Raise :class:`Refused` with every reason this run may not start (nothing is read
    but the policy file and the approved list)."""
    reasons, release_dir_allowed = [], True
    deployment = origin.from_deployment
    if deployment:
        missing = [name for name, value in ((APPROVED_POLICIES_ENV, confinement.approved),
                                            (INPUT_ROOTS_ENV, confinement.input_roots),
                                            (RELEASE_ROOTS_ENV, confinement.release_roots)) if value is None]
        if missing:
            reasons.append(f"a release started from a deployment needs {', '.join(missing)} set on the worker "
                           "(README: Operations); none of its photos were read")
            release_dir_allowed = confinement.release_roots is not None
    reasons += _policy_reasons(loaded, confinement)
    if confinement.input_roots is not None:
        for name, location in (("input", input_location), ("manifest_root", manifest_root)):
            if location and not _inside(Path(location).expanduser().resolve(), confinement.input_roots):
                reasons.append(f"{name} {location} is outside the input roots {_roots_text(confinement.input_roots)} "
                               f"({INPUT_ROOTS_ENV})")
    if confinement.release_roots is not None:
        for name, location in (("output", output), ("ledger", ledger)):
            folder = Path(location).expanduser().resolve() if location else None
            if folder is None:
                continue
            if not _inside(folder, confinement.release_roots):
                reasons.append(f"{name} {location} is outside the release roots "
                               f"{_roots_text(confinement.release_roots)} ({RELEASE_ROOTS_ENV})")
                release_dir_allowed = release_dir_allowed and name != "output"
                continue
            for record in RECORD_FOLDERS:   # a planted link would carry the records out of the roots
                if not _inside((folder / record).resolve(), confinement.release_roots):
                    reasons.append(f"{folder / record} is a link that leads outside the release roots")
                    release_dir_allowed = release_dir_allowed and name != "output"
    if deployment:
        reasons += _deployment_reasons(origin)
    if reasons:
        raise Refused(reasons, release_dir_allowed)


def escapes_release_roots(target: Path, confinement: Confinement) -> bool:
    """Whether writing ``target`` would land outside the release roots: a folder on its way
    may be a symbolic link planted in the release folder (a file link itself is replaced,
    not followed, by an atomic write). False where no roots are configured."""
    if confinement.release_roots is None:
        return False
    return not _inside(target.parent.resolve(), confinement.release_roots)


def _policy_reasons(loaded: LoadedPolicy, confinement: Confinement) -> list[str]:
    if confinement.approved is None:
        return []
    try:
        approved = confinement.approved.is_approved(loaded.sha256)
    except (ApprovalError, OSError) as exc:
        return [f"the approved-policies list cannot be read: {exc}"]
    if approved:
        return []
    return [f"policy '{loaded.policy.name}' ({loaded.path}, sha256 {loaded.sha256[:12]}) is not approved; "
            f"a compliance officer approves it after review with `anonymousnet policy approve {loaded.path} "
            f"--approved {confinement.approved.location}`"]


def _deployment_reasons(origin: RunOrigin) -> list[str]:
    reasons = []
    for name in BUDGET_PARAMETERS:
        if name in origin.overridden():
            reasons.append(f"parameter '{name}' was changed from the deployment's "
                           f"({origin.deployment_parameters.get(name)!r} -> {origin.parameters.get(name)!r}): it "
                           "decides whose privacy budget the release spends, so only the deployment sets it")
    env = (origin.job_variables or {}).get("env") or {}
    protected = sorted(name for name in env if str(name).startswith(PROTECTED_ENV_PREFIXES))
    if protected:
        reasons.append(f"the run's job variables change the worker's settings {', '.join(protected)}; "
                       "set them on the worker instead")
    return reasons


def current_origin() -> RunOrigin:
    """This flow run's origin from Prefect: its deployment (and that deployment's
    parameters), whether the scheduler created it, its parameters and job variables."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return RunOrigin()
    run = context.flow_run
    # Both sides with the flow's defaults filled in, so a parameter left out equals its default.
    defaults = {name: parameter.default for name, parameter in inspect.signature(context.flow.fn).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    parameters = _plain(defaults | dict(context.parameters or {}))
    base = dict(flow_run_id=str(run.id), flow_run_name=run.name, parameters=parameters,
                job_variables=_plain(run.job_variables or {}))
    if run.deployment_id is None:
        return RunOrigin(**base)
    # A deployment run's admission depends on its deployment: an error here fails the run.
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(run.deployment_id)
    trigger = "schedule" if run.auto_scheduled else "deployment run (UI, API or CLI)"
    return RunOrigin(**base, deployment_id=str(run.deployment_id), deployment_name=deployment.name,
                     trigger=trigger, deployment_parameters=_plain(defaults | dict(deployment.parameters or {})))


def _plain(value: dict) -> dict:
    """JSON-safe copy (parameters may hold paths)."""
    return json.loads(json.dumps(value, default=str))
