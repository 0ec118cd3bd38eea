"""The privacy ledger: how much ε each dataset has spent across its releases.

Every release of a dataset runs Stage II afresh on the same people, so by sequential
composition the ε of its releases add up. Before a release touches any photo it asks the
ledger, with diffprivlib's ``BudgetAccountant`` semantics, whether ``spent + ε ≤ budget``;
if not, it is refused and nothing is written. Otherwise the spend is reserved at once, before
any photo is read (two runs started together cannot both pass). A run that fails or is
interrupted before it publishes anything released no selection, so it gives its reservation
back (:func:`refund`): the ledger keeps the charge and adds a refund row saying why. A run
that published part of its photos keeps its charge. The ledger is the ``privacy`` lineage
table under ``LEDGER/_lineage/privacy/``; it defaults to the release folder, and releases of
one dataset into several folders should share one ``--ledger`` folder.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
from dataclasses import dataclass
from pathlib import Path

from flows.release import lineage


class PrivacyBudgetExceeded(RuntimeError):
    """A release would take a dataset past its privacy budget."""


@dataclass(frozen=True)
class Spend:
    dataset: str
    epsilon: float
    spent_before: float
    budget: float


CHARGE, REFUND = "charge", "refund"


def _entries(table, entry: str):
    """Rows of one kind; ledgers written before refunds existed hold charges only (no kind)."""
    kinds = table["entry"].fillna(CHARGE)
    return table[kinds == entry]


def spent(ledger_dir: str | Path, dataset: str) -> list[float]:
    """The ε of every release of ``dataset`` that still counts (charged and not refunded)."""
    table = lineage.read_table(ledger_dir, "privacy")
    table = table[table["dataset"] == dataset]
    refunded = set(_entries(table, REFUND)["run_id"])
    charges = _entries(table, CHARGE)
    return [float(e) for run_id, e in zip(charges["run_id"], charges["epsilon"]) if run_id not in refunded]


def refund(ledger_dir: str | Path, run_id: str, reason: str) -> float:
    """Give back run ``run_id``'s reservation, recording ``reason``: only for a run that
    published nothing (its selections reached nobody). Returns the ε given back (0 when the
    run charged nothing here or was refunded already)."""
    ledger_dir = Path(ledger_dir)
    with _locked(ledger_dir):
        table = lineage.read_table(ledger_dir, "privacy")
        mine = table[table["run_id"] == run_id]
        charges, refunds = _entries(mine, CHARGE), _entries(mine, REFUND)
        if charges.empty or not refunds.empty:
            return 0.0
        charge = charges.iloc[0]
        epsilon = float(charge["epsilon"])
        lineage.write_table(ledger_dir, "privacy", run_id, [{
            "run_id": run_id, "dataset": charge["dataset"], "epsilon": epsilon, "budget": charge["budget"],
            "policy_name": charge["policy_name"], "policy_sha256": charge["policy_sha256"],
            "release_dir": charge["release_dir"], "recorded_at": dt.datetime.now(dt.timezone.utc),
            "entry": REFUND, "reason": reason}], part=REFUND)
    return epsilon


@contextlib.contextmanager
def _locked(ledger_dir: Path):
    """Serialise check-and-record, so two releases started together cannot both pass."""
    folder = ledger_dir / lineage.LINEAGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".privacy.lock", "a") as handle:  # "a": never truncates, mtime unchanged
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reserve(ledger_dir: str | Path, dataset: str, epsilon: float, budget: float, run_id: str,
            policy_name: str, policy_sha256: str, release_dir: str) -> Spend:
    """Check that ``dataset`` can spend ``epsilon`` more within ``budget`` and record it;
    raises :class:`PrivacyBudgetExceeded` (recording nothing) when it cannot."""
    from diffprivlib import BudgetAccountant
    from diffprivlib.utils import BudgetError

    ledger_dir = Path(ledger_dir)
    with _locked(ledger_dir):
        history = spent(ledger_dir, dataset)
        accountant = BudgetAccountant(epsilon=budget, delta=0.0, spent_budget=[(e, 0.0) for e in history])
        before = float(accountant.total()[0])
        try:
            if epsilon > 0:  # a release that re-selects nothing spends nothing
                accountant.check(epsilon, 0.0)
        except BudgetError:
            raise PrivacyBudgetExceeded(
                f"dataset {dataset!r} has spent epsilon {before:g} of its budget {budget:g} in {len(history)} "
                f"release(s) (ledger {ledger_dir / lineage.LINEAGE_DIR / 'privacy'}); this release needs "
                f"{epsilon:g} more. Nothing was written. Release fewer times, lower privacy.epsilon to at most "
                f"{max(budget - before, 0):g}, or, if the compliance officer agrees, raise privacy.budget") from None
        if epsilon > 0:
            lineage.write_table(ledger_dir, "privacy", run_id, [{
                "run_id": run_id, "dataset": dataset, "epsilon": float(epsilon), "budget": float(budget),
                "policy_name": policy_name, "policy_sha256": policy_sha256, "release_dir": release_dir,
                "recorded_at": dt.datetime.now(dt.timezone.utc), "entry": CHARGE}])
    return Spend(dataset=dataset, epsilon=float(epsilon), spent_before=before, budget=float(budget))
