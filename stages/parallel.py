"""One way to fan work on many items out to processes, with a progress bar."""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence

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
