"""What becomes of what cannot be used (``--on-bad-image``): the one place the policy applies.

Two kinds of bad input reach it: entries a source could not list (a CSV row naming a missing
file, an empty class folder: ``source.problems``, left out by the source under ``skip``), and
files the pre-epoch check (:mod:`.check`) found unreadable. ``error`` stops with one
:class:`~pgnm_fast.errors.DataError` line naming the first; ``skip`` leaves them out, logs the
count and, where asked, writes ``path<TAB>reason`` lines to a list.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from pgnm_fast.errors import DataError

from .check import ScanResult
from .split import Split


def check_on_bad(on_bad_image: str) -> str:
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"--on-bad-image must be error or skip, not {on_bad_image!r}")
    return on_bad_image


def report_bad(bad: list[tuple[str, str]], on_bad_image: str, list_path=None, log=print,
               what: str = "file") -> None:
    """Apply the ``--on-bad-image`` rule to ``bad`` = [(path, reason)]: ``error`` raises a
    one-line DataError naming the first file; ``skip`` writes ``path<TAB>reason`` lines to
    ``list_path`` (if given) and logs the count."""
    if not bad:
        return
    if check_on_bad(on_bad_image) == "error":
        more = f" (and {len(bad) - 1} more bad {what}s; --on-bad-image skip leaves them out)" \
            if len(bad) > 1 else " (--on-bad-image skip leaves it out)"
        raise DataError(f"{bad[0][0]}: {bad[0][1]}{more}")
    where = ""
    if list_path is not None:
        from pgnm_fast.atomic import atomic_open
        with atomic_open(list_path, "w") as f:
            f.writelines(f"{p}\t{r}\n" for p, r in bad)
        where = f", listed in {list_path}"
    log(f"skipped {len(bad)} bad {what}(s){where}; first: {bad[0][0]}: {bad[0][1]}")


def drop_bad(split: Split, scan: ScanResult, on_bad_image: str,
             bad_list: str | os.PathLike | None = None,
             log: Callable[[str], None] = print) -> tuple[Split, ScanResult]:
    """``split`` and its verdict ``scan`` less the files the check found bad, under the
    ``on_bad_image`` rule (``error`` raises naming the first)."""
    if not scan.bad:
        return split, scan
    report_bad([(split.files[i], r) for i, r in scan.bad], on_bad_image, bad_list, log)
    keep = scan.good
    split = Split(split.name, [split.files[i] for i in keep], split.labels[keep], split.classes,
                  split.root)
    return split, ScanResult(split.files, scan.kind[keep], scan.height[keep], scan.width[keep],
                             scan.colour[keep], scan.deep[keep], scan.nbytes[keep])
