"""The start-up caches (pipelines/startup.py): the check's verdict reused and refreshed, a forced
check, the check sharded over ranks, damaged cache files, the cached listing."""
import json
import os
import shutil

import numpy as np
import pytest

from pgnm_fast.pipelines import check, open_source, startup
from pgnm_fast.synth import make_synthetic


@pytest.fixture
def folders(tmp_path):
    """A writable class-folder set of 39 small PNGs (13 classes x 3, train/val/test)."""
    return make_synthetic(tmp_path / "set", images=39 * 2, seed=5, size=16, layout="folders")


@pytest.fixture
def probes(monkeypatch):
    """The files the check reads, in the order it reads them."""
    seen = []
    real = check.probe

    def counting(path):
        seen.append(path)
        return real(path)
    monkeypatch.setattr(check, "probe", counting)
    return seen


def _files(root, split="train"):
    return open_source(root).split(split).files


def _same(a: check.ScanResult, b: check.ScanResult):
    for f in startup.VERDICT_FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.bad == b.bad


def _check(files, root, lines=None, **kw):
    return startup.checked(files, root, log=(lines.append if lines is not None else print), **kw)


def test_verdict_reused_then_refreshed_for_a_changed_file(folders, probes):
    files = _files(folders)
    first = _check(files, folders)
    assert sorted(probes) == sorted(files)
    probes.clear()
    _same(_check(files, folders), first)
    assert probes == []                               # reused: no file read
    # a new size: that file alone is read again, and the verdict follows it (now bad)
    with open(files[3], "r+b") as f:
        f.truncate(20)
    lines = []
    again = _check(files, folders, lines)
    assert probes == [files[3]]
    assert [i for i, _ in again.bad] == [3] and "truncated" in again.bad[0][1]
    assert any("1 of" in line for line in lines)
    # a new modification time, same size and bytes: read again
    probes.clear()
    st = os.stat(files[5])
    os.utime(files[5], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    _same(_check(files, folders), again)
    assert probes == [files[5]]
    probes.clear()
    _check(files, folders)
    assert probes == []


def test_added_or_removed_file_checks_the_new_list(folders, probes):
    files = _files(folders)
    _check(files, folders)
    probes.clear()
    extra = os.path.join(os.path.dirname(files[0]), "zz_added.png")
    shutil.copyfile(files[0], extra)
    grown = _files(folders)
    assert extra in grown and len(grown) == len(files) + 1
    _check(grown, folders)
    assert sorted(probes) == sorted(grown)
    probes.clear()
    os.remove(files[1])
    shrunk = _files(folders)
    assert files[1] not in shrunk
    _check(shrunk, folders)
    assert sorted(probes) == sorted(shrunk)


def test_forced_check_finds_a_file_broken_behind_the_cache(folders):
    files = _files(folders)
    assert _check(files, folders).bad == []
    # flip a byte inside the image data, then restore size and times: the key cannot see it
    st = os.stat(files[2])
    with open(files[2], "r+b") as f:
        f.seek(st.st_size - 20)
        b = f.read(1)
        f.seek(st.st_size - 20)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _check(files, folders).bad == []               # trusted cache, by design
    forced = _check(files, folders, recheck=True)
    assert [i for i, _ in forced.bad] == [2] and "CRC" in forced.bad[0][1]
    assert [i for i, _ in _check(files, folders).bad] == [2]  # the forced verdict is cached


@pytest.mark.parametrize("world", [2, 3, 5])
def test_sharded_check_covers_every_file_once(folders, probes, world):
    files = _files(folders)
    with open(files[4], "wb") as f:
        f.write(b"not an image")
    whole = check.scan(files)
    shards = []
    for rank in range(world):
        probes.clear()
        shards.append(startup.check_shard(files, rank, world))
        assert sorted(probes) == sorted(files[rank::world])   # 1/world of the files read
    idx = np.concatenate([s["index"] for s in shards])
    assert sorted(idx.tolist()) == list(range(len(files)))
    merged, size, _mtime = startup.merge_shards(files, shards)
    _same(merged, whole)
    assert [i for i, _ in merged.bad] == [4]
    assert size.tolist() == [os.stat(f).st_size for f in files]
    with pytest.raises(RuntimeError, match="once"):
        startup.merge_shards(files, shards[:-1])


def test_check_in_chunks_over_processes_equals_one_pass(folders):
    files = _files(folders) + _files(folders, "val")
    with open(files[7], "wb") as f:
        f.write(b"")
    whole = check.scan(files, chunk=len(files) + 1)
    for chunk, processes in ((4, 0), (5, 2), (3, 3)):
        _same(check.scan(files, chunk=chunk, processes=processes), whole)
    assert [i for i, _ in whole.bad] == [7]


def test_checked_over_a_process_group_reads_one_shard_per_rank(folders, probes):
    """``checked`` on each of 3 ranks: the gather hands every rank the shards of all."""
    files, world = _files(folders), 3
    # the ranks run one after another here; each rank's gather returns what all ranks send,
    # computed by running the other ranks' shards (as the process group would deliver them)
    results = []
    for rank in range(world):
        probes.clear()

        def gather(obj, rank=rank):
            if isinstance(obj, bool):
                return [obj] * world
            return [obj if r == rank else startup.check_shard(files, r, world)
                    for r in range(world)]
        shard_reads = len(files[rank::world])
        results.append(startup.checked(files, None, rank=rank, world_size=world, recheck=True,
                                       gather=gather, log=print))
        assert len(probes) == len(files)  # its own shard plus the simulated others
        assert sorted(probes[:shard_reads]) == sorted(files[rank::world])
    for r in results[1:]:
        _same(r, results[0])
    _same(results[0], check.scan(files))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "version"])
def test_damaged_cache_file_is_ignored_with_one_line(folders, probes, damage):
    files = _files(folders)
    expected = _check(files, folders)
    (path,) = (startup.cache_folder(folders)).glob("check-*.npz")
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:  # the same arrays under another version number
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes())
        meta["version"] += 1
        with open(path, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    probes.clear()
    lines = []
    _same(_check(files, folders, lines), expected)
    assert len(lines) == 1 and str(path) in lines[0] and "ignored and rebuilt" in lines[0]
    assert ("another version" in lines[0]) == (damage == "version")
    assert sorted(probes) == sorted(files)   # checked afresh, not trusted
    probes.clear()
    lines.clear()
    _check(files, folders, lines)           # rebuilt: read without a word
    assert lines == [] and probes == []


def test_listing_cached_and_refreshed(folders, monkeypatch):
    src = open_source(folders)
    files = src.split("train").files
    assert list((folders / ".pgnm-fast").glob("listing-train-*.npz"))

    def no_read(self, name):
        raise AssertionError("listed again")
    from pgnm_fast.pipelines.sources import FolderSource
    real = FolderSource._read
    monkeypatch.setattr(FolderSource, "_read", no_read)
    again = open_source(folders)
    assert again.split("train").files == files and again.classes == src.classes
    np.testing.assert_array_equal(again.split("train").labels, src.split("train").labels)
    shutil.copyfile(files[0], os.path.join(os.path.dirname(files[0]), "zz_new.png"))
    with pytest.raises(AssertionError, match="listed again"):
        open_source(folders)
    monkeypatch.setattr(FolderSource, "_read", real)
    assert len(open_source(folders).split("train")) == len(files) + 1


def test_radimagenet_listing_keeps_the_class_rule(tmp_path):
    root = make_synthetic(tmp_path / "rin", images=39 * 2, seed=5, size=16)
    first = open_source(root)
    val = first.split("val")
    second = open_source(root)
    assert second.class_from == first.class_from == "path"
    again = second.split("val")
    assert again.files == val.files and again.classes == val.classes
    np.testing.assert_array_equal(again.labels, val.labels)


def test_unwritable_data_folder_caches_in_the_user_cache(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("PGNM_FAST_CACHE", str(tmp_path / "user-cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(str(folders))
                        else real_access(p, m))
    where = startup.cache_folder(folders)
    assert str(where).startswith(str(tmp_path / "user-cache"))
    files = _files(folders)
    _check(files, folders)
    assert list(where.glob("check-*.npz"))


def _rank_main(rank, world, init, files, root, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        read = []
        real = check.probe
        check.probe = lambda p: (read.append(p), real(p))[1]
        result = startup.checked(files, root, rank=rank, world_size=world, log=lambda s: None)
        with open(f"{out}-{rank}.json", "w") as f:
            json.dump({"read": read, "kind": result.kind.tolist(), "bad": result.bad}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_checked_over_a_real_process_group(folders, tmp_path, probes):
    """Two gloo processes: each reads its half, both get the whole verdict, rank 0 caches it."""
    import torch.multiprocessing as mp
    files, world = _files(folders), 2
    with open(files[1], "wb") as f:
        f.write(b"not an image")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_main, args=(world, init, files, str(folders), str(tmp_path / "rank")),
             nprocs=world, join=True)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(world)]
    for r, got in enumerate(ranks):
        assert sorted(got["read"]) == sorted(files[r::world])
        assert got["kind"] == ranks[0]["kind"] and got["bad"] == ranks[0]["bad"]
    assert [i for i, _ in ranks[0]["bad"]] == [1]
    assert ranks[0]["kind"] == check.scan(files).kind.tolist()
    probes.clear()
    cached = startup.checked(files, folders, log=print)     # rank 0 wrote the merged verdict
    assert probes == [] and [list(b) for b in cached.bad] == ranks[0]["bad"]


def test_stat_files_in_threads_equals_one_pass(folders):
    """Sizes and times of a list long enough for several chunks, one path missing in the middle:
    the same from threads as from one pass, -1 for the missing one alone."""
    files = _files(folders) * (20_000 // len(_files(folders)) + 1)
    files[12_345] = str(folders / "train" / "gone.png")
    one = startup.stat_files(files, threads=1)
    for threads in (None, 3):
        many = startup.stat_files(files, threads=threads)
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)
    size, mtime = one
    assert size[12_345] == mtime[12_345] == -1 and (np.delete(size, 12_345) > 0).all()
    assert size[0] == os.stat(files[0]).st_size and mtime[1] == os.stat(files[1]).st_mtime_ns
