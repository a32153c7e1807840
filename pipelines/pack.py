"""`pgnm-fast pack`: decode every image once into one memory-mapped uint8 array (the format and
its reader: :mod:`.packed`).

Pixels follow the loaders' decoding rules (:func:`pgnm_fast.pipelines.transforms.load_grey`):
8-bit grey as stored; 16-bit and other high-depth images windowed per image by min-max to 0..255
(rounded, a constant image becomes 0); colour images in a grey set converted by PIL's ITU-R
601-2 luma. ``channels="auto"`` stores RGB (3 channels) only when every image is colour, else grey.

Each file is read once, by the process that decodes it: it is checked there as the pre-epoch
check does (:func:`.check.probe_data`: chunk CRCs, the image data inflated to exactly the size
its header implies), and an 8-bit grey PNG is decoded from those inflated bytes (PIL unfilters
them; nothing is inflated twice). The plan before any write reads each file's PNG header and
last chunk only (:func:`.check.probe_header`; other files are checked in full there), or takes
the verdict a run cached on the same, unchanged files (:mod:`.startup`); what the decoders find
is cached as that verdict for the runs that follow. With ``--on-bad-image error`` a file whose
header or end is wrong stops the pack before anything is written; one whose chunks or image
data are broken inside stops it as it is decoded, naming the file, and a pack that this command
started is removed again (nothing half-written is left). ``--on-bad-image skip`` lists both.

Writing is resumable and atomic: work goes into ``CACHE/.partial/`` (a plan, the preallocated
data file, one marker per finished chunk of records written after the chunk's bytes are synced).
Running the same command again skips the finished chunks; a changed source is refused. The
finished files are renamed into place and ``manifest.json`` is written last.

A MedMNIST file (images already arrays, :mod:`.medmnist`) is packed by :mod:`.pack_arrays`.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pgnm_fast.atomic import atomic_open, remove_stale_temporaries, write_error
from pgnm_fast.errors import DataError
from pgnm_fast.folders import LOCK_FILE, check_output_dir, lock_folder

from . import badfiles, check, startup
from .decode import decode_checked, read_file
from .packed import (  # noqa: F401
    DATA,
    FORMAT,
    MANIFEST,
    PARTIAL,
    PATHS,
    RECORD_DTYPE,
    RECORDS,
    SKIPPED,
    VERSION,
    PackedCache,
    PackedSource,
    PackedSplit,
    open_packed,
    pixel_hash,
    renew_seal,
    sha256_file,
    verify,
)
from .sources import SPLITS, DataSource, open_source

RULES = {"window": "images deeper than 8 bits: per-image min-max to 0..255, round half to even; "
                   "a constant image becomes 0",
         "colour": "grey caches: colour images become grey by PIL's ITU-R 601-2 luma, alpha "
                   "dropped first",
         "hash": "blake2b, 8-byte digest, of each record's stored pixels (little-endian uint64)"}


def _pack_chunk(job):
    """Check and decode the records of one chunk and write them at their offsets; runs in a
    worker. Returns (chunk index, content hashes, [(position in chunk, reason)], the check's
    kind of each record)."""
    k, data_path, entries, channels = job
    try:
        return _pack_entries(k, data_path, entries, channels)
    except OSError as e:  # a full disk: one line naming the file, not a worker's traceback
        raise write_error(data_path, e) from None


def _pack_entries(k, data_path, entries, channels):
    hashes, bad, kinds = [], [], []
    fd = os.open(data_path, os.O_WRONLY)
    try:
        for pos, (path, offset, height, width) in enumerate(entries):
            try:
                data = read_file(path)
            except OSError as e:
                found, buf = check.Probe(check.BAD, reason=f"cannot read file "
                                                            f"({e.strerror or e})"), None
            else:
                try:
                    found, buf = decode_checked(data, path, channels)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    found, buf = check.Probe(check.BAD, reason="cannot decode image (" + (
                        " ".join(str(e).split()) or type(e).__name__) + ")"), None
            if buf is not None and (found.height, found.width) != (height, width):
                found, buf = check.Probe(check.BAD, reason=(
                    f"image size changed since the scan ({width}x{height} -> "
                    f"{found.width}x{found.height})")), None
            kinds.append(found.kind)
            if buf is None:
                bad.append((pos, found.reason))
                hashes.append(0)
                continue
            os.pwrite(fd, buf, offset)
            hashes.append(pixel_hash(buf))
    finally:  # synced by the packer before it marks the chunk done

        os.close(fd)
    return k, hashes, bad, kinds


def _die_with_parent(parent: int) -> None:
    """Worker initializer: the kernel ends this worker when the packer dies, however it dies
    (a SIGKILL runs no cleanup that could stop the pool)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still applies
        return
    if os.getppid() != parent:  # the packer died before the call above
        os._exit(1)


# ----------------------------------------------------------------------------- the packer
@dataclass
class _Plan:
    paths: list
    split: np.ndarray
    label: np.ndarray
    height: np.ndarray
    width: np.ndarray
    nbytes: np.ndarray
    channels: int
    offset: np.ndarray = None
    skipped: list = field(default_factory=list)
    converted: dict = field(default_factory=dict)
    verdict: check.ScanResult = None  # on every listed file, from the headers or the cache
    keep: np.ndarray = None           # the index in ``verdict`` of each planned record
    fresh: list = field(default_factory=list)  # (files, root, first index, size, mtime) of
    # each split planned from the headers: its verdict is cached once the decoders checked it

    @property
    def total(self) -> int:
        return int(self.offset[-1] + self.height[-1] * self.width[-1] * self.channels) \
            if len(self.paths) else 0


def _plan(source: DataSource, on_bad_image: str, channels: str, threads, log,
          recheck: bool = False) -> _Plan:
    paths, split_code, labels, scans, fresh = [], [], [], [], []
    t0 = time.perf_counter()
    for name in source.splits:
        part = source.split(name)
        # the verdict a run cached on these unchanged files (.startup), else the headers
        scan = None if recheck else startup.unchanged(part.files, part.root, log)
        if scan is None:
            scan, size, mtime = check.scan_headers(part.files, threads)
            fresh.append((part.files, part.root, len(paths), size, mtime))
        scans.append(scan)
        paths += part.files
        split_code += [SPLITS.index(name)] * len(part)
        labels.append(part.labels)
    badfiles.report_bad(source.problems, on_bad_image, None, log, what="entry")
    scan = _concatenate(paths, scans)
    read = sum(len(f[0]) for f in fresh)
    log(f"planned {len(paths)} files in {time.perf_counter() - t0:.1f} s ("
        + (f"the headers of {read} read, " if read else "")
        + f"{len(paths) - read} from the cached check)")
    keep = scan.good
    bad = [(paths[i], reason) for i, reason in scan.bad]
    badfiles.report_bad(bad, on_bad_image, None, log)  # raises under "error", before any write
    colour, deep = scan.colour[keep], scan.deep[keep]
    if channels == "auto":
        channels = "rgb" if len(keep) and colour.all() else "grey"
    nch = {"grey": 1, "rgb": 3}.get(channels)
    if nch is None:
        raise DataError(f"--channels must be auto, grey or rgb, not {channels!r}")
    plan = _Plan([paths[i] for i in keep], np.asarray(split_code, np.uint8)[keep],
                 np.concatenate(labels)[keep], scan.height[keep], scan.width[keep],
                 scan.nbytes[keep], nch, skipped=list(source.problems) + bad, verdict=scan,
                 keep=keep, fresh=fresh)
    sizes = plan.height * plan.width * nch
    plan.offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    plan.converted = {"deeper_than_8_bits": int(deep.sum()),
                      "colour_to_grey": int(colour.sum()) if nch == 1 else 0}
    return plan


def _remember(plan: _Plan, kinds: np.ndarray, decode_bad: list) -> None:
    """Cache the verdict on each split planned from its headers: the decoders' ``kinds`` of the
    planned records, and ``decode_bad`` [(index, reason)] found bad as they were decoded."""
    if not plan.fresh:
        return
    v = plan.verdict
    kind = v.kind.copy()
    kind[plan.keep] = kinds
    bad = dict(v.bad)
    bad.update(decode_bad)
    for files, root, first, size, mtime in plan.fresh:
        end = first + len(files)
        part = check.ScanResult(files, kind[first:end], v.height[first:end].astype(np.int32),
                                v.width[first:end].astype(np.int32), v.colour[first:end].copy(),
                                v.deep[first:end].copy(), v.nbytes[first:end])
        gone = np.flatnonzero(part.kind == check.BAD)
        part.height[gone] = part.width[gone] = 0
        part.colour[gone] = part.deep[gone] = False
        part.bad = [(i - first, r) for i, r in sorted(bad.items()) if first <= i < end]
        startup.remember(part, root, size, mtime)


def _concatenate(paths: list, scans: list) -> check.ScanResult:
    """One verdict over ``paths`` from the verdicts of its splits, in order."""
    arrays = {f: np.concatenate([getattr(r, f) for r in scans]) if scans else np.zeros(0)
              for f in startup.VERDICT_FIELDS}
    arrays["height"], arrays["width"] = (arrays[f].astype(np.int64) for f in ("height", "width"))
    result = check.ScanResult(paths, **arrays)
    base = 0
    for r in scans:
        result.bad += [(base + i, reason) for i, reason in r.bad]
        base += len(r.files)
    return result


def _fingerprint(source: DataSource, plan: _Plan, on_bad_image: str) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, VERSION, str(source.root), source.layout,
                                   list(source.classes), plan.channels, on_bad_image]).encode())
    for arr in (plan.split, plan.label, plan.height, plan.width, plan.nbytes):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    h.update("\n".join(plan.paths).encode())
    return h.hexdigest()


def pack(data, out, *, on_bad_image: str = "error", channels: str = "auto",
         workers: int | None = None, chunk_size: int = 256, log=print,
         after_chunk=None, recheck: bool = False) -> dict:
    """Pack the data set at ``data`` into the cache folder ``out`` (module docstring); returns
    the manifest. ``workers``: decoding processes (0: in this process; default: the CPU count).
    ``after_chunk(k)`` is called after each finished chunk (progress; tests interrupt there).
    ``recheck``: check the files afresh instead of reusing the cached verdict (.startup)."""
    badfiles.check_on_bad(on_bad_image)
    out = Path(out)
    _check_unfinished(out)
    check_output_dir(out, "--out")
    source = open_source(data, skip_bad=on_bad_image == "skip")
    if source.layout == "packed":
        raise DataError(f"{data}: is already a packed cache")
    if source.layout == "medmnist":  # arrays in memory: nothing to check or decode
        from .pack_arrays import pack_arrays
        with lock_folder(out, "cache folder"):
            _check_unfinished(out)
            return pack_arrays(source, out, channels, log)
    plan = _plan(source, on_bad_image, channels, None, log, recheck)
    if not plan.paths:
        raise DataError(f"{data}: no readable image to pack")
    with lock_folder(out, "cache folder"):  # one packer per folder
        _check_unfinished(out)
        for folder in (out, out / PARTIAL, out / PARTIAL / "chunks"):
            remove_stale_temporaries(folder)  # of a killed atomic write
        return _pack_locked(source, plan, out, on_bad_image, workers, chunk_size, log,
                            after_chunk)


def _check_unfinished(out: Path) -> None:
    if (out / MANIFEST).is_file():
        raise DataError(f"{out}: already holds a finished cache ({MANIFEST}); check it with "
                        f"pgnm-fast pack --verify {out}, or choose another --out")


def _pack_locked(source, plan, out, on_bad_image, workers, chunk_size, log, after_chunk):
    work = out / PARTIAL
    fingerprint = _fingerprint(source, plan, on_bad_image)
    plan_file = work / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old.get("fingerprint") != fingerprint:
            raise DataError(f"{work}: an interrupted pack of other data or options (the source "
                            f"changed since?); delete {work} to start again")
        log(f"resuming the interrupted pack in {work}")
    elif out.exists() and any(p.name not in (PARTIAL, LOCK_FILE) for p in out.iterdir()):
        raise DataError(f"{out}: not empty and not an interrupted pack; choose another --out")
    fresh = not plan_file.is_file()
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    data_path = work / DATA
    if not data_path.exists() and (out / DATA).is_file() \
            and (out / DATA).stat().st_size == plan.total:
        os.replace(out / DATA, data_path)  # interrupted between the last two renames
    if not plan_file.is_file():
        try:
            with open(data_path, "wb") as f:
                f.truncate(plan.total)  # sparse until written
        except OSError as e:
            raise write_error(data_path, e) from None
        with atomic_open(plan_file, "w") as f:
            json.dump({"fingerprint": fingerprint, "records": len(plan.paths),
                       "bytes": plan.total, "chunk_size": chunk_size}, f)
    else:
        chunk_size = json.loads(plan_file.read_text())["chunk_size"]
        if not data_path.is_file() or data_path.stat().st_size != plan.total:
            raise DataError(f"{data_path}: missing or of the wrong size; delete {work} to start "
                            f"again")
    try:
        results = _run_chunks(plan, data_path, work / "chunks", chunk_size, workers, log,
                              after_chunk, on_bad_image)
    except DataError:  # a bad file found as it was decoded, under "error"
        if fresh:
            shutil.rmtree(work, ignore_errors=True)  # this command's pack: leave nothing
        raise
    return _finish(source, plan, results, out, work, on_bad_image, log)


def _jobs(plan, todo, data_path, chunk_size):
    """The work of each chunk ``k`` in ``todo``: (k, data file, [(path, offset, height, width)]
    of its records, channels)."""
    for k in todo:
        span = range(k * chunk_size, min((k + 1) * chunk_size, len(plan.paths)))
        yield (k, str(data_path), [(plan.paths[i], int(plan.offset[i]), int(plan.height[i]),
                                    int(plan.width[i])) for i in span], plan.channels)


def _run_chunks(plan, data_path, chunk_dir, chunk_size, workers, log, after_chunk, on_bad_image):
    n_chunks = -(-len(plan.paths) // chunk_size)
    done = {int(p.stem) for p in chunk_dir.glob("*.json")}
    todo = [k for k in range(n_chunks) if k not in done]
    if done:
        log(f"{len(done)} of {n_chunks} chunks already packed")
    jobs = _jobs(plan, todo, data_path, chunk_size)
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    t0, n_done = time.perf_counter(), 0
    images = [min(chunk_size, len(plan.paths) - k * chunk_size) for k in todo]
    bar = tqdm(total=sum(images), unit="img", unit_scale=True, desc="pack", disable=None,
               mininterval=1.0, smoothing=0.05)

    def record(result):
        nonlocal n_done
        k, hashes, bad, kinds = result
        try:  # the chunk's bytes on disk before its marker (the workers go on meanwhile)
            os.fsync(sync)
        except OSError as e:
            raise write_error(data_path, e) from None
        with atomic_open(chunk_dir / f"{k:06d}.json", "w") as f:
            json.dump({"hashes": [f"{h:016x}" for h in hashes], "bad": bad,
                       "kinds": "".join(map(str, kinds))}, f)
        n_done += 1
        bar.update(len(hashes))
        if bad and on_bad_image == "error":  # stop at the first undecodable file
            base = k * chunk_size
            badfiles.report_bad([(plan.paths[base + p], r) for p, r in bad], "error")
        if bar.disable and (n_done % max(1, len(todo) // 10) == 0 or n_done == len(todo)):
            seconds = time.perf_counter() - t0
            rate = sum(images[:n_done]) / max(seconds, 1e-9)
            left = sum(images[n_done:]) / max(rate, 1e-9)
            log(f"packed chunk {n_done}/{len(todo)} ({seconds:.1f} s, {rate:.0f} images/s, "
                f"{left:.0f} s left)")
        if after_chunk is not None:
            after_chunk(k)

    sync = os.open(data_path, os.O_RDONLY)
    try:
        if workers <= 0:
            for job in jobs:
                record(_pack_chunk(job))
        else:  # in order, at most 4 chunks per worker in flight (Executor.map submits them all)
            with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                pending = collections.deque()
                for job in jobs:
                    pending.append(pool.submit(_pack_chunk, job))
                    if len(pending) >= 4 * workers:
                        record(pending.popleft().result())
                while pending:
                    record(pending.popleft().result())
    finally:
        bar.close()
        os.close(sync)
    results = {}
    for k in range(n_chunks):
        results[k] = json.loads((chunk_dir / f"{k:06d}.json").read_text())
    return results


def _finish(source, plan, results, out, work, on_bad_image, log) -> dict:
    chunk_size = json.loads((work / "plan.json").read_text())["chunk_size"]
    hashes = np.zeros(len(plan.paths), np.uint64)
    keep = np.ones(len(plan.paths), bool)
    kinds = plan.verdict.kind[plan.keep]
    decode_bad, decode_bad_at, all_kinds = [], [], True
    for k, res in results.items():
        base = k * chunk_size
        hashes[base:base + len(res["hashes"])] = [int(h, 16) for h in res["hashes"]]
        if "kinds" in res:
            kinds[base:base + len(res["kinds"])] = np.frombuffer(res["kinds"].encode(),
                                                                 np.uint8) - ord("0")
        else:  # a chunk of an older pack: its files were checked before it
            all_kinds = False
        for pos, reason in res["bad"]:
            keep[base + pos] = False
            decode_bad.append((plan.paths[base + pos], reason))
            decode_bad_at.append((int(plan.keep[base + pos]), reason))
    if all_kinds:
        _remember(plan, kinds, decode_bad_at)
    badfiles.report_bad(decode_bad, on_bad_image, None, log)  # "error": the chunks stay done
    skipped = plan.skipped + decode_bad
    idx = np.flatnonzero(keep)
    rec = np.zeros(len(idx), RECORD_DTYPE)
    for name, arr in (("offset", plan.offset), ("height", plan.height), ("width", plan.width),
                      ("split", plan.split), ("label", plan.label), ("hash", hashes),
                      ("source_bytes", plan.nbytes)):
        rec[name] = arr[idx]
    rec["channels"] = plan.channels
    with atomic_open(out / RECORDS, "wb") as f:
        np.save(f, rec, allow_pickle=False)
    with atomic_open(out / PATHS, "w") as f:
        f.writelines(plan.paths[i] + "\n" for i in idx)
    if skipped:
        with atomic_open(out / SKIPPED, "w") as f:
            f.writelines(f"{p}\t{r}\n" for p, r in skipped)
    os.replace(work / DATA, out / DATA)
    manifest = {
        "format": FORMAT, "version": VERSION, "classes": list(source.classes),
        "channels": plan.channels, "records": int(len(idx)),
        "splits": {name: int((rec["split"] == SPLITS.index(name)).sum())
                   for name in SPLITS if (rec["split"] == SPLITS.index(name)).any()},
        "data": {"file": DATA, "bytes": plan.total},
        "records_file": {"file": RECORDS, "sha256": sha256_file(out / RECORDS)},
        "paths_file": {"file": PATHS, "sha256": sha256_file(out / PATHS)},
        "source": {"root": str(source.root), "layout": source.layout},
        "skipped": len(skipped), "converted": plan.converted, "rules": RULES,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    renew_seal(out, manifest)  # manifest.json last: a folder with one is a finished cache
    shutil.rmtree(work, ignore_errors=True)
    gib = plan.total / 2 ** 30
    sizes = ", ".join(f"{k} {v}" for k, v in manifest["splits"].items())
    log(f"packed {len(idx)} images ({sizes}; {'grey' if plan.channels == 1 else 'RGB'}, "
        f"{gib:.2f} GiB) into {out}"
        + (f"; skipped {len(skipped)} (listed in {out / SKIPPED})" if skipped else ""))
    return manifest
