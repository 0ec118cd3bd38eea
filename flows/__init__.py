"""Prefect wiring: the release flow, gates, lineage, evaluation and the CLI."""
import os

# Prefect's server telemetry tries to reach the internet, which these machines do not have;
# set before Prefect is imported anywhere in the package.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
