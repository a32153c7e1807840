"""Data pipelines, imported as ``pgnm_fast.pipelines``: sources (layouts), transforms, the plain
PyTorch loader, the DALI pipelines, the packed cache, the device-resident loader
and :func:`make_loader`, which picks one.
DALI itself is imported only when a DALI loader is built, so this package imports where DALI
is not installed."""
from .contract import BatchLoader
from .factory import make_loader, resolve_backend
from .loader import build_loader
from .sources import DataSource, Split, open_source
from .transforms import MEAN, STD, build_transform, load_grey

__all__ = ["BatchLoader", "DataSource", "MEAN", "STD", "Split", "build_loader", "build_transform", "load_grey",
           "make_loader", "open_source", "resolve_backend"]
