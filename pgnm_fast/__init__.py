"""pgnm-fast: Policy Gradient-Driven Noise Mask pretraining, fast and verified."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# From the source tree (PYTHONPATH=.), the top-level folders kernels/ and pipelines/ are this
# package's subpackages pgnm_fast.kernels and pgnm_fast.pipelines; an installed wheel has them
# in place already (see [tool.setuptools.package-dir] in pyproject.toml).
_here = _Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 - __path__ is set for packages
