"""vishwam.files: a file or directory appears whole or not at all, and a failed write changes nothing."""

import os
import stat

import pytest

from vishwam.files import atomic_directory, atomic_write_bytes, atomic_write_text


class Boom(Exception):
    pass


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_atomic_write_replaces_whole_files_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "config.json"
    assert atomic_write_text(target, "first") == target  # creates the parent
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")

    def fail(*args):
        raise Boom("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(Boom):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_atomic_directory_publishes_only_complete_directories(tmp_path):
    target = tmp_path / "pipeline"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("1")
        (staging / "nested").mkdir()
        (staging / "nested" / "b.txt").write_text("2")
        assert not target.exists()  # nothing under the real name until the block ends
    assert (target / "nested" / "b.txt").read_text() == "2"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and stat.S_IMODE((target / "a.txt").stat().st_mode) == 0o644

    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target):
            pass
    with pytest.raises(Boom):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "a.txt").write_text("half")
            raise Boom("the writer failed")
    assert (target / "a.txt").read_text() == "1" and _leftovers(tmp_path) == []

    with atomic_directory(target, overwrite=True) as staging:
        (staging / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]  # replaced whole, the old files gone
    assert _leftovers(tmp_path) == []
