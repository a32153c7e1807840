"""pgnm-fast: Policy Gradient-Driven Noise Mask pretraining, fast and verified.

The Python API (docs/api.md), imported on first use so that ``import pgnm_fast`` (and
``pgnm-fast --help``) loads no torch::

    import pgnm_fast

    run = pgnm_fast.train("heated", data="/data/radimagenet", preset="tiny", epochs=2)
    metrics = pgnm_fast.evaluate(run / "best.pt", split="test")

``train``, ``compare``, ``transfer``, ``evaluate``, ``predict``, ``load_weights``,
``create_model``, ``TrainConfig`` and ``make_config`` live in :mod:`pgnm_fast.api`.
``pgnm_fast.compare``, ``pgnm_fast.transfer`` and ``pgnm_fast.evaluate`` are also the modules of
those names; calling one calls the API function (``pgnm_fast.compare(...)`` is
``pgnm_fast.api.compare(...)``), and its attributes are the module's.
"""
import sys as _sys
import types as _types
from importlib import import_module as _import_module
from pathlib import Path as _Path
from typing import TYPE_CHECKING as _TYPE_CHECKING

__version__ = "0.1.0"

# From the source tree (PYTHONPATH=.), the top-level folders kernels/ and pipelines/ are this
# package's subpackages pgnm_fast.kernels and pgnm_fast.pipelines; an installed wheel has them
# in place already (see [tool.setuptools.package-dir] in pyproject.toml).
_here = _Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 - __path__ is set for packages

__all__ = ["train", "compare", "transfer", "evaluate", "predict", "load_weights", "create_model",
           "TrainConfig", "make_config", "__version__"]
_API = frozenset(__all__) - {"__version__"}
_MODULES = frozenset({"compare", "transfer", "evaluate"})  # a module and an API function each

if _TYPE_CHECKING:  # what type checkers and IDEs see; at run time, module __getattr__ below
    from .api import (  # noqa: F401
        TrainConfig,
        compare,
        create_model,
        evaluate,
        load_weights,
        make_config,
        predict,
        train,
        transfer,
    )


class _CallableModule(_types.ModuleType):
    """``pgnm_fast.compare`` (and transfer, evaluate): the module, called as its API function."""

    def __call__(self, *args, **kwargs):
        return self._api_function()(*args, **kwargs)

    def _api_function(self):
        return getattr(_import_module("pgnm_fast.api"), self.__name__.rpartition(".")[2])

    @property
    def __signature__(self):
        import inspect
        return inspect.signature(self._api_function())


class _Package(_types.ModuleType):
    """This package: a submodule in :data:`_MODULES` becomes callable as it is imported (the
    import system sets it as an attribute here)."""

    def __setattr__(self, name, value):
        if name in _MODULES and type(value) is _types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _MODULES:
        return _import_module(f"{__name__}.{name}")
    if name in _API:
        return getattr(_import_module(f"{__name__}.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _API)
