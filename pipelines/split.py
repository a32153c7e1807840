"""The interface every data layout implements: :class:`Split` (files and labels of one split) and
:class:`DataSource` (a data set in some layout); the layouts are in :mod:`.sources` (files on disk)
and :mod:`.packed` (a packed cache)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgnm_fast.errors import DataError

SPLITS = ("train", "val", "test")
MAX_LISTED = 3  # how many offending rows an error message lists


@dataclass(frozen=True)
class Split:
    """One split: ``files[i]`` (absolute path) has class ``classes[labels[i]]``."""

    name: str
    files: list[str]
    labels: np.ndarray  # int64
    classes: list[str]
    root: Path | None = None  # the data set's folder (start-up caches go beside it)

    def __len__(self) -> int:
        return len(self.files)

    def grey(self, i: int):
        """Image ``i`` as an 8-bit grey PIL image (:func:`~.transforms.load_grey`)."""
        from .transforms import load_grey
        return load_grey(self.files[i])


@dataclass
class DataSource:
    """A data set in some layout. Subclasses implement ``_read(split) -> (files, class_names)``."""

    root: Path
    layout: str
    splits: list[str]
    _cache: dict = field(default_factory=dict, repr=False)
    skip_bad: bool = False
    problems: list = field(default_factory=list, repr=False)
    # the listing cache (.startup): options that select the files, attributes the read decides
    listing_options = ()
    listing_state = ()

    @property
    def classes(self) -> list[str]:
        """Sorted class names of the train split; every split is labelled in this order."""
        if "classes" not in self._cache:
            if "train" not in self.splits:
                raise DataError(f"{self.root}: no train split, so no class list")
            self._cache["classes"] = sorted(set(self._names("train")[1]))
        return self._cache["classes"]

    def split(self, name: str) -> Split:
        if name not in self.splits:
            present = ", ".join(self.splits) or "none"
            raise DataError(f"{self.root}: no {name!r} split in this {self.layout} data set "
                            f"(present: {present})")
        files, names = self._names(name)
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(names) - index.keys())
        if unknown:
            raise DataError(f"{self._where(name)}: {len(unknown)} label(s) absent from the train "
                            f"split: {', '.join(unknown[:MAX_LISTED])}")
        labels = np.fromiter((index[c] for c in names), dtype=np.int64, count=len(names))
        return Split(name, files, labels, list(self.classes), self.root)

    def _names(self, name):
        key = ("split", name)
        if key not in self._cache:
            from .startup import cached_listing
            files, names = cached_listing(self, name)
            if not files:
                raise DataError(f"{self._where(name)}: the {name} split is empty")
            self._cache[key] = (files, names)
        return self._cache[key]

    def _bad(self, path: str, reason: str) -> None:
        """A file the listing cannot use: listed under ``skip_bad``, else one DataError."""
        if "\n" in path or "\r" in path:
            path = repr(path)  # one line in messages and lists
        if not self.skip_bad:
            raise DataError(f"{path}: {reason} (--on-bad-image skip leaves it out)")
        self.problems.append((path, reason))

    def _sound_name(self, path: str) -> bool:
        """False (after :meth:`_bad`) for a name with a line break: file lists hold one per line."""
        if "\n" in path or "\r" in path:
            self._bad(path, "the file name contains a line break")
            return False
        return True

    def _read(self, name: str) -> tuple[list[str], list[str]]:
        """The split's file paths and class names: each file-based layout implements this (the
        packed cache overrides ``split`` and ``classes`` instead)."""
        raise NotImplementedError(f"{type(self).__name__} reads no files")

    def _where(self, name: str) -> Path:
        return self.root / name

    def listing_deps(self, name: str, files: list[str]) -> list[str]:
        """The files and folders whose size and time decide the listing of a split (a file
        added or removed changes its folder's time)."""
        return sorted({str(self._where(name))} | {os.path.dirname(f) for f in files})


# ----------------------------------------------------------------------------- RadImageNet CSVs
