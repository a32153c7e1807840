"""What a careless or hostile user does: every input below ends in the exit code it should, exactly
one ``Error:`` line naming the flag or path, no traceback, and the previous outputs unchanged.

Full disks and read-only file systems are real ones (a small tmpfs, mounted where the tests run
as root; skipped elsewhere), and also simulated (an ``OSError(ENOSPC)`` from the write) so the
path is tested on every machine.
"""
import errno
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pgnm_fast.cli import main
from pgnm_fast.folders import LOCK_FILE, lock_folder
from pgnm_fast.run_state import load_checkpoint
from pgnm_fast.synth import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--global-batch", "8", "--train-crop-size", "16", "--val-resize-size", "18",
        "--val-crop-size", "16", "--grid", "4", "-j", "0", "--impl", "reference"]
FINETUNE = TINY[:-6] + ["-j", "0"]  # finetune has no --grid or --impl


def digest(path: Path) -> dict:
    """SHA-256 of the file ``path`` or of every file under the folder ``path`` (lock files
    aside: they hold the process id of the last holder); ``{}`` when absent."""
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if p.is_file() and p.name != LOCK_FILE}


def refused(args, *needles, code=2, untouched=()):
    """Run the CLI; assert exit ``code``, one ``Error:`` line holding every needle, no traceback,
    and every folder in ``untouched`` byte for byte as before. Returns the line."""
    before = [digest(Path(f)) for f in untouched]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert r.exc_info is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.output
    for needle in needles:
        assert str(needle) in errors[0], r.output
    assert [digest(Path(f)) for f in untouched] == before
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("d") / "rin", images=52, seed=1, size=24)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory, request):
    """A finished one-epoch baseline run, trained with a relative --data."""
    base = tmp_path_factory.mktemp("runs")
    out = base / "run"
    cwd = os.getcwd()
    os.chdir(data.parent)
    try:
        r = CliRunner().invoke(main, ["train", "--no-policy", "--data", data.name, "--out",
                                      str(out), *TINY], catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return out


# ----------------------------------------------------------------------------- flags
FLAGS = [
    (["-b", "1"], "--batch-size"), (["--momentum", "-1"], "--momentum"),
    (["--momentum", "1"], "--momentum"), (["--wd", "-1"], "--wd"),
    (["--policy-lr", "-1"], "--policy-lr"), (["--lr-step-size", "0"], "--lr-step-size"),
    (["--lr-warmup-decay", "0"], "--lr-warmup-decay"),
    (["--lr-warmup-decay", "5"], "--lr-warmup-decay"), (["-j", "-1"], "--workers"),
    (["--seed", "-1", "--loader", "dali"], "--seed"), (["--seed", str(2 ** 70)], "--seed"),
    (["--lr-warmup-epochs", "-1"], "--lr-warmup-epochs"), (["--lr-gamma", "nan"], "--lr-gamma"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--wd", "nan"], "--wd"), (["--epochs", "0"], "--epochs"), (["--grid", "0"], "--grid"),
    (["--grid", "17"], "--grid"), (["--print-freq", "0"], "--print-freq"),
    (["--train-crop-size", "4", "--grid", "2"], "--train-crop-size"),
    (["--val-resize-size", "8"], "--val-crop-size"),
    (["--average-last", "2", "--no-policy"], "--average-last"),
    (["--average-last", "1"], "--average-last"),
]


@pytest.mark.parametrize("flags,flag", FLAGS, ids=[" ".join(f) for f, _ in FLAGS])
def test_train_flag_out_of_range(data, tmp_path, flags, flag):
    out = tmp_path / "run"
    refused(["train", "--data", data, "--out", out, *TINY, *flags], flag)
    assert not out.exists()


OTHER = [
    (["synth", "--images", "5"], "--images"), (["synth", "--size", "0"], "--size"),
    (["synth", "--seed", "-1"], "--seed"),
    (["eval", "--checkpoint", "x.pt", "-b", "0"], "--batch-size"),
    (["eval", "--checkpoint", "x.pt", "-j", "-1"], "--workers"),
    (["pack", "--data", "DATA", "--out", "OUT", "-j", "-1"], "--workers"),
    (["compare", "--data", "DATA", "--out", "OUT", "--finetune-epochs", "0"], "--epochs"),
    (["compare", "--data", "DATA", "--out", "OUT", "--resamples", "0"], "--resamples"),
]


@pytest.mark.parametrize("args,flag", OTHER, ids=[" ".join(a) for a, _ in OTHER])
def test_other_command_flag_out_of_range(data, tmp_path, args, flag):
    out = tmp_path / "out"
    args = [{"DATA": data, "OUT": out}.get(a, a) for a in args]
    if args[0] == "synth":
        args += ["--out", out]
    refused(args, flag)
    assert not out.exists()


# ----------------------------------------------------------------------------- output paths
def test_out_naming_a_file_or_a_path_inside_one(data, run, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine\n")
    for out, needle in ((afile, "not a folder"), (afile / "sub", "is a file")):
        refused(["train", "--data", data, "--out", out, *TINY], "--out", needle,
                untouched=[tmp_path])
        refused(["pack", "--data", data, "--out", out], "--out", needle, untouched=[tmp_path])
        refused(["synth", "--out", out / "x" if out == afile else out], untouched=[tmp_path])
        refused(["compare", "--data", data, "--out", out], "--out", untouched=[tmp_path])
        refused(["eval", "--checkpoint", run / "last.pt", "--json", out / "m.json"],
                "--json", afile, untouched=[tmp_path])
    refused(["eval", "--checkpoint", run / "last.pt", "--json", tmp_path], "--json", "folder",
            untouched=[tmp_path])


@contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A small tmpfs at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs",
                                            str(path)], capture_output=True,
                                           check=False).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Leave no free byte on the file system of ``folder``."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (65536, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_read_only_file_system(data, run, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        for args in (["train", "--data", data, "--out", ro / "run", *TINY],
                     ["pack", "--data", data, "--out", ro / "cache"],
                     ["synth", "--out", ro / "s"],
                     ["eval", "--checkpoint", run / "last.pt", "--json", ro / "m.json"]):
            refused(args, ro, "read-only")


def test_disk_full_keeps_the_previous_files(data, run, tmp_path):
    """train (resumed onto a full disk), pack and eval --json: one line naming the path."""
    size = sum(p.stat().st_size for p in run.iterdir()) // 2 ** 20 + 2
    with tmpfs(tmp_path / "full", f"{size}m") as disk:
        shutil.copytree(run, disk / "run")
        (disk / "m.json").write_text("{}\n")
        fill(disk)
        refused(["train", "--no-policy", "--resume", disk / "run" / "last.pt", "--epochs", "2"],
                disk / "run", "No space left", untouched=[disk / "run"])
        refused(["eval", "--checkpoint", disk / "run" / "last.pt", "--json", disk / "m.json",
                 "-j", "0"], disk / "m.json", "No space left", untouched=[disk])
        shutil.rmtree(disk / "run")
        (disk / "filler").unlink()
        (disk / "room").write_bytes(b"\0" * 8192)
        fill(disk)
        (disk / "room").unlink()  # two pages free: the lock and the plan, not the pixels
        line = refused(["pack", "--data", data, "--out", disk / "cache", "-j", "0"],
                       "No space left")
        assert str(disk / "cache") in line
        assert not (disk / "cache" / "manifest.json").exists()


def test_failed_checkpoint_write_names_it_and_keeps_the_previous_one(run, tmp_path,
                                                                     monkeypatch):
    """The same as a full disk, simulated: the checkpoint's file write raises ENOSPC."""
    copy = shutil.copytree(run, tmp_path / "run")
    import pgnm_fast.run_state as ckpt

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = ckpt.atomic_open

    @contextmanager
    def full(path, mode="wb"):
        with real(path, mode) as f:
            yield FullDisk(f)

    monkeypatch.setattr(ckpt, "atomic_open", full)
    line = refused(["train", "--no-policy", "--resume", copy / "last.pt", "--epochs", "2"],
                   "No space left", untouched=[copy / "last.pt", copy / "best.pt"])
    assert str(copy / "best.pt") in line or str(copy / "last.pt") in line
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- data
def _broken_stream_png(good: bytes) -> bytes:
    """``good`` with one byte of its IDAT payload flipped and the chunk's CRC recomputed."""
    pos, out = 8, bytearray(good)
    while pos < len(good):
        length, ctype = struct.unpack(">I4s", good[pos:pos + 8])
        if ctype == b"IDAT":
            out[pos + 8 + length // 2] ^= 0x55
            crc = zlib.crc32(bytes(out[pos + 8:pos + 8 + length]), zlib.crc32(ctype))
            out[pos + 8 + length:pos + 12 + length] = struct.pack(">I", crc)
            return bytes(out)
        pos += 12 + length
    raise AssertionError("no IDAT chunk")


@pytest.fixture
def folders(tmp_path):
    return make_synthetic(tmp_path / "f", images=52, seed=1, size=24, layout="folders")


def _first_class(root: Path) -> Path:
    return min((root / "train").iterdir())


@pytest.mark.parametrize("kind", ["symlink-loop", "line-break", "broken-stream"])
def test_bad_files_are_named_before_anything_runs(folders, tmp_path, kind):
    cls = _first_class(folders)
    if kind == "symlink-loop":
        (cls / "loop1.png").symlink_to("loop2.png")
        (cls / "loop2.png").symlink_to("loop1.png")
        bad, needle = cls / "loop", "symbolic links"  # loop1.png or loop2.png
    elif kind == "line-break":
        victim = min(cls.iterdir())
        bad = cls / "new\nline.png"
        shutil.copy(victim, bad)
        bad, needle = "line.png", "line break"
    else:
        victim = min(cls.iterdir())
        victim.write_bytes(_broken_stream_png(victim.read_bytes()))
        bad, needle = victim, "broken compressed image data"
    out = tmp_path / "run"
    refused(["train", "--data", folders, "--out", out, *TINY], bad, needle)
    assert not out.exists()
    refused(["pack", "--data", folders, "--out", tmp_path / "cache", "-j", "0"], bad, needle)
    assert not (tmp_path / "cache").exists()
    r = CliRunner().invoke(main, ["pack", "--data", str(folders), "--out", str(tmp_path / "c2"),
                                  "-j", "0", "--on-bad-image", "skip"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert needle in (tmp_path / "c2" / "skipped.txt").read_text()
    r = CliRunner().invoke(main, ["pack", "--verify", str(tmp_path / "c2")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output


def test_relative_data_is_stored_absolute(run, tmp_path, monkeypatch):
    state = load_checkpoint(run / "last.pt")
    assert Path(state["data"]).is_absolute() and Path(state["data"]).is_dir()
    monkeypatch.chdir(tmp_path)  # eval without --data from another folder finds the data
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(run / "last.pt"), "--split", "val",
                                  "-j", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------------------- concurrency
def test_a_second_writer_is_told_who_holds_the_folder(data, run, tmp_path):
    with lock_folder(run, "run folder"):
        refused(["train", "--no-policy", "--resume", run / "last.pt", "--epochs", "2"],
                "in use by process", os.getpid(), untouched=[run])
    cache = tmp_path / "cache"
    with lock_folder(cache, "cache folder"):
        refused(["pack", "--data", data, "--out", cache, "-j", "0"], "in use by process",
                os.getpid())


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_pack_takes_its_workers_with_it(data, tmp_path):
    """SIGKILL the packer while its two workers decode (slowed down): they end within seconds."""
    script = ("import sys, time\n"
              "import pgnm_fast.pipelines.pack as p\n"
              "real = p._pack_entries\n"
              "p._pack_entries = lambda *a: (time.sleep(60), real(*a))[1]\n"
              "p.pack(sys.argv[1], sys.argv[2], workers=2, chunk_size=4, log=print)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(data), str(tmp_path / "cache")],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2, "the packer started no workers"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers))


@pytest.mark.slow
def test_sigterm_ends_a_run_like_ctrl_c_and_says_how_to_resume(data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pgnm_fast", "train", "--no-policy", "--data",
                             str(data), "--out", str(out), *TINY, "--epochs", "50"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "last.pt").exists(), "no epoch finished"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    assert f"--resume {out / 'last.pt'}" in output
    assert load_checkpoint(out / "last.pt")["epoch"] >= 0
    assert torch.isfinite(load_checkpoint(out / "last.pt")["model"]["fc.weight"]).all()


# ----------------------------------------------------------------------------- checkpoints
def _forged(run: Path, tmp_path: Path, name: str, **changes) -> Path:
    """``run``'s last.pt with ``changes`` applied, saved properly (valid checksums)."""
    from pgnm_fast.run_state import save_checkpoint
    state = torch.load(run / "last.pt", weights_only=True)
    for key, value in changes.items():
        if callable(value):
            value(state)
        else:
            state[key] = value
    path = tmp_path / name / "last.pt"
    save_checkpoint(state, path)
    return path


def _nan_weight(state):
    state["model"]["fc.weight"][0, 0] = float("nan")


def _heated(state):
    state.update(stage="heated", policy={}, policy_model="resnet10t")
    state["config"].update(stage="heated", grid=4, policy_model="resnet10t")


def _uses(path: Path):
    """The three ways a checkpoint is read: eval, --resume, finetune --from."""
    out = path.parent.parent / "out"
    return [["eval", "--checkpoint", path, "-j", "0"],
            ["train", "--no-policy", "--resume", path, "--epochs", "3"],
            ["finetune", "--from", path, "--out", out, *FINETUNE]]


def test_a_flipped_byte_is_found_on_load(run, tmp_path):
    blob = bytearray((run / "last.pt").read_bytes())
    blob[len(blob) // 2] ^= 0x10
    bad = tmp_path / "flipped" / "last.pt"
    bad.parent.mkdir()
    bad.write_bytes(bytes(blob))
    for args in _uses(bad):
        refused(args, bad, "damaged", untouched=[bad.parent])


def test_non_finite_weights_are_refused(run, tmp_path):
    bad = _forged(run, tmp_path, "nan", model=_nan_weight)
    for args in _uses(bad):
        refused(args, bad, "fc.weight", "not finite", untouched=[bad.parent])


def test_metadata_of_the_wrong_type_is_refused(run, tmp_path):
    bad = _forged(run, tmp_path, "types", epoch="3")
    for args in _uses(bad):
        refused(args, bad, "'epoch'", untouched=[bad.parent])


@pytest.mark.parametrize("flags,flag", [(["--model", "resnet18"], "--model"),
                                        (["--grid", "8"], "--grid"),
                                        (["--policy-model", "resnet18"], "--policy-model")])
def test_resume_with_another_architecture_names_both_sides(run, tmp_path, flags, flag):
    heated = _forged(run, tmp_path, "heated", stage=_heated)
    line = refused(["train", "--resume", heated, *flags], heated, flag, flags[1],
                   untouched=[heated.parent])
    assert ("resnet10t" if "resnet" in flags[1] else "4") in line


def test_a_checkpoint_whose_weights_do_not_fit_its_header(run, tmp_path):
    bad = _forged(run, tmp_path, "rgb", in_chans=3)  # 1-channel stem weights, 3 claimed
    refused(["finetune", "--from", bad, "--out", tmp_path / "ft", *FINETUNE], bad)
    assert not (tmp_path / "ft").exists()


def test_divergence_in_the_last_update_of_an_epoch_stops_before_saving(data, tmp_path):
    """One step per epoch: the loss read by the epoch loop is from before the update that
    diverges; the weights (and the validation outputs) are checked after it, before saving."""
    from pgnm_fast.pipelines.sources import open_source
    n_train = len(open_source(data).split("train"))
    out = tmp_path / "run"
    refused(["train", "--no-policy", "--data", data, "--out", out, *TINY, "--global-batch", n_train,
             "--lr", "1e30", "--momentum", "0"], "diverged", code=3)
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_non_finite_weights_after_an_update_stop_the_epoch():
    from pgnm_fast.engine import TrainingDiverged, check_finite_weights
    model, policy = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    check_finite_weights((model, None, policy), 4)
    with torch.no_grad():
        policy.weight[1, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="epoch 4"):
        check_finite_weights((model, None, policy), 4)


def test_eval_of_weights_whose_outputs_overflow(run, tmp_path):
    def huge(state):
        state["model"]["fc.weight"].fill_(3e38)  # finite, but every output overflows

    bad = _forged(run, tmp_path, "huge", model=huge)
    refused(["eval", "--checkpoint", bad, "-j", "0"], "NaN or infinite", code=3)


def test_a_killed_generation_leaves_no_temporary_folder_for_good(tmp_path):
    """The temporary folder of a generation whose process is gone is removed by the next one;
    that of a live process is left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".data.tmp-{dead}-x1"
    live = tmp_path / f".data.tmp-{os.getpid()}-x2"
    for folder in (stale, live):
        (folder / "radiology_ai").mkdir(parents=True)
    make_synthetic(tmp_path / "data", images=39, seed=0, size=8)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", live.name])


def test_an_interrupt_wrapped_by_a_library_still_ends_the_run_cleanly(data, tmp_path, monkeypatch):
    """SIGTERM landing inside an import (matplotlib's __set_name__ wraps it in RuntimeError) ends
    the run as Ctrl-C does: the resume hint, exit 143, no traceback."""
    from pgnm_fast import stages
    from pgnm_fast.cli import Terminated
    from pgnm_fast.errors import interrupt_in

    def wrapped_interrupt(*args, **kwargs):
        try:
            raise Terminated
        except Terminated as t:
            raise RuntimeError("Error calling __set_name__") from t

    assert interrupt_in(ValueError("x")) is None
    monkeypatch.setattr(stages, "end_epoch", wrapped_interrupt)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--no-policy", "--data", str(data), "--out", str(out),
                                  *TINY, "--epochs", "2"])
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert "Traceback" not in r.output and "Aborted (SIGTERM)" in r.output
    assert "nothing to resume" in r.output
