"""fastrit._run_folder.RunFolder: the record of a run's identity, a folder of another run refused with what differs,
a non-empty folder without a run refused when exclusive, notes handed back to the resumed run, leftovers removed."""

import json

import pytest

from fastrit._run_folder import RunFolder, differences

IDENTITY = {"settings": {"steps": 2, "stages": ("denoise", "distill"), "lr": 1e-4}, "data": {"sha256": "ab"}}


def _folder(path, identity=IDENTITY, **kwargs) -> RunFolder:
    return RunFolder(path, argument="out_dir", record="run.json", identity=identity, kind="test run", **kwargs)


def test_differences_are_listed_key_by_key_nested_and_sorted():
    saved = {"b": 1, "a": {"x": 1, "y": [1, 2]}, "gone": True}
    current = {"b": 2, "a": {"x": 1, "y": [1, 3]}, "new": None}
    assert differences(saved, current) == ["a.y: [1, 2] there, [1, 3] now", "b: 1 there, 2 now",
                                           "gone: True there, None now"]
    assert differences(current, current) == []
    nan = float("nan")  # a setting that is NaN is the same setting when the run starts again
    assert differences({"lr": nan, "a": {"b": nan}}, {"lr": nan, "a": {"b": nan}}) == []


def test_a_derived_key_is_listed_only_when_nothing_else_differs(tmp_path):
    def identity(steps, digest):
        return {"fingerprint": digest, "settings": {**IDENTITY["settings"], "steps": steps}}

    _folder(tmp_path, identity(2, "aa"), derived=("fingerprint",)).write()
    with pytest.raises(ValueError, match=r"settings\.steps: 2 there, 3 now\. Use") as refused:
        _folder(tmp_path, identity(3, "bb"), derived=("fingerprint",)).check()
    assert "fingerprint" not in str(refused.value)
    with pytest.raises(ValueError, match="fingerprint: 'aa' there, 'bb' now"):
        _folder(tmp_path, identity(2, "bb"), derived=("fingerprint",)).check()


def test_a_new_folder_is_created_and_its_record_holds_identity_and_notes(tmp_path):
    folder = _folder(tmp_path / "run", notes=("prepared",))
    assert folder.check() is None and not (tmp_path / "run").exists()  # checking creates nothing
    folder.write(prepared={"layers": [1]})
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved == {**folder.identity, "prepared": {"layers": [1]}}
    assert saved["settings"]["stages"] == ["denoise", "distill"]  # as JSON gives it back
    again = _folder(tmp_path / "run", notes=("prepared",))
    assert again.check() == {"prepared": {"layers": [1]}}
    assert _folder(tmp_path / "run", notes=("prepared", "other")).check() == {"prepared": {"layers": [1]}}
    with pytest.raises(ValueError, match="^notes"):
        again.write(undeclared=1)


def test_a_folder_of_another_run_is_refused_with_what_differs(tmp_path):
    _folder(tmp_path).write()
    before = (tmp_path / "run.json").read_bytes()
    other = {**IDENTITY, "settings": {**IDENTITY["settings"], "steps": 3}}
    with pytest.raises(ValueError, match=r"^out_dir: .* holds a test run made differently; settings\.steps: 2 there, "
                                         r"3 now\. Use another out_dir, or the same arguments\.$"):
        _folder(tmp_path, other).check()
    with pytest.raises(ValueError, match=r"extra: None there, 1 now"):
        _folder(tmp_path, {**IDENTITY, "extra": 1}).check()
    assert (tmp_path / "run.json").read_bytes() == before
    assert _folder(tmp_path).check() == {}  # the same run: no notes recorded


def test_notes_are_not_identity(tmp_path):
    _folder(tmp_path, notes=("prepared",)).write(prepared=1)
    assert _folder(tmp_path, notes=("prepared",)).check() == {"prepared": 1}
    with pytest.raises(ValueError, match=r"prepared: 1 there, None now"):  # for a type that declares no such note
        _folder(tmp_path).check()
    with pytest.raises(ValueError, match="^notes"):
        _folder(tmp_path, notes=("data",))


def test_a_non_empty_folder_without_a_run(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    assert _folder(tmp_path).check() is None  # not exclusive: the run starts beside what is there
    with pytest.raises(ValueError, match=r"^out_dir: .* is not empty and holds no fastrit run"):
        _folder(tmp_path, exclusive=True).check()
    assert _folder(tmp_path / "empty", exclusive=True).check() is None
    (tmp_path / "empty").mkdir()
    assert _folder(tmp_path / "empty", exclusive=True).check() is None


def test_a_file_and_a_missing_record(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^out_dir: .* exists and is not a directory"):
        _folder(tmp_path / "file")
    with pytest.raises(RuntimeError, match=r"^out_dir: run\.json missing in"):
        _folder(tmp_path).check(must_exist=True)


def test_records_written_by_earlier_versions_are_read(tmp_path):
    # the layout fastrit.tune wrote before the record was shared: indent 1, keys unsorted, no final newline
    identity = {"fingerprint": "0123", "settings": {"epochs": {"denoise": 1}, "template": None}}
    (tmp_path / "run.json").write_text(json.dumps({**identity, "prepared": {"deactivated": {}}}, indent=1))
    assert _folder(tmp_path, identity, notes=("prepared",)).check() == {"prepared": {"deactivated": {}}}
    # non-JSON values are compared as the record holds them (their str)
    (tmp_path / "run.json").write_text(json.dumps({"path": str(tmp_path)}))
    assert _folder(tmp_path, {"path": tmp_path}).check() == {}


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / "chunks").mkdir()
    left = [tmp_path / ".run.json.abc.tmp", tmp_path / "chunks" / ".chunk-00000001.safetensors.x.tmp"]
    kept = [tmp_path / "kept.tmp", tmp_path / "chunks" / "chunk-00000001.safetensors"]
    for path in left + kept:
        path.write_text("x")
    _folder(tmp_path).remove_leftovers("chunks")
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
