from __future__ import annotations

from pathlib import Path

import pydicom

from xnatio.synth import generate_session


def test_session_has_one_study_and_uid_named_files(tmp_path: Path) -> None:
    s = generate_session(tmp_path, series=2, instances=3, image_size=(32, 32))
    assert s.file_count == 6
    assert sorted(s.series) == [1, 2]
    for sop_uid, path in s.instances.items():
        assert path.name == sop_uid
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == s.study_uid
        assert ds.SOPInstanceUID == sop_uid
        assert path.read_bytes()[128:132] == b"DICM"


def test_same_seed_same_uids(tmp_path: Path) -> None:
    a = generate_session(tmp_path / "a", series=1, instances=2, image_size=(16, 16), seed=7)
    b = generate_session(tmp_path / "b", series=1, instances=2, image_size=(16, 16), seed=7)
    c = generate_session(tmp_path / "c", series=1, instances=2, image_size=(16, 16), seed=8)
    assert list(a.instances) == list(b.instances)
    assert a.study_uid != c.study_uid


def test_extras(tmp_path: Path) -> None:
    s = generate_session(
        tmp_path,
        series=1,
        instances=2,
        image_size=(16, 16),
        extras=["dicomdir", "txt", "second-study", "duplicate", "truncated"],
    )
    assert set(s.extras) == {"dicomdir", "txt", "second-study", "duplicate", "truncated"}
    dicomdir = pydicom.dcmread(s.extras["dicomdir"])
    assert "SOPClassUID" not in dicomdir
    second = pydicom.dcmread(s.extras["second-study"], stop_before_pixels=True)
    assert second.StudyInstanceUID == s.second_study_uid != s.study_uid
    assert s.extras["duplicate"].read_bytes() == next(iter(s.instances.values())).read_bytes()
    assert s.extras["truncated"].stat().st_size == 200


def test_uids_unique_across_many_series(tmp_path: Path) -> None:
    # Series 1 instance 11 and series 11 instance 1 once shared a SOP Instance UID.
    s = generate_session(tmp_path, series=12, instances=12, image_size=(8, 8))
    assert s.file_count == 144
    assert len({p.name for p in s.instances.values()}) == 144
