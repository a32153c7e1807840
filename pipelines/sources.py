"""Data sources: one interface over the data layouts of docs/method.md §1.

``open_source(path)`` detects the layout and returns a :class:`DataSource`; ``source.split(name)``
gives a :class:`Split` (absolute file paths and int64 labels over ``source.classes``), which the
plain PyTorch loader, and later the DALI pipelines and the packer, consume.

Layouts, tried in the order of ``LAYOUTS``:

``packed``
    A cache written by ``pgnm-fast pack`` (a folder with ``manifest.json``): decoded uint8
    images in one memory-mapped array, see :mod:`pgnm_fast.pipelines.packed`. Its splits are
    :class:`~pgnm_fast.pipelines.packed.PackedSplit` objects: the same ``files`` (the source paths)
    and ``labels`` as the data set it was packed from, plus the records to read.

``radimagenet``
    RadImageNet as distributed: split files ``RadiologyAI_{train,val,test}.csv`` with columns
    ``filename,label``. ``filename`` is relative to the folder that holds ``radiology_ai/`` (rows
    read ``radiology_ai/CT/<anatomy>/<label>/<file>.png`` or ``radiology_ai/US/<label>/...``).
    ``path`` may be the folder holding the CSVs, the ``radiology_ai`` folder, or its parent; the
    CSVs may sit beside ``radiology_ai/`` or inside it. File names are resolved against the CSV
    folder or its parent (whichever holds the files), or ``image_root`` if given.
    Class names: with ``class_from="auto"`` (default), when every train row follows the
    ``radiology_ai/...`` pattern the class is taken from the path as the authors' conversion to
    flat folders names it (``CT__abdomen__normal``, ``US__liver``), so both layouts of one data
    set give the same classes in the same order; otherwise the ``label`` column is used.
``medmnist``
    A MedMNIST ``.npz`` file, or a folder holding one (:mod:`pgnm_fast.pipelines.medmnist`):
    its splits are :class:`~pgnm_fast.pipelines.packed.PackedSplit` objects over the images in
    memory.
``folders``
    Flat class folders ``<root>/{train,val,test}/<class>/*.<image extension>`` (names starting
    with a dot, such as ``.ipynb_checkpoints`` or ``._x.png``, are skipped).

Problems raise :class:`pgnm_fast.errors.DataError` with one line naming the path. A split that is
absent (no CSV / no folder) is left out of ``source.splits`` and raises only when asked for.
With ``skip_bad=True`` a CSV row naming a missing file and an empty class folder are left out
instead and listed in ``source.problems`` as ``(path, reason)`` (``--on-bad-image skip``).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pgnm_fast.errors import DataError

from .medmnist import detect_medmnist
from .packed import open_packed
from .split import MAX_LISTED, SPLITS, DataSource, Split  # noqa: F401 (Split: re-exported)

CSV_NAME = "RadiologyAI_{}.csv"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".webp")


def _class_from_path(filename: str) -> str | None:
    """``radiology_ai/CT/abd/normal/x.png`` -> ``CT__abd__normal``; ``.../US/liver/x.png`` ->
    ``US__liver``; None for a path of another shape."""
    parts = PurePosixPath(filename.replace("\\", "/")).parts
    if "radiology_ai" not in parts:
        return None
    k = parts.index("radiology_ai")
    rest = parts[k + 1:]
    if len(rest) == 4 and rest[0] in ("CT", "MR"):
        return "__".join(rest[:3])
    if len(rest) == 3 and rest[0] == "US":
        return "__".join(rest[:2])
    return None


def _existing_files(paths: list[Path]) -> set[str]:
    """The subset of ``paths`` that exist as files, found by listing their folders (one
    directory scan per folder instead of one stat per file: fast for a million rows)."""
    by_dir: dict[Path, set[str]] = {}
    for p in paths:
        by_dir.setdefault(p.parent, set())
    found = set()
    for d in by_dir:
        try:
            with os.scandir(d) as it:
                found.update(os.path.join(d, e.name) for e in it if _is_file(e))
        except OSError:
            pass
    return found


def _is_file(entry: os.DirEntry) -> bool:
    """False for what cannot be read as a file, a symbolic link loop included (the loaders'
    check then names it as missing)."""
    try:
        return entry.is_file()
    except OSError:
        return False


@dataclass
class RadImageNetSource(DataSource):
    csv_dir: Path = None
    image_root: Path | None = None
    class_from: str = "auto"
    listing_options = ("image_root", "class_from")
    listing_state = ("class_from",)
    _dirs: dict = field(default_factory=dict, repr=False)  # split -> folders its rows name

    def _where(self, name):
        return self.csv_dir / CSV_NAME.format(name)

    def listing_deps(self, name, files):
        return sorted({str(self._where(name))} | self._dirs.get(name, set()))

    def _rows(self, name):
        path = self._where(name)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: empty file, expected a header 'filename,label'")
                cols = [h.strip() for h in header]
                if "filename" not in cols or "label" not in cols:
                    raise DataError(f"{path}: columns are {','.join(cols)!r}, expected "
                                    f"'filename,label'")
                fi, li = cols.index("filename"), cols.index("label")
                rows = []
                for line, row in enumerate(reader, start=2):
                    if not row:
                        continue
                    if len(row) <= max(fi, li) or not row[fi].strip() or not row[li].strip():
                        raise DataError(f"{path}: row {line} has no filename or no label: "
                                        f"{','.join(row)!r}")
                    rows.append((line, row[fi].strip(), row[li].strip()))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a UTF-8 CSV file ({e.reason})") from None
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV ({e})") from None
        return path, rows

    def _base(self, rows) -> Path:
        """The folder the ``filename`` column is relative to."""
        if self.image_root is not None:
            return self.image_root
        bases = [self.csv_dir, self.csv_dir.parent]
        sample = [r[1] for r in rows[:16]]
        hits = [sum((b / f).is_file() for f in sample) for b in bases]
        return bases[int(np.argmax(hits))]

    def _read(self, name):
        path, rows = self._rows(name)
        if not rows:
            return [], []
        base = self._base(rows)
        files = [base / r[1] for r in rows]
        self._dirs[name] = {str(p.parent) for p in files}
        found = _existing_files(files)
        missing = [(r[0], r[1]) for r, p in zip(rows, files) if str(p) not in found]
        if missing and self.skip_bad:
            self.problems += [(str(base / fn), f"missing file ({path.name} row {line})")
                              for line, fn in missing]
            keep = [str(p) in found for p in files]
            rows = [r for r, k in zip(rows, keep) if k]
            files = [p for p, k in zip(files, keep) if k]
        elif missing:
            first = "; ".join(f"row {line}: {fn}" for line, fn in missing[:MAX_LISTED])
            raise DataError(f"{path}: {len(missing)} of {len(rows)} rows name files missing "
                            f"under {base} (first: {first})")
        sound = [self._sound_name(str(p)) for p in files]
        if not all(sound):
            rows = [r for r, k in zip(rows, sound) if k]
            files = [p for p, k in zip(files, sound) if k]
        if self.class_from == "auto":
            if name == "train" or "train" not in self.splits:
                from_path = all(_class_from_path(r[1]) for r in rows)
                self.class_from = "path" if from_path else "label"
            else:
                self._names("train")  # decides class_from from the train split
        if self.class_from == "path":
            names = [_class_from_path(r[1]) for r in rows]
            bad = [(r[0], r[1]) for r, c in zip(rows, names) if c is None]
            if bad:
                raise DataError(f"{path}: row {bad[0][0]}: {bad[0][1]} is not of the form "
                                f"radiology_ai/<CT|MR>/<anatomy>/<label>/<file> or "
                                f"radiology_ai/US/<label>/<file>")
        else:
            names = [r[2] for r in rows]
        return [str(p) for p in files], names


def _detect_radimagenet(path: Path, image_root=None, class_from="auto", skip_bad=False):
    candidates = [path]
    if path.is_file() and path.name.startswith("RadiologyAI_") and path.suffix == ".csv":
        candidates = [path.parent]
    elif path.name == "radiology_ai":
        candidates.append(path.parent)
    else:
        candidates.append(path / "radiology_ai")
    for d in candidates:
        present = [s for s in SPLITS if (d / CSV_NAME.format(s)).is_file()]
        if present:
            if "train" not in present:
                raise DataError(f"{d}: has {CSV_NAME.format(present[0])} but no "
                                f"{CSV_NAME.format('train')}")
            if class_from not in ("auto", "path", "label"):
                raise DataError(f"class_from must be auto, path or label, got {class_from!r}")
            root = d.parent if d.name == "radiology_ai" else d
            return RadImageNetSource(root=root, layout="radimagenet", splits=present, csv_dir=d,
                                     image_root=Path(image_root) if image_root else None,
                                     class_from=class_from, skip_bad=skip_bad)
    return None


# ----------------------------------------------------------------------------- class folders
@dataclass
class FolderSource(DataSource):
    def listing_deps(self, name, files):
        split_dir = self.root / name
        return [str(split_dir)] + sorted(e.path for e in os.scandir(split_dir)
                                         if e.is_dir() and not e.name.startswith("."))

    def _read(self, name):
        split_dir = self.root / name
        classes = sorted(e.name for e in os.scandir(split_dir)
                         if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"{split_dir}: no class folders")
        files, names = [], []
        for c in classes:
            imgs = []
            for e in os.scandir(split_dir / c):
                if e.name.startswith(".") or not e.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                try:
                    is_file = e.is_file()
                except OSError as err:  # a symbolic link loop, a permission problem
                    self._bad(e.path, f"cannot read ({err.strerror or err})")
                    continue
                if is_file and self._sound_name(e.path):
                    imgs.append(e.name)
            imgs.sort()
            if not imgs:
                if self.skip_bad:
                    self.problems.append((str(split_dir / c), "empty class folder"))
                    continue
                raise DataError(f"{split_dir / c}: empty class folder (no image files)")
            files += [str(split_dir / c / f) for f in imgs]
            names += [c] * len(imgs)
        return files, names


def _detect_folders(path: Path, skip_bad=False, **_):
    if not (path / "train").is_dir():
        return None
    return FolderSource(root=path, layout="folders", skip_bad=skip_bad,
                        splits=[s for s in SPLITS if (path / s).is_dir()])


def _detect_packed(path: Path, **_):
    if not (path.is_dir() and (path / "manifest.json").is_file()):
        if (path / ".partial").is_dir():
            raise DataError(f"{path}: an interrupted pack (no manifest.json yet): run the same "
                            f"pgnm-fast pack command again to finish it")
        return None
    return open_packed(path)


# ----------------------------------------------------------------------------- detection
# (name, detect). detect(path, **options) returns a DataSource, None if the layout is not there,
# or raises DataError if it is there but broken. The packed cache goes first: its detector looks
# for the manifest.
LAYOUTS: list[tuple[str, Callable]] = [("packed", _detect_packed),
                                       ("radimagenet", _detect_radimagenet),
                                       ("folders", _detect_folders),
                                       ("medmnist", detect_medmnist)]


def register_layout(name: str, detect: Callable, first: bool = True) -> None:
    """Add a layout detector (see ``LAYOUTS``); detectors earlier in the list win."""
    entry = (name, detect)
    LAYOUTS.insert(0, entry) if first else LAYOUTS.append(entry)


def open_source(path, *, image_root=None, class_from: str = "auto",
                skip_bad: bool = False) -> DataSource:
    """Detect the layout at ``path`` and return its :class:`DataSource` (see module docstring).

    ``image_root`` (RadImageNet CSVs only): the folder ``filename`` is relative to, when the CSVs
    sit apart from the images. ``class_from``: ``auto``, ``path`` or ``label`` (CSVs only).
    ``skip_bad``: leave out missing files and empty class folders (listed in ``problems``).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    path = path.resolve()
    for _name, detect in LAYOUTS:
        source = detect(path, image_root=image_root, class_from=class_from, skip_bad=skip_bad)
        if source is not None:
            source.classes  # noqa: B018 - read and check the train split now
            return source
    raise DataError(f"{path}: not a known data layout (expected RadiologyAI_train.csv, a "
                    f"radiology_ai/ folder with it, train/<class>/ image folders, a packed "
                    f"cache with manifest.json, or a MedMNIST .npz file)")
