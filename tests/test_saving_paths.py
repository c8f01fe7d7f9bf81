"""Where series files go: base directory, directory, name pattern; nothing outside the base."""
from __future__ import annotations

import os
from datetime import datetime

import pytest

from tango_dectris_live.saving import (BaseDirectoryError, NamePatternError, SavingError, SavingLocation,
                                       SavingUnavailable, UnsafePathError)

WHEN = datetime(2026, 3, 4, 5, 6, 7)


def test_placeholders_fill_the_name_and_the_directory_is_created(tmp_path):
    location = SavingLocation.create(str(tmp_path), "proposal/run", "s{series_id:04d}_{date}_{time}_{counter:03d}.nxs")
    reserved = location.reserve(12, WHEN)
    assert reserved.path == tmp_path / "proposal" / "run" / "s0012_20260304_050607_001.nxs"
    assert reserved.path.is_file() and reserved.path.stat().st_size == 0
    assert not reserved.renamed and reserved.counter == 1


def test_counter_is_one_more_than_the_highest_in_the_directory(tmp_path):
    location = SavingLocation.create(str(tmp_path), "", "scan_{counter:05d}")
    (tmp_path / "scan_00041.h5").touch()
    (tmp_path / "scan_00007_1.h5").touch()  # a renamed file counts too
    (tmp_path / "other_00099.h5").touch()  # not the pattern's
    first = location.reserve(1, WHEN)
    second = location.reserve(2, WHEN)
    assert first.path.name == "scan_00042.h5" and second.path.name == "scan_00043.h5"


def test_counter_starts_at_one_in_an_empty_directory(tmp_path):
    assert SavingLocation.create(str(tmp_path), "new", "{counter}").reserve(5, WHEN).path.name == "1.h5"


def test_suffix_h5_is_added_when_the_pattern_has_none(tmp_path):
    assert SavingLocation.create(str(tmp_path), "", "series_{series_id}").name_pattern == "series_{series_id}.h5"
    assert SavingLocation.create(str(tmp_path), "", "x.nxs").name_pattern == "x.nxs"


def test_an_existing_file_is_never_overwritten(tmp_path):
    location = SavingLocation.create(str(tmp_path), "", "series_{series_id}.h5")
    taken = tmp_path / "series_3.h5"
    taken.write_bytes(b"precious")
    (tmp_path / "series_3_1.h5").write_bytes(b"also precious")
    reserved = location.reserve(3, WHEN)
    assert reserved.path == tmp_path / "series_3_2.h5" and reserved.renamed
    assert reserved.requested == taken and "not overwritten" in reserved.describe()
    assert taken.read_bytes() == b"precious"


def test_a_dangling_symlink_at_the_name_is_not_followed(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    outside = tmp_path / "outside.h5"
    (base / "series_1.h5").symlink_to(outside)
    reserved = SavingLocation.create(str(base), "", "series_{series_id}.h5").reserve(1, WHEN)
    assert reserved.path == base / "series_1_1.h5"
    assert not outside.exists()


@pytest.mark.parametrize("directory", ["..", "a/../..", "a/../../b", "/etc", "/"])
def test_escaping_directories_are_refused(tmp_path, directory):
    with pytest.raises(UnsafePathError, match="base directory|relative"):
        SavingLocation.create(str(tmp_path), directory, "x.h5")


def test_a_symlink_out_of_the_base_is_refused_before_anything_is_created_there(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    with pytest.raises(UnsafePathError, match="outside the base directory"):
        (base / "link").symlink_to(outside)
        SavingLocation.create(str(base), "link/sub", "x.h5")  # refused when set
    (base / "link").unlink()
    location = SavingLocation.create(str(base), "link/sub", "x.h5")
    (base / "link").symlink_to(outside)  # made after the setting was taken
    with pytest.raises(UnsafePathError, match="outside the base directory"):
        location.reserve(1, WHEN)
    assert list(outside.iterdir()) == []


def test_a_symlink_inside_the_base_is_fine(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    reserved = SavingLocation.create(str(tmp_path), "alias", "x.h5").reserve(1, WHEN)
    assert reserved.path == tmp_path / "real" / "x.h5"


@pytest.mark.parametrize("pattern, message", [
    ("scan_{user}.h5", "unknown placeholder {user}"),
    ("scan_{counter.real}.h5", "unknown placeholder"),
    ("scan_{counter!r}.h5", "not allowed"),
    ("scan_{date:>12}.h5", "takes no format spec"),
    ("scan_{counter:s}.h5", "not a format for an integer"),
    ("scan_{counter.h5", "malformed"),
    ("sub/scan.h5", "must be a file name"),
    ("../scan.h5", "must be a file name"),
    ("scan.tiff", "ends with '.tiff'"),
    ("", "empty"),
    (".h5", "empty name"),
])
def test_bad_name_patterns_are_refused(tmp_path, pattern, message):
    with pytest.raises(NamePatternError, match=message.replace("(", r"\(").replace("{", r"\{")):
        SavingLocation.create(str(tmp_path), "", pattern)


def test_empty_base_means_saving_is_unavailable():
    with pytest.raises(SavingUnavailable, match="SavingBaseDirectory is empty"):
        SavingLocation.create("", "a", "x.h5")


def test_base_must_be_absolute_and_exist(tmp_path):
    with pytest.raises(BaseDirectoryError, match="absolute"):
        SavingLocation.create("relative/dir")
    with pytest.raises(BaseDirectoryError, match="does not exist"):
        SavingLocation.create(str(tmp_path / "missing"))
    (tmp_path / "file").touch()
    with pytest.raises(BaseDirectoryError, match="not a directory"):
        SavingLocation.create(str(tmp_path / "file"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_base_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(BaseDirectoryError, match="not writable"):
            SavingLocation.create(str(tmp_path))
    finally:
        tmp_path.chmod(0o755)


def test_unwritable_base_is_refused_even_for_root(tmp_path, monkeypatch):
    """os.access is what decides (as root it says yes to everything, so the test asks it to say no)."""
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode))
    with pytest.raises(BaseDirectoryError, match="not writable by the device server"):
        SavingLocation.create(str(tmp_path))


def test_a_base_that_vanished_is_reported_at_reserve(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    location = SavingLocation.create(str(base), "", "x.h5")
    base.rmdir()
    with pytest.raises(BaseDirectoryError, match="does not exist"):
        location.reserve(1, WHEN)


def test_every_saving_error_is_a_value_error():
    assert issubclass(SavingError, ValueError)
    for error in (SavingUnavailable, BaseDirectoryError, UnsafePathError, NamePatternError):
        assert issubclass(error, SavingError)
