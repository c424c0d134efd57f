"""Classification dataset importers on fake trees with the real names, headers and quirks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.data.adapters.classification import JSIEC_CLASSES, odir_eye
from fundusfm.data.adapters.registry import import_dataset
from fundusfm.data.labels import SHIPPED, harmonise, mapping_file
from fundusfm.data.manifest import load_manifest
from fundusfm.errors import ConfigError, DataError
from tests.conftest import SHARED_DATA
from tests.fakes import fundus

runner = CliRunner()
counter = iter(range(10_000))


def img(path: Path) -> Path:
    fundus(path, seed=next(counter))  # random texture: no two fakes look alike
    return path


def table(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def load(name: str, root: Path, tmp_path: Path, **kw):
    path, _, notes = import_dataset(name, root, tmp_path / f"{name}.csv", progress=False, **kw)
    return load_manifest(path), notes


def test_eye_diseases_sources_patients_augmented_and_duplicates(tmp_path: Path):
    root = tmp_path / "eye"
    img(root / "dataset/normal/12_left.jpg")
    img(root / "dataset/normal/12_right.jpg")
    img(root / "dataset/diabetic_retinopathy/12_left.jpeg")  # EyePACS 12 is not ODIR 12
    img(root / "dataset/glaucoma/Glaucoma_001.png")
    img(root / "dataset/glaucoma/_1_234.jpg")  # augmented copy
    shared = img(root / "dataset/cataract/1415_right.jpg")
    (root / "dataset/glaucoma").mkdir(exist_ok=True)
    (root / "dataset/glaucoma/1415_right.jpg").write_bytes(shared.read_bytes())
    copy = Image.open(root / "dataset/normal/12_left.jpg").resize((128, 120))  # resized copy
    copy.save(root / "dataset/cataract/99_left.jpg", quality=95)
    m, notes = load("eye_diseases", root, tmp_path)
    t = m.table.set_index("image_id")
    assert len(t) == 7 and "glaucoma/_1_234" not in t.index
    assert t.loc["normal/12_left", "patient_id"] == t.loc["normal/12_right", "patient_id"]
    assert (
        t.loc["diabetic_retinopathy/12_left", "patient_id"] != t.loc["normal/12_left", "patient_id"]
    )
    assert t.loc["cataract/1415_right", "patient_id"] == t.loc["glaucoma/1415_right", "patient_id"]
    # the resized copy joins the patient it was copied from
    assert t.loc["cataract/99_left", "patient_id"] == t.loc["normal/12_left", "patient_id"]
    assert any("augmented" in n for n in notes) and any("1 near-duplicate" in n for n in notes)
    assert m.task("disease")[1].kind == "multiclass" and t.loc["normal/12_left", "abnormal"] == "0"


def test_jsiec_skips_the_nested_copy(tmp_path: Path):
    root = tmp_path / "1000images"
    img(root / "0.0.Normal/1ffa9630-8d87-11e8-9daf-6045cb817f5b..JPG")
    img(root / "8.MH/2ffa9630-8d87-11e8-9daf-6045cb817f5b..jpg")
    img(root / "0.1.Tessellated fundus/3ffa..jpg")
    nested = root / "1000images/0.0.Normal/1ffa9630-8d87-11e8-9daf-6045cb817f5b..JPG"
    nested.parent.mkdir(parents=True)
    nested.write_bytes((root / "0.0.Normal/1ffa9630-8d87-11e8-9daf-6045cb817f5b..JPG").read_bytes())
    m, _ = load("jsiec", root, tmp_path)
    t = m.table.set_index("image_id")
    assert len(t) == 3 and t.loc["jsiec_2ffa9630-8d87-11e8-9daf-6045cb817f5b", "abnormal"] == "1"
    assert t.loc["jsiec_3ffa", "ambiguous"] == "1"
    assert m.task("category")[1].class_names == ["0.0.Normal", "0.1.Tessellated fundus", "8.MH"]


RFMID_HEADER = (
    "ID,Disease_Risk,DR,ARMD,MH,DN,MYA,BRVO,TSLN,ERM,LS,MS,CSR,ODC,CRVO,TV,AH,ODP,ODE,ST,AION,PT,"
    "RT,RS,CRS,EDN,RPEC,MHL,RP,CWS,CB,ODPM,PRH,MNF,HR,CRAO,TD,CME,PTCR,CF,VH,MCA,VS,BRAO,PLQ,HPED,CL"
)


def rfmid_row(i: int, risk: int, *ones: str) -> str:
    cols = RFMID_HEADER.split(",")[2:]
    return ",".join([str(i), str(risk), *("1" if c in ones else "0" for c in cols)])


@pytest.mark.parametrize("layout", ["official", "kaggle"])
def test_rfmid_both_layouts_and_id_collision(tmp_path: Path, layout: str):
    root = tmp_path / "rfmid"
    if layout == "official":
        img(root / "1. Original Images/a. Training Set/1.png")
        img(root / "1. Original Images/c. Testing Set/1.png")
        gt = root / "2. Groundtruths"
        train_csv, test_csv = (
            gt / "a. RFMiD_Training_Labels.csv",
            gt / "c. RFMiD_Testing_Labels.csv",
        )
    else:
        img(root / "Training_Set/Training_Set/Training/1.png")
        img(root / "Test_Set/Test_Set/Test/1.png")
        train_csv = root / "Training_Set/Training_Set/RFMiD_Training_Labels.csv"
        test_csv = root / "Test_Set/Test_Set/RFMiD_Testing_Labels.csv"
    table(train_csv, f"{RFMID_HEADER}\n{rfmid_row(1, 1, 'DR', 'MH')}\n")
    table(test_csv, f"{RFMID_HEADER}\n{rfmid_row(1, 0)}\n")
    m, _ = load("rfmid", root, tmp_path)
    t = m.table.set_index("image_id")
    assert sorted(t.index) == ["rfmid_test_1", "rfmid_train_1"]
    assert t.loc["rfmid_train_1", "MH"] == "1" and t.loc["rfmid_test_1", "abnormal"] == "0"
    assert (
        "Training" in t.loc["rfmid_train_1", "path"]
        and m.task("conditions")[1].kind == "multilabel"
    )
    assert "Test" in t.loc["rfmid_test_1", "path"]  # though ROOT's own path says "test_..."
    h, counts = harmonise(m.path, "rfmid", tmp_path / "h.csv")
    ht = load_manifest(h).table.set_index("image_id")
    assert ht.loc["rfmid_train_1", "terms"] == "dr;media_haze"  # MH is media haze
    assert ht.loc["rfmid_test_1", "terms"] == "normal" and counts["left_out"] == 0


def test_odir_per_eye_labels_from_keywords(tmp_path: Path):
    root = tmp_path / "ODIR-5K"
    for name in ("0_left.jpg", "0_right.jpg", "4_left.jpg", "4_right.jpg"):
        img(root / "Training Images" / name)
    header = (
        "ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,"
        "Right-Diagnostic Keywords,N,D,G,C,A,H,M,O"
    )
    table(
        root / "full_df.csv",
        f"{header}\n0,69,Female,0_left.jpg,0_right.jpg,cataract,normal fundus,0,0,0,1,0,0,0,0\n"
        "4,53,Male,4_left.jpg,4_right.jpg,macular epiretinal membrane\uff0cmild nonproliferative "
        "retinopathy,lens dust,0,1,0,0,0,0,0,1\n",
    )
    m, _ = load("odir", root, tmp_path)
    t = m.table.set_index("image_id")
    assert len(t) == 3 and "odir_4_right" not in t.index  # quality-only eye dropped
    assert t.loc["odir_0_right", "abnormal"] == "0" and t.loc["odir_0_left", "C"] == "1"
    assert t.loc["odir_4_left", "D"] == "1" and t.loc["odir_4_left", "O"] == "1"
    assert t.loc["odir_0_left", "patient_id"] == t.loc["odir_0_right", "patient_id"]
    assert odir_eye("normal fundus\uff0clens dust") == {
        **odir_eye("normal fundus"),
        "quality_flag": 1,
    }


def test_oia_odir_reads_every_annotation_table_with_its_split(tmp_path: Path):
    root = tmp_path / "OIA-ODIR"
    header = "ID,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,Right-Diagnostic Keywords"
    for folder, pid in (("Training Set", 1), ("Off-site Test Set", 2), ("On-site Test Set", 3)):
        img(root / folder / "Images" / f"{pid}_left.jpg")
        table(
            root / folder / "Annotation" / f"{folder.lower()} annotation (English).csv",
            f"{header}\n{pid},{pid}_left.jpg,{pid}_right.jpg,normal fundus,glaucoma\n",
        )
    t = load("odir", root, tmp_path)[0].table.set_index("image_id")
    assert dict(t.split) == {"odir_1_left": "train", "odir_2_left": "val", "odir_3_left": "test"}


def test_aptos_eyepacs_idrid_messidor2(tmp_path: Path):
    aptos = tmp_path / "aptos"
    img(aptos / "train_images/0005cfc8afb6.png")
    img(aptos / "train_images/001639a390f0.png")
    table(aptos / "train.csv", "id_code,diagnosis\n0005cfc8afb6,2\n001639a390f0,0\n")
    t = load("aptos", aptos, tmp_path)[0].table.set_index("image_id")
    assert (
        t.loc["aptos_0005cfc8afb6", "abnormal"] == "1"
        and t.loc["aptos_001639a390f0", "dr_grade"] == "0"
    )

    eyepacs = tmp_path / "eyepacs"
    img(eyepacs / "train/7_left.jpeg")
    img(eyepacs / "train/7_right.jpeg")
    img(eyepacs / "test/1_left.jpeg")
    table(eyepacs / "trainLabels.csv", "image,level\n7_left,0\n7_right,3\n")
    table(eyepacs / "retinopathy_solution.csv", "image,level,Usage\n1_left,1,Private\n")
    t = load("eyepacs", eyepacs, tmp_path)[0].table.set_index("image_id")
    assert (
        t.loc["eyepacs_train_7_left", "patient_id"] == t.loc["eyepacs_train_7_right", "patient_id"]
    )
    assert t.loc["eyepacs_test_1_left", "split"] == "test"

    idrid = tmp_path / "idrid/B. Disease Grading"
    img(idrid / "1. Original Images/a. Training Set/IDRiD_001.jpg")
    img(idrid / "1. Original Images/b. Testing Set/IDRiD_001.jpg")
    gt = idrid / "2. Groundtruths"
    header = "Image name,Retinopathy grade,Risk of macular edema ,,,"
    table(gt / "a. IDRiD_Disease Grading_Training Labels.csv", f"{header}\nIDRiD_001,0,1,,,\n")
    table(gt / "b. IDRiD_Disease Grading_Testing Labels.csv", f"{header}\nIDRiD_001,0,0,,,\n")
    t = load("idrid", tmp_path / "idrid", tmp_path)[0].table.set_index("image_id")
    assert t.loc["idrid_train_IDRiD_001", "abnormal"] == "1"  # DME risk alone is abnormal
    assert t.loc["idrid_test_IDRiD_001", "abnormal"] == "0"
    assert "Testing" in t.loc["idrid_test_IDRiD_001", "path"]

    mess = tmp_path / "messidor2"
    img(mess / "IMAGES/20051020_43808_0100_PP.png")
    img(mess / "IMAGES/IM000012.JPG")
    img(mess / "IMAGES/IM000013.JPG")
    table(mess / "messidor-2.csv", "left;right \nIM000012.JPG;IM000013.JPG\n")
    table(
        mess / "messidor_data.csv",
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051020_43808_0100_PP.png,,,0\nIM000012.jpg,0,0,1\nIM000013.jpg,2,1,1\n",
    )
    m, notes = load("messidor2", mess, tmp_path)
    t = m.table.set_index("image_id")
    assert (
        len(t) == 2
        and t.loc["messidor2_IM000012", "patient_id"] == t.loc["messidor2_IM000013", "patient_id"]
    )
    assert any("1 ungradable" in n for n in notes)


def test_folder_and_csv_and_errors(tmp_path: Path):
    root = tmp_path / "f"
    img(root / "normal/a.png")
    img(root / "amd/sub/b.png")
    m, _ = load("folder", root, tmp_path)
    assert m.task("label")[1].class_names == ["amd", "normal"]
    assert dict(zip(m.table.image_id, m.table.abnormal, strict=True)) == {
        "amd/sub/b": "1",
        "normal/a": "0",
    }
    c = tmp_path / "c"
    img(c / "x/1.png")
    img(c / "x/2.png")
    table(c / "labels.csv", "\ufeffpath,label,patient_id\nx/1.png,Normal,p1\nx/2.png,dr,p1\n")
    t = load("csv", c, tmp_path)[0].table
    assert list(t.patient_id) == ["p1", "p1"] and list(t.abnormal) == ["0", "1"]
    with pytest.raises(ConfigError, match="choose one of"):
        import_dataset("kaggle", root, tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"no APTOS train\.csv"):
        import_dataset("aptos", root, tmp_path / "x.csv")


def test_harmonise_jsiec_and_shipped_maps(tmp_path: Path):
    root = tmp_path / "1000images"
    for k, cls in enumerate(["0.0.Normal", "1.0.DR2", "29.1.Blur fundus with suspected PDR"]):
        img(root / cls / f"{k}abc..jpg")
    m, _ = load("jsiec", root, tmp_path)
    result = runner.invoke(
        app,
        ["data", "harmonise", str(m.path), "--mapping", "jsiec", "--out", str(tmp_path / "h.csv")],
    )
    assert result.exit_code == 0, result.output
    h = load_manifest(tmp_path / "h.csv")
    t = h.table.set_index("image_id")
    assert (
        t.loc["jsiec_1abc", "terms"] == "dr;dr_moderate"
        and t.loc["jsiec_0abc", "vocab_abnormal"] == "0"
    )
    assert h.task("vocabulary")[1].kind == "multilabel"
    # every shipped JSIEC map names real JSIEC folders only
    for name in ("jsiec", "jsiec_abnormal_strict", "jsiec_to_eye_diseases"):
        spec = yaml.safe_load(mapping_file(name).read_text())
        assert set(spec["map"]) <= set(JSIEC_CLASSES), name
    assert set(yaml.safe_load(mapping_file("jsiec").read_text())["map"]) == set(JSIEC_CLASSES)
    with pytest.raises(ConfigError, match="shipped"):
        mapping_file("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("column: category\nmap:\n  0.0.Normal: [normal]\n")
    with pytest.raises(ConfigError, match="not mapped"):
        harmonise(m.path, bad, tmp_path / "b.csv")
    assert (SHIPPED / "conditions.yaml").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "eye_diseases_classification").is_dir(), reason="no data")
def test_real_eye_diseases_import(tmp_path: Path):
    m, notes = load("eye_diseases", SHARED_DATA / "eye_diseases_classification", tmp_path)
    counts = m.table.disease.value_counts().to_dict()
    assert (
        len(m.table) == 2977 and counts["normal"] == 1074 and counts["diabetic_retinopathy"] == 1098
    )
    assert any("dropped 1240 augmented" in n for n in notes)
    t = m.table.set_index("image_id")
    assert t.loc["cataract/1415_right", "patient_id"] == t.loc["glaucoma/1415_right", "patient_id"]
    assert np.all(pd.Series(m.table.patient_id).str.len() > 0)


def test_one_registry_names_every_dataset_and_the_cli_help_lists_them():
    from typer.testing import CliRunner

    from fundusfm.cli import app
    from fundusfm.data.adapters.registry import dataset_names

    names = dataset_names()
    assert names["drive"] == "vessels" and names["jsiec"] == "classification"
    shown = CliRunner().invoke(app, ["data", "import", "--help"], terminal_width=200).output
    assert [n for n in names if n not in shown] == []
