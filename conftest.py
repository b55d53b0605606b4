# Puts the repository root on sys.path so tests import `common`, `rqvae`, ... without installation.
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def argen_cache(tmp_path_factory):
    """One cache folder for the whole session (its subprocesses too): the shapes classifier trains once, and
    never into the user's ~/.cache/argen."""
    os.environ["ARGEN_CACHE"] = str(tmp_path_factory.mktemp("argen_cache"))
