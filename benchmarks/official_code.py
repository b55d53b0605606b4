"""Official code imported at run time from a checkout the user names (never kept in this repository).

`--official-repo` may be a checkout or a git directory (a bare clone or a mirror): then the packages
the benchmark needs are written out of its HEAD into a temporary folder for the run. The official
packages often share a name with ours (`rqvae`) or with other code (`models`, `utils`): ours are set
aside in `sys.modules` while the official ones are imported, and the official ones are renamed
`official_<name>` afterwards, so both live in one process.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
from types import ModuleType
from typing import Iterator, Sequence

from common.errors import ConfigError


def official_sources(repo: str, packages: Sequence[str], marker: str, scratch: str, what: str) -> tuple[str, str]:
    """A folder holding the official `packages`, and its commit ('checkout' for a plain checkout). `marker` is a
    file every checkout of the right repository has (e.g. `models/mar.py`); `what` names it in errors."""
    if os.path.isfile(os.path.join(repo, marker)):
        return repo, "checkout"
    git = ["git", f"--git-dir={repo}"]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        archive = subprocess.run([*git, "archive", "HEAD", *packages], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise ConfigError(f"--official-repo {repo}: neither a checkout of {what} (no {marker}) nor a git directory "
                          f"whose HEAD has {', '.join(packages)}") from None
    subprocess.run(["tar", "-x", "-C", scratch], input=archive, check=True)
    return scratch, commit[:12]


def import_official(source: str, module: str, packages: Sequence[str]) -> ModuleType:
    """`module` imported from the folder `source`; modules named like `packages` are set aside meanwhile."""
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in packages}
    sys.path.insert(0, os.path.abspath(source))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(os.path.abspath(source))
        for name in [name for name in sys.modules if name.split(".")[0] in packages]:
            sys.modules[f"official_{name}"] = sys.modules.pop(name)
        sys.modules.update(ours)


def require(package: str) -> None:
    """A ConfigError naming the pip package the official code needs when it is not installed."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"--official-repo: the official code needs {package}; pip install {package}") from None


@contextlib.contextmanager
def official_checkout(repo: str, packages: Sequence[str], marker: str, what: str) -> Iterator[tuple[str, str]]:
    """(folder, commit) of `official_sources`, with the temporary folder removed on exit (once imported, the
    modules no longer need their files)."""
    with tempfile.TemporaryDirectory(prefix="official-code-") as scratch:
        yield official_sources(repo, packages, marker, scratch, what)
