"""Data pipelines, imported as ``pgnm_fast.pipelines``, by concern:

- data: ``split`` (the Split / DataSource interface), ``sources`` (layouts and ``open_source``),
  ``medmnist`` (MedMNIST ``.npz`` files), ``packed`` (the packed cache: format, reader, seal),
  ``pack`` / ``decode`` / ``pack_arrays`` (writing it);
- checking: ``png`` (the PNG structure check), ``check`` (the verdict on a file list),
  ``startup`` (its cache), ``badfiles`` (``--on-bad-image``, the one place it applies);
- pixels: ``transforms`` (decoding rules, the torchvision-style transforms and their crop
  rules as arrays), ``augment`` (resized crops on tensors);
- loading: ``samplers`` (epoch orders of every loader), ``contract`` (:class:`BatchLoader`), the
  loaders side by side (``loader``: plain PyTorch, ``dali``, ``device``) and ``factory``
  (:func:`make_loader`, which picks one by name from its ``LOADERS`` table).

DALI itself is imported only when a DALI loader is built, so this package imports where DALI
is not installed."""
from .contract import BatchLoader
from .factory import make_loader, resolve_backend
from .loader import build_loader
from .sources import DataSource, Split, open_source
from .transforms import MEAN, STD, build_transform, load_grey

__all__ = ["BatchLoader", "DataSource", "MEAN", "STD", "Split", "build_loader", "build_transform", "load_grey",
           "make_loader", "open_source", "resolve_backend"]
