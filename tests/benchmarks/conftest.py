"""Shared setup of the cost benchmarks: one thread, and a switch between "measure" and "smoke".

`make bench` passes `--benchmark-enable`; the default `pytest` run keeps the pyproject's
`--benchmark-disable`, and then every benchmark here must be a smoke test (one tiny iteration,
well under 2 s), because the normal suite collects this folder too.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Benchmarks compare ratios on a shared 2-core machine: one thread keeps them comparable
    across runs and leaves the other core to whatever else is running."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def benchmarks_enabled(config: pytest.Config) -> bool:
    """pytest-benchmark's own rule: the pyproject always passes `--benchmark-disable`, so that
    flag alone says nothing; `--benchmark-enable` on the command line overrides it."""
    return not (config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


@pytest.fixture(scope="session")
def measuring(request) -> bool:
    """True under `--benchmark-enable` (real sizes and rounds), False in the normal test run."""
    return benchmarks_enabled(request.config)
