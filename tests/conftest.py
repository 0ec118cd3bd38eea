import os
from pathlib import Path

import numpy as np
import pytest
from skimage import data

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ANONYMOUSNET_SHARED_DATA", REPO.parent / "shared" / "data"))


# The test files that take longest, first: `make test` runs the suite in two processes
# (pytest-xdist, one file per process at a time), and a long file started last would leave
# the other process idle at the end (the shared-data file alone is over 20 minutes in CI).
LONGEST_FIRST = ("test_shared_data.py", "test_operations.py", "test_resume.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED_DATA} is absent (research data is only on CI and dev machines)")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
