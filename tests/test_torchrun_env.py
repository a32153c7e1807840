"""torchrun's environment is read in one place (pgnm_fast.distributed.torchrun_env), and an
error's user-facing line in one place (pgnm_fast.errors.first_line)."""
from pgnm_fast.distributed import torchrun_env
from pgnm_fast.errors import DataError, first_line


def test_torchrun_env_defaults_to_one_process_and_reads_every_variable(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() == (0, 1, 0, 1)
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"),
                        ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    env = torchrun_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 4)


def test_first_line_of_an_error():
    assert first_line(ValueError("  bad value\n  at line 3\n")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(DataError("no val split")) == "no val split"
