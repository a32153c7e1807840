"""Data pipelines, imported as ``pgnm_fast.pipelines``: sources (layouts), transforms and the
plain PyTorch loader. DALI pipelines live in their own module and are imported only when used,
so this package imports on machines without DALI."""
from .loader import build_loader
from .sources import DataSource, Split, open_source
from .transforms import MEAN, STD, build_transform, load_grey

__all__ = ["DataSource", "MEAN", "STD", "Split", "build_loader", "build_transform", "load_grey",
           "open_source"]
