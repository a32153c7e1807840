"""The packed cache: same samples as the source layouts, interrupt/resume/verify round trips,
every bad-file rule, RGB caches, the plain loader over a cache and the `pack` command."""
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pgnm_fast.pipelines.decode as decodemod
import pgnm_fast.pipelines.pack as packmod
from pgnm_fast.cli import main
from pgnm_fast.errors import DataError
from pgnm_fast.pipelines import open_source
from pgnm_fast.pipelines.factory import make_loader
from pgnm_fast.pipelines.loader import build_cached_loader, build_loader
from pgnm_fast.pipelines.pack import MANIFEST, pack, verify
from pgnm_fast.pipelines.transforms import load_grey


def quiet(*_):
    pass


# ----------------------------------------------------------------------------- round trips
def test_cache_has_the_sources_samples_labels_and_pixels(synth_root, synth_folders_root, packed):
    rin, folders, cache = (open_source(p) for p in (synth_root, synth_folders_root, packed))
    assert cache.layout == "packed" and cache.classes == rin.classes == folders.classes
    assert cache.splits == rin.splits == ["train", "val", "test"]
    for name in cache.splits:
        a, c, f = rin.split(name), cache.split(name), folders.split(name)
        assert c.files == a.files and np.array_equal(c.labels, a.labels)
        by_name = {Path(p).name: lab for p, lab in zip(f.files, f.labels)}
        assert {Path(p).name: lab for p, lab in zip(c.files, c.labels)} == by_name
        for i, path in enumerate(c.files):  # every record, bit for bit
            assert np.array_equal(c.cache.image(c.records[i])[:, :, 0], np.asarray(load_grey(path)))
    manifest = json.loads((packed / MANIFEST).read_text())
    assert manifest["channels"] == 1 and manifest["skipped"] == 0
    assert manifest["splits"] == {n: len(rin.split(n)) for n in rin.splits}


def test_plain_loader_gives_the_same_batches_from_cache_and_files(synth_root, packed):
    """Same pixels, same sampler and seeding: bit-identical train and eval batches."""
    for train in (True, False):
        kw = dict(train=train, batch_size=16, crop_size=24, resize_size=27, workers=0, seed=5)
        name = "train" if train else "val"
        torch.manual_seed(0)
        from_files = list(build_loader(open_source(synth_root).split(name), **kw))
        torch.manual_seed(0)
        from_cache = list(build_cached_loader(open_source(packed).split(name), **kw))
        assert len(from_files) == len(from_cache) > 1
        for (xa, ya), (xb, yb) in zip(from_files, from_cache):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_interrupted_pack_resumes_to_the_same_bytes(synth_root, packed, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the third chunk (its first records already written, no marker):
    the cache is unusable and says why; the same call then decodes only what is left and ends
    byte-identical to an uninterrupted pack, and verifies."""
    out, real, calls = tmp_path / "cache", packmod.decode_checked, []

    def interrupted(data, path, channels):
        calls.append(path)
        if len(calls) == 150:
            raise KeyboardInterrupt
        return real(data, path, channels)

    monkeypatch.setattr(packmod, "decode_checked", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(synth_root, out, workers=0, chunk_size=64, log=quiet)
    assert not (out / MANIFEST).exists()
    assert sorted(p.name for p in (out / ".partial" / "chunks").iterdir()) == \
        ["000000.json", "000001.json"]
    with pytest.raises(DataError, match="interrupted pack"):
        open_source(out)
    with pytest.raises(DataError, match="no manifest.json"):
        verify(out, log=quiet)
    calls.clear()
    logs = []
    pack(synth_root, out, workers=0, chunk_size=64, log=logs.append)
    assert any("resuming" in line for line in logs)
    assert len(calls) == 260 - 128  # chunks 0 and 1 were kept
    for name in ("images.u8", "records.npy", "paths.txt"):
        assert (out / name).read_bytes() == (packed / name).read_bytes(), name
    assert not (out / ".partial").exists()
    verify(out, log=quiet)


def test_interruption_between_the_final_renames(synth_root, packed, tmp_path, monkeypatch):
    out, real = tmp_path / "cache", packmod.sha256_file

    def crash(path):
        raise KeyboardInterrupt  # after images.u8 was moved, before the manifest

    monkeypatch.setattr(packmod, "sha256_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pack(synth_root, out, workers=0, chunk_size=64, log=quiet)
    assert (out / "images.u8").exists() and not (out / MANIFEST).exists()
    monkeypatch.setattr(packmod, "sha256_file", real)
    pack(synth_root, out, workers=0, chunk_size=64, log=quiet)
    assert (out / "images.u8").read_bytes() == (packed / "images.u8").read_bytes()
    verify(out, log=quiet)


def test_resume_refuses_a_changed_source(synth_copy, tmp_path, monkeypatch):
    out, real = tmp_path / "cache", packmod.decode_checked
    monkeypatch.setattr(packmod, "decode_checked",
                        lambda d, p, c: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pack(synth_copy, out, workers=0, log=quiet)
    monkeypatch.setattr(packmod, "decode_checked", real)
    victim = open_source(synth_copy).split("train").files[3]
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 50), np.uint8)).save(victim)
    with pytest.raises(DataError, match="source changed"):
        pack(synth_copy, out, workers=0, log=quiet)


def test_pack_refuses_a_cache_as_data_and_a_busy_folder(packed, synth_root, tmp_path):
    with pytest.raises(DataError, match="already a packed cache"):
        pack(packed, tmp_path / "again", log=quiet)
    with pytest.raises(DataError, match="already holds a finished cache"):
        pack(synth_root, packed, log=quiet)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        pack(synth_root, tmp_path / "busy", log=quiet)


def test_verify_names_a_flipped_byte_truncation_and_edits(packed, tmp_path):
    c = Path(shutil.copytree(packed, tmp_path / "c"))
    verify(c, log=quiet)
    cache = open_source(c).split("val")
    k = int(cache.records[7])
    rec = np.load(c / "records.npy")
    data = bytearray((c / "images.u8").read_bytes())
    pos = int(rec["offset"][k]) + int(np.random.default_rng(2).integers(0, 48 * 48))
    data[pos] ^= 0x10
    (c / "images.u8").write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        verify(c, log=quiet)
    msg = str(e.value)
    assert str(c / "images.u8") in msg and f"record {k} " in msg and cache.files[7] in msg
    data[pos] ^= 0x10
    (c / "images.u8").write_bytes(bytes(data[:-100]))  # truncated array
    with pytest.raises(DataError, match=r"images\.u8: \d+ bytes, the manifest says \d+ \(trunc"):
        verify(c, log=quiet)
    with pytest.raises(DataError, match="truncated"):
        open_source(c)  # the trainer refuses it too, cheaply, before reading
    (c / "images.u8").write_bytes(bytes(data))
    verify(c, log=quiet)
    good = (c / "records.npy").read_bytes()
    (c / "records.npy").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(DataError, match=r"records\.npy: content differs"):
        verify(c, log=quiet)
    (c / "records.npy").write_bytes(good)
    (c / MANIFEST).unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        verify(c, log=quiet)


# ----------------------------------------------------------------------------- bad files
def _png(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _tiny_set(root, seed=0, classes=("a", "b", "c"), per_class=4, colour=False):
    """A small class-folder set of random images (train, val), sizes 12-20 pixels."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                shape = (int(rng.integers(12, 21)), int(rng.integers(12, 21)))
                shape += (3,) if colour else ()
                _png(root / split / c / f"{c}{i}.png", rng.integers(0, 256, shape, np.uint8))
    return root


def _with_valid_crcs(data: bytes, idat_index: int) -> bytes:
    """Flip a byte inside the IDAT payload and recompute that chunk's CRC: the structure is
    intact, the compressed stream is broken."""
    pos = 8
    while True:
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == b"IDAT":
            body = bytearray(data[pos + 8:pos + 8 + length])
            body[idat_index % length] ^= 0xFF
            crc = struct.pack(">I", zlib.crc32(bytes(body), zlib.crc32(b"IDAT")))
            return data[:pos + 8] + bytes(body) + crc + data[pos + 12 + length:]
        pos += 12 + length


def make_bad(root: Path, kind: str) -> str:
    """Put one bad file of `kind` into the set at `root`; returns its path."""
    target = root / "train" / "b" / "bad.png"
    good = (root / "train" / "b" / "b0.png").read_bytes()
    if kind == "zero-byte":
        target.write_bytes(b"")
    elif kind == "truncated":
        target.write_bytes(good[:len(good) * 2 // 3])
    elif kind == "corrupt-crc":
        data = bytearray(good)
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif kind == "corrupt-stream":
        target.write_bytes(_with_valid_crcs(good, 7))
    elif kind == "not-an-image":
        target.write_text("patient list, not an image\n")
    elif kind == "empty-class-folder":
        target = root / "val" / "c"
        shutil.rmtree(target)
        target.mkdir()
    else:
        raise ValueError(kind)
    return str(target)


REASONS = {"zero-byte": "empty file", "truncated": "truncated PNG", "corrupt-crc": "CRC mismatch",
           "corrupt-stream": "broken compressed image data", "not-an-image": "not an image",
           "empty-class-folder": "empty class folder"}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_bad_file_errors_by_default_and_is_listed_under_skip(tmp_path, kind):
    root = _tiny_set(tmp_path / "data")
    bad = make_bad(root, kind)
    with pytest.raises(DataError) as e:
        pack(root, tmp_path / "c1", workers=0, log=quiet)
    assert bad in str(e.value) and REASONS[kind] in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c1" / MANIFEST).exists()
    logs = []
    manifest = pack(root, tmp_path / "c2", workers=0, on_bad_image="skip", log=logs.append)
    listed = (tmp_path / "c2" / "skipped.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(bad + "\t") and REASONS[kind] in listed[0]
    assert manifest["skipped"] == 1 and any("skipped 1" in line for line in logs)
    cache = open_source(tmp_path / "c2")
    assert bad not in cache.split("train").files + cache.split("val").files
    expected = 4 * 3 * 2 - (4 if kind == "empty-class-folder" else 0)
    assert manifest["records"] == expected
    verify(tmp_path / "c2", log=quiet)


def test_missing_csv_row_errors_or_is_listed(synth_copy, tmp_path):
    gone = open_source(synth_copy).split("val").files[4]
    Path(gone).unlink()
    with pytest.raises(DataError, match="rows name files missing"):
        pack(synth_copy, tmp_path / "c1", workers=0, log=quiet)
    manifest = pack(synth_copy, tmp_path / "c2", workers=0, on_bad_image="skip", log=quiet)
    listed = (tmp_path / "c2" / "skipped.txt").read_text()
    assert listed.startswith(gone + "\tmissing file (RadiologyAI_val.csv row ")
    assert manifest["records"] == 259


def test_sixteen_bit_and_colour_images_in_a_grey_set_are_converted(tmp_path):
    root = _tiny_set(tmp_path / "data")
    rng = np.random.default_rng(4)
    deep = rng.integers(300, 60000, (15, 17)).astype(np.uint16)
    _png(root / "train" / "a" / "deep.png", deep)
    rgb = rng.integers(0, 256, (14, 16, 3), np.uint8)
    _png(root / "val" / "b" / "rgb.png", rgb)
    manifest = pack(root, tmp_path / "c", workers=0, log=quiet)
    assert manifest["channels"] == 1 and manifest["skipped"] == 0
    assert manifest["converted"] == {"deeper_than_8_bits": 1, "colour_to_grey": 1}
    cache = open_source(tmp_path / "c")
    window = np.rint((deep - deep.min()) * 255.0 / (deep.max() - deep.min()))
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    for name, want in (("deep.png", window), ("rgb.png", luma)):
        split = cache.split("train" if name == "deep.png" else "val")
        i = [Path(f).name for f in split.files].index(name)
        assert np.array_equal(split.cache.image(split.records[i])[:, :, 0], want.astype(np.uint8))


def test_an_all_colour_set_packs_as_rgb_and_reads_as_grey(tmp_path):
    root = _tiny_set(tmp_path / "data", colour=True)
    assert pack(root, tmp_path / "c", workers=0, log=quiet)["channels"] == 3
    src, cache = open_source(root).split("val"), open_source(tmp_path / "c").split("val")
    for i in range(len(src)):
        with Image.open(src.files[i]) as im:
            want = np.asarray(im.convert("RGB"))
            assert np.array_equal(cache.cache.image(cache.records[i]), want)
    kw = dict(train=False, batch_size=5, crop_size=12, resize_size=14, workers=0)
    for (xa, ya), (xb, yb) in zip(build_loader(src, **kw), build_cached_loader(cache, **kw)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # the same grey by PIL's luma


# ----------------------------------------------------------------------------- command line
def test_pack_command_and_training_from_the_cache(synth_root, tmp_path):
    runner = CliRunner()
    cache = tmp_path / "cache"
    r = runner.invoke(main, ["pack", "--data", str(synth_root), "--out", str(cache), "-j", "0"])
    assert r.exit_code == 0, r.output
    assert "packed 260 images" in r.output
    r = runner.invoke(main, ["pack", "--verify", str(cache)])
    assert r.exit_code == 0 and "all content hashes match" in r.output, r.output
    r = runner.invoke(main, ["pack", "--data", str(synth_root), "--out", str(cache)])
    assert r.exit_code == 2 and "already holds a finished cache" in r.output
    r = runner.invoke(main, ["pack", "--data", str(synth_root)])
    assert r.exit_code == 2 and "needs --data ROOT and --out CACHE" in r.output
    (cache / "images.u8").write_bytes(b"\0" * 10)
    r = runner.invoke(main, ["pack", "--verify", str(cache)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "images.u8" in r.output
    good = tmp_path / "good"
    pack(synth_root, good, workers=0, log=quiet)
    out = tmp_path / "run"
    r = runner.invoke(main, ["train", "--no-policy", "--data", str(good), "--out", str(out),
                             "--loader", "torch", "--epochs", "1", "-b", "16",
                             "--train-crop-size", "16", "--val-resize-size", "18",
                             "--val-crop-size", "16", "-j", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (out / "best.pt").exists() and str(good) in r.output


def test_make_loader_checks_files_before_the_first_batch(tmp_path):
    root = _tiny_set(tmp_path / "data", per_class=6)
    bad = make_bad(root, "truncated")
    with pytest.raises(DataError, match="truncated PNG") as e:
        make_loader(root, train=True, batch_size=4, crop_size=8, workers=0, backend="torch")
    assert bad in str(e.value)
    logs, listed = [], tmp_path / "bad.txt"
    loader = make_loader(root, train=True, batch_size=4, crop_size=8, workers=0,
                         backend="torch", on_bad_image="skip", bad_list=listed, log=logs.append)
    assert len(loader.dataset) == 18 and bad not in loader.dataset.files
    assert listed.read_text().startswith(bad + "\t") and "skipped 1 bad file" in logs[-1]
    assert sum(len(y) for _, y in loader) == 16


# ----------------------------------------------------------------------------- one read per file
def _png_filtered(path: Path, img: np.ndarray) -> None:
    """Write grey 8-bit ``img`` as a PNG whose rows cycle through the five filter types (None,
    Sub, Up, Average, Paeth), encoded here from their definitions."""
    x = img.astype(np.int32)
    prev, rows = np.zeros(x.shape[1], np.int32), []
    for r, cur in enumerate(x):
        left, upleft = np.r_[0, cur[:-1]], np.r_[0, prev[:-1]]
        p = left + prev - upleft
        pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        pred = [0 * cur, left, prev, (left + prev) // 2, paeth][r % 5]
        rows.append(bytes([r % 5]) + ((cur - pred) % 256).astype(np.uint8).tobytes())
        prev = cur

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind))))
    ihdr = struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("inflater", ["zlib", "isal"])
def test_grey_pixels_from_the_checked_rows_equal_pils_decode(tmp_path, monkeypatch, inflater):
    """The check inflates each PNG once; an 8-bit grey image's pixels come from those rows (no
    second decode), bit for bit PIL's, through every row filter, with either inflater."""
    from pgnm_fast.pipelines import check, png
    monkeypatch.setattr(png, "ZLIB", zlib if inflater == "zlib"
                        else pytest.importorskip("isal.isal_zlib"))
    monkeypatch.setattr(decodemod, "decode", None)  # a second decode would fail
    rng = np.random.default_rng()
    for i, (h, w) in enumerate([(1, 1), (5, 1), (1, 9), (7, 13), (40, 33), (64, 70)]):
        ramp = np.add.outer(np.arange(h), np.arange(w)) * int(rng.integers(1, 9))
        img = ((ramp + rng.integers(0, 256) + rng.integers(-3, 4, (h, w))) % 256).astype(np.uint8)
        path = tmp_path / f"f{i}.png"
        _png_filtered(path, img)
        _png(tmp_path / f"p{i}.png", img)  # PIL's writer, its adaptive filters
        for p in (path, tmp_path / f"p{i}.png"):
            found, pixels = packmod.decode_checked(p.read_bytes(), p, 1)
            assert found.kind == check.GREY8 and (found.height, found.width) == (h, w)
            assert np.array_equal(np.asarray(load_grey(p)), img)
            assert bytes(pixels) == img.tobytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(_with_valid_crcs((tmp_path / "p5.png").read_bytes(), 3))
    found, pixels = packmod.decode_checked(broken.read_bytes(), broken, 1)
    assert pixels is None and "broken compressed image data" in found.reason


def test_pack_and_runs_share_the_verdict(tmp_path, monkeypatch):
    """A run after a pack reuses what the pack's decoders found (no file read), equal to a fresh
    check; a pack after that plans from it (no header read) and stops before any write."""
    from pgnm_fast.pipelines import check, startup
    root = _tiny_set(tmp_path / "data")
    bad = make_bad(root, "corrupt-stream")  # found only as the file is decoded
    pack(root, tmp_path / "c", workers=0, on_bad_image="skip", log=quiet)
    read, headers = [], []
    real_probe, real_header = check.probe, check.probe_header
    monkeypatch.setattr(check, "probe", lambda p: (read.append(p), real_probe(p))[1])
    monkeypatch.setattr(check, "probe_header", lambda p: (headers.append(p), real_header(p))[1])
    for name in ("train", "val"):
        part = open_source(root).split(name)
        got = startup.checked(part.files, part.root, log=quiet)
        assert read == []
        want = check.scan(part.files)
        for f in startup.VERDICT_FIELDS:
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
        assert got.bad == want.bad and (bool(got.bad) == (name == "train"))
        read.clear()
    with pytest.raises(DataError, match="broken compressed image data") as e:
        pack(root, tmp_path / "c2", workers=0, log=quiet)
    assert bad in str(e.value) and headers == [] and read == []
    assert not (tmp_path / "c2").exists()


def test_a_file_broken_inside_stops_a_first_pack_leaving_nothing(tmp_path):
    """Header and end intact, a flipped byte inside: found as it is decoded, under error the pack
    this command started is removed; under skip it is listed."""
    root = _tiny_set(tmp_path / "data", per_class=40)
    bad = make_bad(root, "corrupt-crc")
    with pytest.raises(DataError, match="CRC mismatch") as e:
        pack(root, tmp_path / "c", workers=2, chunk_size=8, log=quiet)
    assert bad in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()
    manifest = pack(root, tmp_path / "c", workers=2, chunk_size=8, on_bad_image="skip",
                    log=quiet)
    assert manifest["skipped"] == 1 and manifest["records"] == 2 * 3 * 40
    verify(tmp_path / "c", log=quiet)
