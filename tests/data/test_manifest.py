import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fundusfm.data.manifest import (
    DatasetSpec,
    TaskSpec,
    encode_labels,
    load_manifest,
    save_manifest,
)
from fundusfm.data.validate import check_manifest
from fundusfm.errors import ConfigError, DataError

SPEC = DatasetSpec(
    name="t",
    tasks={
        "grade": TaskSpec(kind="multiclass", columns=["grade"], classes=["a", "b", "c"]),
        "abnormal": TaskSpec(kind="binary", columns=["abnormal"]),
    },
)


def make_clean(root: Path, n: int = 6) -> pd.DataFrame:
    (root / "images").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / f"i{i}.png")
        rows.append(
            {
                "image_id": f"i{i}",
                "path": f"images/i{i}.png",
                "patient_id": f"p{i // 2}",
                "eye": "left" if i % 2 else "right",
                "grade": "abc"[i % 3],
                "abnormal": str(i % 2),
            }
        )
    return pd.DataFrame(rows)


def problems_of(root: Path, table: pd.DataFrame, spec: DatasetSpec = SPEC):
    path = save_manifest(table, spec, root / "manifest.csv")
    return check_manifest(load_manifest(path), progress=False).problems


def test_clean_manifest_has_no_problems(tmp_path: Path):
    assert problems_of(tmp_path, make_clean(tmp_path)) == []


def test_every_problem_reported_at_once(tmp_path: Path):
    t = make_clean(tmp_path, n=12)
    (tmp_path / "images" / "i0.png").unlink()  # missing file
    (tmp_path / "images" / "i1.png").write_bytes(b"")  # zero bytes
    data = (tmp_path / "images" / "i2.png").read_bytes()
    (tmp_path / "images" / "i2.png").write_bytes(data[: len(data) // 3])  # truncated
    (tmp_path / "images" / "i3.png").write_text("<html>not an image</html>")  # undecodable
    t.loc[4, "image_id"] = "i5"  # duplicate id
    shutil.copy(tmp_path / "images" / "i6.png", tmp_path / "images" / "i7.png")  # same content
    t.loc[8, "grade"] = "z"  # unknown label
    t.loc[9, "abnormal"] = ""  # missing label
    t.loc[10, "path"] = "../outside.png"  # escapes the data root
    (tmp_path.parent / "outside.png").write_bytes(b"x")
    t.loc[11, "eye"] = "middle"
    found = problems_of(tmp_path, t)
    text = "\n".join(map(str, found))
    expected = {
        2: "file not found",
        3: "empty file",
        4: "truncated",
        5: "not a recognised image",
        7: "duplicate image_id (first on line 6)",
        9: "same image content as 'i6'",
        10: "unknown label 'z'",
        11: "missing label",
        12: "outside the data root",
        13: "is not one of left",
    }
    for line, message in expected.items():
        assert any(p.line == line and message in p.message for p in found), (line, text)


def test_class_with_no_images(tmp_path: Path):
    t = make_clean(tmp_path)
    t["grade"] = t["grade"].replace("c", "a")
    found = problems_of(tmp_path, t)
    assert [p.message for p in found] == ["class 'c' has no images in task 'grade'"]


def test_missing_required_columns(tmp_path: Path):
    t = make_clean(tmp_path).drop(columns=["patient_id"])
    found = problems_of(tmp_path, t)
    assert len(found) == 1 and "patient_id" in found[0].column


def test_missing_task_column(tmp_path: Path):
    t = make_clean(tmp_path).drop(columns=["grade"])
    found = problems_of(tmp_path, t)
    assert any("task 'grade' needs" in p.message for p in found)


@pytest.mark.parametrize(
    "transform",
    [
        lambda s: "\ufeff" + s,  # byte-order mark
        lambda s: s.replace(",", ";"),  # semicolon delimiter
        lambda s: s.replace("\n", "\r\n"),  # Windows line endings
    ],
    ids=["bom", "semicolon", "crlf"],
)
def test_csv_dialects_load(tmp_path: Path, transform):
    t = make_clean(tmp_path)
    path = save_manifest(t, SPEC, tmp_path / "manifest.csv")
    path.write_bytes(transform(path.read_text()).encode("utf-8"))
    m = load_manifest(path)
    assert list(m.table.columns[:4]) == ["image_id", "path", "patient_id", "eye"]
    assert check_manifest(m, progress=False).problems == []


def test_encode_labels_all_kinds(tmp_path: Path):
    t = make_clean(tmp_path)
    t["dr"], t["amd"] = ["1", "0", "1", "0", "0", "1"], ["0", "0", "1", "1", "0", "0"]
    spec = SPEC.model_copy(deep=True)
    spec.tasks["both"] = TaskSpec(kind="multilabel", columns=["dr", "amd"])
    m = load_manifest(save_manifest(t, spec, tmp_path / "manifest.csv"))
    assert list(encode_labels(m, spec.tasks["grade"])) == [0, 1, 2, 0, 1, 2]
    assert list(encode_labels(m, spec.tasks["abnormal"])) == [0, 1, 0, 1, 0, 1]
    assert encode_labels(m, spec.tasks["both"]).tolist()[2] == [1, 1]
    t.loc[0, "grade"] = "q"
    m = load_manifest(save_manifest(t, spec, tmp_path / "manifest.csv"))
    with pytest.raises(DataError, match="line 2"):
        encode_labels(m, spec.tasks["grade"])


def test_task_spec_rules():
    with pytest.raises(ValueError, match="exactly one column"):
        TaskSpec(kind="binary", columns=["a", "b"])
    with pytest.raises(ValueError, match="needs its list of classes"):
        TaskSpec(kind="multiclass", columns=["a"])
    assert TaskSpec(kind="binary", columns=["a"]).classes == ["0", "1"]
    assert TaskSpec(kind="multilabel", columns=["x", "y"]).class_names == ["x", "y"]


def test_unknown_task_named(tmp_path: Path):
    m = load_manifest(save_manifest(make_clean(tmp_path), SPEC, tmp_path / "manifest.csv"))
    with pytest.raises(ConfigError, match="declared: grade, abnormal"):
        m.task("severity")


def test_whitespace_is_stripped_everywhere(tmp_path: Path):
    t = make_clean(tmp_path)
    t.loc[1, "patient_id"] = " p0 "  # same patient as row 0, padded
    t.loc[2, "grade"] = " c"
    m = load_manifest(save_manifest(t, SPEC, tmp_path / "manifest.csv"))
    assert check_manifest(m, progress=False).problems == []
    assert m.table.loc[1, "patient_id"] == "p0"
    assert encode_labels(m, SPEC.tasks["grade"])[2] == 2


def test_line_numbers_count_blank_lines(tmp_path: Path):
    t = make_clean(tmp_path)
    t.loc[3, "eye"] = "middle"
    path = save_manifest(t, SPEC, tmp_path / "manifest.csv")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], "", *lines[2:]]) + "\n")  # blank line after row 1
    found = check_manifest(load_manifest(path), progress=False).problems
    assert [(p.line, p.column) for p in found] == [(6, "eye")]  # row 4 sits on line 6


def test_symlinks_inside_root_are_allowed(tmp_path: Path):
    data = tmp_path / "data"
    t = make_clean(data)
    elsewhere = tmp_path / "disk"
    (data / "images").rename(elsewhere)
    (data / "images").symlink_to(elsewhere, target_is_directory=True)
    alias = tmp_path / "alias"
    alias.symlink_to(data, target_is_directory=True)
    t.loc[0, "path"] = str(alias / "images" / "i0.png")  # absolute, through a linked root
    found = problems_of(data, t)
    assert found == []


def test_blank_patient_ids_are_each_image_alone():
    import pandas as pd

    from fundusfm.data.manifest import patient_of

    table = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["p1", "", " "]})
    assert patient_of(table).tolist() == ["p1", "image:b", "image:c"]
    assert patient_of(table[["image_id"]]).tolist() == ["a", "b", "c"]  # no column: each alone
