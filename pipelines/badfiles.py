"""What becomes of what cannot be used (``--on-bad-image``): the one place the policy applies.

Two kinds of bad input reach it: entries a source could not list (a CSV row naming a missing
file, an empty class folder: ``source.problems``, left out by the source under ``skip``), and
files the pre-epoch check (:mod:`.check`) found unreadable. ``error`` stops with one
:class:`~pgnm_fast.errors.DataError` line naming the first; ``skip`` leaves them out, logs the
count and writes ``path<TAB>reason`` lines to a list (``--bad-list`` where given, else
``bad-<split>.txt`` in the data's start-up cache folder). Each distinct note is said once per
process (:func:`say_once`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pgnm_fast.errors import DataError

from .check import ScanResult
from .split import Split


def check_on_bad(on_bad_image: str) -> str:
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"--on-bad-image must be error or skip, not {on_bad_image!r}")
    return on_bad_image


_said: set[str] = set()


def say_once(line: str, log: Callable[[str], None] = print) -> bool:
    """``log(line)`` the first time this process meets ``line``; True if it was said now. A data
    note names its split, count and list, so a command that opens the same data again (every
    stage and seed of a compare, the train and val loaders) says each distinct one once."""
    if line in _said:
        return False
    _said.add(line)
    log(line)
    return True


def said(line: str) -> bool:
    """Whether :func:`say_once` said ``line`` already in this process."""
    return line in _said


def list_path(root, split: str, what: str) -> Path:
    """Where the full list of ``what`` files of the ``split`` split is written: the data's
    start-up cache folder (:func:`~.startup.cache_folder`), ``<what>-<split>.txt``."""
    from .startup import cache_folder
    return cache_folder(root) / f"{what}-{split}.txt"


def write_list(path, rows: list[tuple[str, str]]) -> bool:
    """``path<TAB>reason`` lines, written atomically; False (no error) where the folder cannot
    be written."""
    from pgnm_fast.atomic import atomic_open
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as f:
            f.writelines(f"{p}\t{r}\n" for p, r in rows)
    except OSError:
        return False
    return True


def report_bad(bad: list[tuple[str, str]], on_bad_image: str, list_path=None, log=print,
               what: str = "file") -> None:
    """Apply the ``--on-bad-image`` rule to ``bad`` = [(path, reason)]: ``error`` raises a
    one-line DataError naming the first file; ``skip`` writes ``path<TAB>reason`` lines to
    ``list_path`` (if given) and logs the count, once per process (:func:`say_once`)."""
    if not bad:
        return
    if check_on_bad(on_bad_image) == "error":
        more = f" (and {len(bad) - 1} more bad {what}s; --on-bad-image skip leaves them out)" \
            if len(bad) > 1 else " (--on-bad-image skip leaves it out)"
        raise DataError(f"{bad[0][0]}: {bad[0][1]}{more}")
    listed = list_path is not None and write_list(list_path, bad)
    where = f", listed in {list_path}" if listed else ""
    say_once(f"skipped {len(bad)} bad {what}(s){where}; first: {bad[0][0]}: {bad[0][1]}", log)


def drop_bad(split: Split, scan: ScanResult, on_bad_image: str,
             bad_list: str | os.PathLike | None = None,
             log: Callable[[str], None] = print) -> tuple[Split, ScanResult]:
    """``split`` and its verdict ``scan`` less the files the check found bad, under the
    ``on_bad_image`` rule (``error`` raises naming the first)."""
    if not scan.bad:
        return split, scan
    if bad_list is None and on_bad_image == "skip":
        bad_list = list_path(split.root, split.name, "bad")
    report_bad([(split.files[i], r) for i, r in scan.bad], on_bad_image, bad_list, log)
    keep = scan.good
    split = Split(split.name, [split.files[i] for i in keep], split.labels[keep], split.classes,
                  split.root)
    return split, ScanResult(split.files, scan.kind[keep], scan.height[keep], scan.width[keep],
                             scan.colour[keep], scan.deep[keep], scan.nbytes[keep])
