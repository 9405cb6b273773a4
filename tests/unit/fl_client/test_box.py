"""fl_client.box: the FL user, handing its folder over, staging copies of the cohort."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from appliance.file_modes import tighten_tree
from fl_client.box import GROUP_TRAVERSE, box_user, hand_over, stage_cohort
from fl_client.dataset import CohortIndex, SeriesRecord
from fl_client.errors import BoxError
from fl_client.layout import write_json
from fl_client.settings import CohortRule, FLSettings

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


def test_the_default_fl_user_is_portico_fl_and_null_is_explicit() -> None:
    assert FLSettings().run_as == "portico-fl"
    assert FLSettings(run_as=None).run_as is None
    assert box_user(None) is None


@as_root
def test_a_root_portico_refuses_a_missing_or_privileged_fl_user() -> None:
    with pytest.raises(BoxError, match="does not exist: create it") as missing:
        box_user("portico-no-such-user")
    assert missing.value.code == "fl_box" and "fl.run_as: null" in str(missing.value)
    with pytest.raises(BoxError, match="unprivileged"):
        box_user("root")
    nobody = box_user("nobody")
    assert nobody is not None and nobody.uid == pwd.getpwnam("nobody").pw_uid


@as_root
def test_hand_over_follows_no_link_and_leaves_hard_linked_files(tmp_path: Path) -> None:
    user = box_user("nobody")
    assert user is not None
    box = tmp_path / "fl"
    (box / "site").mkdir(parents=True)
    (box / "site" / "own.json").write_text("{}")
    outside = tmp_path / "outside.txt"
    outside.write_text("root's")
    (box / "site" / "link").symlink_to(outside)
    os.link(outside, box / "site" / "hard")
    hand_over(box, user)
    assert (box / "site" / "own.json").stat().st_uid == user.uid
    assert (box / "site").stat().st_uid == user.uid and box.stat().st_uid == user.uid
    assert outside.stat().st_uid == 0  # neither through the symbolic link nor through the hard link


@as_root
def test_the_cohort_is_staged_as_read_only_copies_of_the_fl_user(tmp_path: Path) -> None:
    user = box_user("nobody")
    assert user is not None
    store = tmp_path / "instances"
    store.mkdir(mode=0o700)
    image, seg = store / "a.dcm", store / "seg.dcm"
    image.write_bytes(b"DICM image")
    seg.write_bytes(b"DICM seg")
    index = CohortIndex(name="default", rule=CohortRule(), created=0.0, series=(SeriesRecord(
        study_uid="1.2", series_uid="1.2.3", split="train", image_paths=(str(image),), seg_paths=(str(seg),)),))
    folder = tmp_path / "fl" / "cohorts" / "default.files"
    (tmp_path / "fl" / "cohorts").mkdir(parents=True)
    staged = stage_cohort(index, folder, user, base=tmp_path)
    copy = Path(staged.series[0].image_paths[0])
    assert copy.parent == folder and copy.read_bytes() == b"DICM image"
    assert copy.stat().st_uid == user.uid and stat.S_IMODE(copy.stat().st_mode) == 0o400
    assert image.stat().st_uid == 0 and stat.S_IMODE(image.stat().st_mode) != 0o400  # the original untouched
    inode = copy.stat().st_ino
    again = stage_cohort(index, folder, user, base=tmp_path)  # unchanged: not copied twice
    assert again == staged and copy.stat().st_ino == inode
    gone = index.model_copy(update={"series": ()})
    stage_cohort(gone, folder, user, base=tmp_path)
    assert list(folder.iterdir()) == []
    (tmp_path / "fl" / "cohorts" / "evil").symlink_to(store)
    with pytest.raises(BoxError, match="symbolic link"):
        stage_cohort(index, tmp_path / "fl" / "cohorts" / "evil" / "x", user, base=tmp_path)


@as_root
def test_root_writes_into_the_fl_users_folder_as_that_user(tmp_path: Path) -> None:
    user = pwd.getpwnam("nobody")
    folder = tmp_path / "control"
    folder.mkdir()
    os.chown(folder, user.pw_uid, user.pw_gid)
    write_json(folder / "approvals.json", {"a": 1})
    assert (folder / "approvals.json").stat().st_uid == user.pw_uid
    write_json(tmp_path / "root.json", {})
    assert (tmp_path / "root.json").stat().st_uid == 0


def test_the_data_folder_may_keep_group_traverse_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    os.chmod(data, 0o755)
    os.chmod(data / "sub", 0o750)
    tighten_tree(data, root_keeps=GROUP_TRAVERSE)
    assert stat.S_IMODE(data.stat().st_mode) == 0o710
    assert stat.S_IMODE((data / "sub").stat().st_mode) == 0o700
    tighten_tree(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
