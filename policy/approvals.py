"""The operator's list of approved policies: which policy files a release started from a
deployment may run, by the sha256 of their bytes.

Two forms, named by ``ANONYMOUSNET_APPROVED_POLICIES``:

- a **folder** of approved policy files (what ``anonymousnet policy approve`` keeps). A file
  is approved by its content, so renaming or copying changes nothing; the folder's
  ``approvals.log`` records who approved which version when (JSON lines).
- a **file of digests** in ``sha256sum`` format (``<64 hex>  <path>`` per line, ``#``
  comments), for operators who keep the policies elsewhere.

Plain Python: the CLI (``flows/cli.py``) and the release's admission
(``flows/release/admission.py``) use it.
"""
from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from policy.loader import LoadedPolicy, PolicyError, load_policy

APPROVED_POLICIES_ENV = "ANONYMOUSNET_APPROVED_POLICIES"
APPROVAL_LOG = "approvals.log"
POLICY_SUFFIXES = (".yaml", ".yml")
_DIGEST = re.compile(r"^([0-9a-fA-F]{64})\s")


class ApprovalError(ValueError):
    """The approved list cannot be read or written; the message says what to fix."""


@dataclass(frozen=True)
class ApprovedPolicies:
    """An approved list at ``location`` (a folder or a file of digests)."""
    location: Path

    @property
    def is_folder(self) -> bool:
        return self.location.is_dir() or (not self.location.exists() and self.location.suffix == "")

    def digests(self) -> set[str]:
        """The sha256 of every approved policy. Raises :class:`ApprovalError` when the list
        does not exist: a missing list approves nothing, and the caller must say so."""
        if self.location.is_dir():
            return {hashlib.sha256(path.read_bytes()).hexdigest() for path in self._policy_files()}
        if self.location.is_file():
            return {match.group(1).lower() for line in self.location.read_text().splitlines()
                    if (match := _DIGEST.match(line.strip() + " "))}
        raise ApprovalError(f"the approved-policies list {self.location} does not exist; create it with "
                            f"`anonymousnet policy approve POLICY --approved {self.location}`")

    def _policy_files(self) -> list[Path]:
        return sorted(path for path in self.location.iterdir()
                      if path.is_file() and path.suffix.lower() in POLICY_SUFFIXES)

    def is_approved(self, sha256: str) -> bool:
        return sha256.lower() in self.digests()

    def last_approved(self, name: str) -> LoadedPolicy | None:
        """The most recently approved version of the policy called ``name`` that can still
        be read (None when there is none): what a new version is compared against."""
        if self.location.is_dir():
            candidates = sorted(self._policy_files(), key=lambda path: path.stat().st_mtime, reverse=True)
        elif self.location.is_file():
            lines = [line.strip() for line in self.location.read_text().splitlines()]
            candidates = [Path(line[64:].strip().lstrip("*")) for line in reversed(lines) if _DIGEST.match(line + " ")]
        else:
            return None
        digests = self.digests()
        for path in candidates:
            try:
                loaded = load_policy(path)
            except PolicyError:
                continue
            if loaded.policy.name == name and loaded.sha256 in digests:
                return loaded
        return None

    def approve(self, loaded: LoadedPolicy, approver: str | None = None, note: str = "") -> Path:
        """Add ``loaded`` to the list; returns where its approval was written. Approving an
        already approved version changes nothing."""
        approver = approver or getpass.getuser()
        if self.is_folder:
            self.location.mkdir(parents=True, exist_ok=True)
            target = self.location / f"{_file_stem(loaded.policy.name)}-{loaded.sha256[:12]}.yaml"
            if loaded.sha256 not in self.digests():
                # The bytes that were hashed: the loader decoded them as UTF-8, which round-trips.
                target.write_bytes(loaded.text.encode("utf-8"))
            record = {"approved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "approved_by": approver, "policy_name": loaded.policy.name, "sha256": loaded.sha256,
                      "source": str(loaded.path), "file": target.name, "note": note}
            with open(self.location / APPROVAL_LOG, "a") as log:
                log.write(json.dumps(record) + "\n")
            return target
        self.location.parent.mkdir(parents=True, exist_ok=True)
        if not (self.location.exists() and loaded.sha256 in self.digests()):
            with open(self.location, "a") as digests:
                digests.write(f"{loaded.sha256}  {loaded.path}\n")
        return self.location


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "policy"
