"""How much a Dask task runner speeds a release up: the same photos released with 1, 2, ...
local Dask workers, repeated, interleaved (so machine noise falls on every setting alike).

Each release is the real flow with a Dask task runner of n workers, handed in by the caller
(``run_release(workers, **release_arguments)``; the CLI passes the release flow, so this
module does not import it), into a fresh folder with ``incremental=False``. Two times are kept per release: the whole
call (``wall``: starting the Dask cluster, workers importing torch and dlib and loading the
models, then the run) and the run itself (``run``: lineage ``started_at`` to ``finished_at``,
the Dask cluster already up). The figures quoted are medians over repeats and their ratio.
Needs ``PREFECT_API_URL`` (a running ``prefect server start``): against the temporary server
each Dask worker would start a server of its own.
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from flows.release import lineage


def _subset(input_dir: Path, limit: int | None, into: Path) -> Path:
    """The first ``limit`` photos of ``input_dir`` (sorted by path), copied into ``into``."""
    from stages.common.ingest import discover_folder

    photos = sorted(discover_folder(input_dir.resolve()), key=lambda p: p.image_id)[:limit]
    for photo in photos:
        target = into / photo.image_id
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo.path, target)  # a copy: the release refuses links leaving the input root
    return into


def measure_scaleout(run_release: Callable[..., dict], input_dir: str, workers: tuple[int, ...] = (1, 2),
                     repeats: int = 3, limit: int | None = 40, batch_size: int = 4, policy: str | None = None) -> dict:
    """``run_release(workers, input=..., output=..., policy=..., batch_size=..., incremental=...)``
    runs one release with ``workers`` Dask workers and returns its summary."""
    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError("set PREFECT_API_URL to a running Prefect server first (`prefect server start`, then "
                           "export PREFECT_API_URL=http://127.0.0.1:4200/api): against the temporary server every "
                           "Dask worker starts one of its own, which would dominate the timing")
    scratch = Path(tempfile.mkdtemp(prefix="anonymousnet-scaleout-"))
    try:
        photos = _subset(Path(input_dir), limit, scratch / "in")
        releases = []
        for repeat in range(repeats):
            for count in workers:
                output = scratch / f"out-{count}-{repeat}"
                started = time.perf_counter()
                summary = run_release(count, input=str(photos), output=str(output), policy=policy,
                                      batch_size=batch_size, incremental=False)
                wall = time.perf_counter() - started
                run = lineage.read_table(output, "runs").iloc[0]
                events = lineage.read_table(output, "events")
                work = events[events.stage.isin(["ingest", "attributes", "anonymize"])]
                releases.append({"workers": count, "repeat": repeat, "wall_s": round(wall, 2),
                                 "run_s": round((run.finished_at - run.started_at).total_seconds(), 2),
                                 "task_work_s": round(float(work.seconds.sum()), 2),
                                 "n_inputs": int(summary["n_inputs"]), "n_released": int(summary["n_released"]),
                                 "n_faces": int(summary["n_faces"])})
                shutil.rmtree(output, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {}
    for count in workers:
        rows = [r for r in releases if r["workers"] == count]
        medians[str(count)] = {key: statistics.median(r[key] for r in rows) for key in ("wall_s", "run_s", "task_work_s")}
    base = medians[str(workers[0])]
    speedups = {str(count): {"wall": round(base["wall_s"] / medians[str(count)]["wall_s"], 3),
                             "run": round(base["run_s"] / medians[str(count)]["run_s"], 3)} for count in workers}
    return {"input": str(input_dir), "limit": limit, "batch_size": batch_size, "repeats": repeats,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "releases": releases, "medians": medians, "speedup_over_first": speedups}


def scaleout_table(results: dict) -> str:
    lines = [f"{results['releases'][0]['n_inputs']} photos, batches of {results['batch_size']}, "
             f"{results['repeats']} repeats, {results['machine']['cpus']} CPUs (medians)",
             "| Dask workers | whole call (s) | run (s) | task work (s) | speed-up, call | speed-up, run |",
             "|---:|---:|---:|---:|---:|---:|"]
    for count, median in results["medians"].items():
        speedup = results["speedup_over_first"][count]
        lines.append(f"| {count} | {median['wall_s']:.1f} | {median['run_s']:.1f} | {median['task_work_s']:.1f} | "
                     f"{speedup['wall']:.2f}x | {speedup['run']:.2f}x |")
    return "\n".join(lines)
