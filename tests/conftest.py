"""Test-wide settings: the expert cache lives in a temporary folder, never in the user's ~/.cache."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_expert_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DDBENCH_CACHE", str(tmp_path_factory.mktemp("ddbench-cache")))
    yield
    mp.undo()
