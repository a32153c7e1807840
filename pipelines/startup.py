"""What a run does before its first batch, done once and remembered: the parsed listing of a
split and the check's verdict on its files (:mod:`.check`).

Both are cached beside the data in ``<root>/.pgnm-fast/`` when that folder is writable, else in
the user cache folder (``$PGNM_FAST_CACHE``, else ``~/.cache/pgnm-fast``, see
:func:`pgnm_fast.user_cache.cache_dir`) under ``start/<hash of the data root>/``.

- The listing of a split (file paths, class names, and what ``--on-bad-image skip`` left out) is
  keyed by the layout, its options and the size and modification time of the split's CSV file or
  folder and of every folder its files are in (adding or removing a file changes its folder).
- The verdict of the check is keyed by the file list; it stores each file's size and
  modification time, and a file whose size or time differs is checked again (a file added or
  removed changes the list, so the whole split is checked again). ``recheck=True`` (``--recheck``)
  ignores the cached verdict.

Under torchrun each rank checks 1/world of the files (``files[rank::world]``) and the ranks
exchange their verdicts, so the data set is read once per node, not once per rank. The check
runs in chunks (:func:`.check.scan`), so its memory does not grow with a future per file.

A cache file that cannot be read, or was written by another version, is ignored with one line
and written again; it is never trusted.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import operator
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pgnm_fast.atomic import atomic_open
from pgnm_fast.distributed import torchrun_env
from pgnm_fast.user_cache import cache_dir

from . import check

VERSION = 1
FOLDER = ".pgnm-fast"
VERDICT_FIELDS = ("kind", "height", "width", "colour", "deep", "nbytes")


# ----------------------------------------------------------------------------- cache files
def cache_folder(root) -> Path:
    """``<root>/.pgnm-fast`` when it can be written, else a folder in the user cache."""
    if root is not None:
        here = Path(root) / FOLDER
        try:
            here.mkdir(exist_ok=True)
            if os.access(here, os.W_OK | os.X_OK):
                return here
        except OSError:
            pass
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return cache_dir() / "start" / tag


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def _list_digest(files: list, chunk: int = 4096) -> str:
    """The key of a file list, hashed a chunk at a time (never the whole list as one string)."""
    h = hashlib.sha256(json.dumps([check.__name__, len(files)]).encode())
    for i in range(0, len(files), chunk):
        h.update("\0".join(files[i:i + chunk]).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _blob(strings) -> np.ndarray:
    """Strings as one uint8 array (NUL-separated: no path holds a NUL)."""
    return np.frombuffer("\0".join(strings).encode("utf-8", "surrogateescape"), np.uint8)


def _unblob(a: np.ndarray, n: int) -> list[str]:
    if n == 0:
        return []
    out = a.tobytes().decode("utf-8", "surrogateescape").split("\0")
    if len(out) != n:
        raise ValueError(f"{len(out)} strings, expected {n}")
    return out


def read(path: Path, kind: str, key: str, log: Callable[[str], None]) -> dict | None:
    """The arrays of a cache file whose kind and key match; None when it is absent, stale, or
    (said in one line) unreadable or of another version."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except Exception as e:  # noqa: BLE001 - any damage means: do not trust it
        log(f"{path}: unreadable start-up cache ({type(e).__name__}), ignored and rebuilt")
        return None
    if meta.get("version") != VERSION or meta.get("kind") != kind:
        log(f"{path}: start-up cache of another version ({meta.get('version')!r}), ignored and "
            f"rebuilt")
        return None
    if meta.get("key") != key:
        return None
    arrays["meta"] = meta
    return arrays


def write(path: Path, kind: str, key: str, arrays: dict, **meta) -> None:
    """Write a cache file atomically; a folder that cannot be written is no error."""
    blob = np.frombuffer(json.dumps(dict(meta, version=VERSION, kind=kind, key=key)).encode(),
                         np.uint8)
    try:
        with atomic_open(path, "wb") as f:
            np.savez(f, meta=blob, **arrays)
    except OSError:
        pass


def _stat(path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


_SIZE_TIME = operator.attrgetter("st_size", "st_mtime_ns")


STAT_THREADS_FROM = 50_000  # files from which stat_files spreads its calls over threads


def stat_files(paths, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Size and modification time (ns) of each path; -1 where it cannot be read. ``threads``:
    how many threads make the calls (os.stat releases the GIL); default: one per core, up to 4,
    from ``STAT_THREADS_FROM`` paths."""
    n = len(paths)
    out = np.empty(2 * n, np.int64)  # no list of tuples: arrays filled from streams of numbers

    def part(lo: int, hi: int) -> None:
        chunk = paths[lo:hi]
        try:  # every path there: os.stat and both fields taken in C, no Python call per file
            out[2 * lo:2 * hi] = np.fromiter(itertools.chain.from_iterable(
                map(_SIZE_TIME, map(os.stat, chunk))), np.int64, 2 * len(chunk))
        except OSError:  # one cannot be read (gone, a loop): each on its own, -1 for those
            out[2 * lo:2 * hi] = np.fromiter(itertools.chain.from_iterable(map(_stat, chunk)),
                                             np.int64, 2 * len(chunk))
    if threads is None:
        threads = min(4, len(os.sched_getaffinity(0))) if n >= STAT_THREADS_FROM else 1
    if threads <= 1:
        part(0, n)
    else:
        step = 8192
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(part, range(0, n, step), range(step, n + step, step)):
                pass
    return out[0::2].copy(), out[1::2].copy()


# ----------------------------------------------------------------------------- the listing
def cached_listing(source, name: str, log: Callable[[str], None] = print):
    """``source._read(name)`` (files, class names), from the cache when nothing it was read from
    changed. ``source.listing_deps(name, files)`` names the files and folders it depends on;
    ``source.listing_state`` the attributes the read decides (restored from the cache)."""
    options = [source.layout, str(source.root), name, source.skip_bad,
               {a: str(getattr(source, a)) for a in source.listing_options}]
    path = cache_folder(source.root) / f"listing-{name}-{_digest(options)[:20]}.npz"
    key = _digest(options)
    cached = read(path, "listing", key, log)
    if cached is not None:
        deps = _unblob(cached["deps"], len(cached["dep_size"]))
        size, mtime = stat_files(deps)
        if np.array_equal(size, cached["dep_size"]) and np.array_equal(mtime, cached["dep_mtime"]):
            meta = cached["meta"]
            files = _unblob(cached["files"], meta["n"])
            classes = meta["classes"]
            names = [classes[i] for i in cached["class_index"].tolist()]
            source.problems += [tuple(p) for p in meta["problems"]]
            for attr, value in meta["state"].items():
                setattr(source, attr, value)
            return files, names
    n_problems = len(source.problems)
    files, names = source._read(name)
    deps = source.listing_deps(name, files)
    size, mtime = stat_files(deps)
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    write(path, "listing", key,
          dict(files=_blob(files), deps=_blob(deps), dep_size=size, dep_mtime=mtime,
               class_index=np.fromiter((index[c] for c in names), np.int32, len(names))),
          n=len(files), classes=classes, problems=source.problems[n_problems:],
          state={a: getattr(source, a) for a in source.listing_state})
    return files, names


# ----------------------------------------------------------------------------- the verdict
def _gather_for(world_size: int):
    """An all-gather over the process group when one of ``world_size`` processes is up."""
    import torch.distributed as dist
    if world_size > 1 and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() == world_size:
        def gather(obj):
            out = [None] * world_size
            dist.all_gather_object(out, obj)
            return out
        return gather
    return None


PROCESSES_FROM = 20_000  # files to check before the check spreads over processes


def check_shard(files: list, rank: int, world_size: int, cached: dict | None = None,
                threads: int | None = None) -> dict:
    """Check this rank's files (``files[rank::world_size]``), those whose size or time differs
    from ``cached`` only; returns the shard's stats and the verdict of what it checked."""
    idx = np.arange(rank, len(files), world_size, dtype=np.int64)
    mine = files if world_size == 1 else files[rank::world_size]
    size, mtime = stat_files(mine)
    if cached is None:
        redo = idx
    else:
        redo = idx[(size != cached["size"][idx]) | (mtime != cached["mtime"][idx])]
    cores = len(os.sched_getaffinity(0)) // torchrun_env().local_world_size
    scan = check.scan(mine if cached is None else [files[i] for i in redo],
                      threads, processes=cores if len(redo) >= PROCESSES_FROM else 0) \
        if len(redo) else check.scan([])
    return dict(index=idx, size=size, mtime=mtime, redo=redo,
                **{f: getattr(scan, f) for f in VERDICT_FIELDS},
                bad=[(int(redo[i]), r) for i, r in scan.bad])


def merge_shards(files: list, shards: list, cached: dict | None = None):
    """One :class:`.check.ScanResult` for ``files`` from the shards of every rank (and the
    cached verdict for what they did not check again), with the size and time of each file."""
    n = len(files)
    if cached is None and len(shards) == 1 and len(shards[0]["redo"]) == n:
        s = shards[0]  # one process checked every file: its arrays are the verdict, no copy
        result = check.ScanResult(files, **{f: s[f] for f in VERDICT_FIELDS})
        result.bad = s["bad"]
        return result, s["size"], s["mtime"]
    if cached is not None:
        changed = any(len(s["redo"]) for s in shards)  # else the cached arrays, no copy
        arrays = {f: cached[f].copy() if changed else cached[f] for f in VERDICT_FIELDS}
        bad = dict(zip(cached["bad_index"].tolist(),
                       _unblob(cached["bad_reason"], len(cached["bad_index"]))))
    else:
        arrays = {"kind": np.full(n, check.BAD, np.uint8), "height": np.zeros(n, np.int32),
                  "width": np.zeros(n, np.int32), "colour": np.zeros(n, bool),
                  "deep": np.zeros(n, bool), "nbytes": np.zeros(n, np.int64)}
        bad = {}
    size, mtime = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    seen = np.zeros(n, np.uint8)
    for s in shards:
        size[s["index"]], mtime[s["index"]] = s["size"], s["mtime"]
        seen[s["index"]] += 1
        for i in s["redo"].tolist():
            bad.pop(i, None)
        for f in VERDICT_FIELDS:
            arrays[f][s["redo"]] = s[f]
        bad.update(s["bad"])
    if not (seen == 1).all():
        raise RuntimeError("the shards of the check do not cover every file once")
    result = check.ScanResult(files, **arrays)
    result.bad = sorted(bad.items())
    return result, size, mtime


def checked(files: list, root=None, *, rank: int = 0, world_size: int = 1,
            recheck: bool = False, threads: int | None = None,
            log: Callable[[str], None] = print, gather=None) -> check.ScanResult:
    """The check's verdict on ``files`` (module docstring): cached, sharded over the ranks of a
    process group of ``world_size`` (else this process checks every file), refreshed for files
    whose size or time changed. ``gather(obj) -> [obj of each rank]`` overrides the group."""
    files = files if isinstance(files, list) else list(files)
    key = _list_digest(files)
    path = cache_folder(root) / f"check-{key[:20]}.npz"
    cached = None if recheck else read(path, "verdict", key, log)
    gather = gather or _gather_for(world_size)
    if gather is None:
        rank, world_size = 0, 1
    if gather is not None and not all(gather(cached is not None)):
        cached = None  # every rank must start from the same verdict
    shard = check_shard(files, rank, world_size, cached, threads)
    shards = gather(shard) if gather is not None else [shard]
    result, size, mtime = merge_shards(files, shards, cached)
    redone = sum(len(s["redo"]) for s in shards)
    if cached is not None and redone:
        log(f"{redone} of {len(files)} files changed since the cached check: checked again")
    if redone and rank == 0:
        _write_verdict(path, key, result, size, mtime)
    return result


def unchanged(files: list, root=None, log: Callable[[str], None] = print) \
        -> check.ScanResult | None:
    """The cached verdict on ``files`` when not one of them changed size or time since (else
    None, and nothing is checked): what ``pack`` plans from after a run checked the data."""
    key = _list_digest(files)
    cached = read(cache_folder(root) / f"check-{key[:20]}.npz", "verdict", key, log)
    if cached is None:
        return None
    size, mtime = stat_files(files)
    if not (np.array_equal(size, cached["size"]) and np.array_equal(mtime, cached["mtime"])):
        return None
    result = check.ScanResult(files, **{f: cached[f] for f in VERDICT_FIELDS})
    result.bad = list(zip(cached["bad_index"].tolist(),
                          _unblob(cached["bad_reason"], len(cached["bad_index"]))))
    return result


def remember(result: check.ScanResult, root, size, mtime) -> None:
    """Cache a verdict on ``result.files`` (each file's ``size`` and ``mtime`` as it was read)
    that was found outside :func:`checked` (``pack`` checks the files as it decodes them)."""
    key = _list_digest(result.files)
    _write_verdict(cache_folder(root) / f"check-{key[:20]}.npz", key, result, size, mtime)


def _write_verdict(path: Path, key: str, result: check.ScanResult, size, mtime) -> None:
    write(path, "verdict", key,
          dict(size=size, mtime=mtime,
               bad_index=np.asarray([i for i, _ in result.bad], np.int64),
               bad_reason=_blob([r for _, r in result.bad]),
               **{f: getattr(result, f) for f in VERDICT_FIELDS}),
          n=len(result.files))
