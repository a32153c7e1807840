"""What produced a run: pgnm-fast's version, the git commit of a source checkout, the command line
and the versions of the libraries that decide the numbers. Stored in each run's ``config.json``."""
from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# distributions whose versions can change results or speed (absent ones are left out)
LIBRARIES = ("torch", "triton", "nvidia-dali-cuda120", "numpy", "scipy", "scikit-learn", "pillow",
             "matplotlib", "tensorboard")


def git_commit(where: Path | None = None) -> str | None:
    """The commit checked out at ``where`` (default: this package's source tree), with
    ``-dirty`` when tracked files are modified; None outside a checkout or without git."""
    where = Path(where) if where is not None else Path(__file__).resolve().parent.parent
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                                  timeout=5, check=True).stdout.strip()
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_record(argv: list[str] | None = None) -> dict:
    from . import __version__
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "__main__.py":  # python -m pgnm_fast
        argv[0] = "python -m pgnm_fast"
    elif argv and Path(argv[0]).name == "pgnm-fast":
        argv[0] = "pgnm-fast"
    return {"pgnm_fast": __version__, "git_commit": git_commit(),
            "command": " ".join(argv[:1] + [shlex.quote(a) for a in argv[1:]]),
            "host": platform.node(), "libraries": library_versions()}
