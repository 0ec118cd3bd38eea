"""Work on many items in processes: one-off fan-outs with a progress bar (training data,
evaluation) and a long-lived pool for the photos of a release's batches.

Processes, not threads: dlib's detector, landmarks and ResNet descriptors hold Python's lock
while they run, so threads would take turns. Spawn, not fork: dlib and Prefect's threads
made fork deadlock (and so do torch's and onnxruntime's thread pools). A release's pool
workers run with one thread each for OpenMP, OpenCV and onnxruntime (the pool is the
parallelism) and load their models once, on first use.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm


def map_with_progress(function: Callable, items: Sequence, workers: int, description: str, unit: str,
                      progress: bool = True, chunksize: int = 32) -> Iterator:
    """``function(item)`` for every item, in order, in ``workers`` spawned processes (one:
    in this process). Spawn, not fork: dlib and Prefect's threads made fork deadlock."""
    bar = tqdm(total=len(items), desc=description, unit=unit, disable=not progress)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(function, items, chunksize=chunksize) if pool else map(function, items)
        for result in results:
            yield result
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()


def resolve_workers(requested: int) -> int:
    """``requested`` processes, or one per core when it is 0."""
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


def _single_threaded() -> None:
    # Runs in each worker before it imports the stages: torch reads OMP_NUM_THREADS at import.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    import cv2

    cv2.setNumThreads(1)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_single_threaded)


def warm_up(function: Callable, workers: int) -> None:
    """Start the pool now and run ``function`` (loading models) once in each worker, without
    waiting: the workers load while this process does other work. Not guaranteed to reach
    every worker, only likely (idle workers take one task each); a worker it misses loads on
    first use as always."""
    if workers > 1:
        pool = _pool(workers)
        for _ in range(workers):
            pool.submit(function)


def map_in_processes(function: Callable, arguments: Sequence[tuple], workers: int) -> list:
    """``[function(*args) for args in arguments]``, in ``workers`` processes when that is more
    than one and there is more than one item (else here, in order). A worker that dies takes
    the pool with it: the next call starts a new one, and this one raises."""
    if workers <= 1 or len(arguments) <= 1:
        return [function(*args) for args in arguments]
    try:
        return list(_pool(workers).map(function, *zip(*arguments)))
    except BrokenProcessPool:
        _pool.cache_clear()
        raise
