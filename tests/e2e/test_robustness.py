"""Bad inputs and faults through the commands users run; docs/robustness.md lists each outcome.

Decoder details (each image mode, bombs, truncation) are unit-tested in test_decode.py; here
the same corpus, plus a 1x1 image and awkward file names, goes through `predict`,
`data scan`, `data check`, `preprocess` and `data import`, and manifest faults go through
`data check`, `split` and `finetune`. Last, a training run is killed with SIGKILL and resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.config.core import SplitConfig
from fundusfm.data.manifest import DatasetSpec, load_manifest, save_manifest
from fundusfm.data.splits import make_splits
from fundusfm.errors import DataError
from tests.conftest import TINY_ARCH

LINUX = sys.platform.startswith("linux")  # file names are bytes there; not so on macOS/Windows


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000x30000 RGB pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    body = chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + header + body


def write_bytes_name(folder: Path, name: bytes, data: bytes) -> None:
    """Create a file whose name is raw bytes (not necessarily UTF-8), as os.open takes it."""
    fd = os.open(os.fsencode(folder) + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, data)
    os.close(fd)


SCORED = ["good.png", "with space.png", "sub dir/also spaced.jpg", "gray.png", "rgba.png"]
SCORED += ["palette.png", "sixteen bit.png", "cmyk.jpg", "exif rotated.jpg"]
NOT_SCORED = {  # file -> (predict status, words its reason must hold)
    "one pixel.png": ("ungradable", "only 1x1 pixels"),
    "truncated.jpg": ("unreadable", "truncated"),
    "zero.jpg": ("unreadable", "empty file (0 bytes)"),
    "page.jpg": ("unreadable", "not a recognised image format"),
    "bomb.png": ("unreadable", "decompression bomb"),
    "notes.txt": ("unsupported", "(.txt)"),
}
CORPUS = {**{name: ("scored", "") for name in SCORED}, **NOT_SCORED}
BYTE_NAMED = {  # Linux only: name on disk -> (as predict reports it, status, reason)
    b"\xff\xfe.png": ("\\xff\\xfe.png", "scored", ""),
    b"caf\xe9 empty.jpg": ("caf\\xe9 empty.jpg", "unreadable", "empty file"),
}


def make_corpus(folder: Path, rgb: np.ndarray) -> None:
    """Every file of CORPUS (and BYTE_NAMED on Linux) under `folder`, from one fundus image."""
    (folder / "sub dir").mkdir(parents=True)
    img = Image.fromarray(rgb)
    for name in ("good.png", "with space.png"):
        img.save(folder / name)
    img.save(folder / "sub dir" / "also spaced.jpg", quality=95)
    img.convert("L").save(folder / "gray.png")
    img.convert("RGBA").save(folder / "rgba.png")
    img.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / "sixteen bit.png")
    img.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    turned = img.transpose(Image.Transpose.ROTATE_90)
    exif = turned.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    turned.save(folder / "exif rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (1, 1), (180, 90, 40)).save(folder / "one pixel.png")
    jpeg = (folder / "sub dir" / "also spaced.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "notes.txt").write_text("not an image")
    if LINUX:
        write_bytes_name(folder, b"\xff\xfe.png", (folder / "good.png").read_bytes())
        write_bytes_name(folder, b"caf\xe9 empty.jpg", b"")


@pytest.fixture(scope="module")
def setup(synth_set: Path, tmp_path_factory):
    """Splits on the 40 generated images, the finetune arguments, and one uninterrupted run.

    Training here and in the killed process uses one thread: the same arithmetic in both,
    and no slowdown from threads competing for busy cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("robust")
    splits = make_splits(load_manifest(synth_set), SplitConfig(folds=3, val_fraction=0.2))
    splits.to_csv(out / "splits.csv", index=False)
    sets = f"data.manifest={synth_set} data.splits={out / 'splits.csv'} data.cache={out / 'cache'}"
    sets += " data.task=abnormal data.resolution=64 model.arch=" + TINY_ARCH + " model.init=scratch"
    sets += " model.hidden=16 method=ff train.epochs=3 train.batch_size=8 train.select_metric=loss"
    args = ["finetune", "-q", *[x for kv in sets.split() for x in ("--set", kv)]]
    whole = out / "whole"
    result = cli(*args, "--set", f"run.out={whole}")
    assert result.exit_code == 0, result.output
    rgb = np.asarray(Image.open(load_manifest(synth_set).image_path("images/P00000_right.jpg")))
    yield {"out": out, "args": args, "whole": whole, "rgb": rgb, "manifest": synth_set}
    torch.set_num_threads(threads)


def test_predict_gives_every_file_one_row_and_writes_utf8(setup, tmp_path: Path):
    folder = tmp_path / "in"
    make_corpus(folder, setup["rgb"])
    out = tmp_path / "out"
    bundle = setup["whole"] / "bundle"
    args = ["--workers", 0, "--gradcam", "--engine", "torch", "-q"]  # engines: test_engine.py
    result = cli("predict", bundle, folder, "--out", out, *args)
    assert result.exit_code == 0, result.output
    raw = (out / "predictions.csv").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("file")
    expected = {**CORPUS, **({s: (st, w) for s, st, w in BYTE_NAMED.values()} if LINUX else {})}
    on_disk = sum(len(files) for _, _, files in os.walk(os.fsencode(folder)))  # bytes names
    assert len(table) == on_disk == len(expected)
    for name, (status, why) in expected.items():
        assert table.loc[name, "status"] == status, (name, table.loc[name, "reason"])
        assert why in table.loc[name, "reason"], name
        assert (table.loc[name, "decision"] != "") == (status == "scored"), name
    assert (table.loc[table.status != "scored", "reason"] != "").all()
    html = (out / "report.html").read_bytes().decode("utf-8")
    if LINUX:
        assert "\\xff\\xfe.png" in raw and "\\xff\\xfe.png" in html
    scored = (table.status == "scored").sum()
    assert len(list((out / "gradcam").glob("*.png"))) == scored
    # an unloadable bundle never costs the previous results, even with --overwrite
    broken = cli("predict", tmp_path / "no_bundle", folder, "--out", out, "--overwrite", "-q")
    assert broken.exit_code == 2
    assert (out / "predictions.csv").read_bytes().decode("utf-8") == raw


def test_scan_check_preprocess_name_each_bad_file_and_keep_the_rest(setup, tmp_path: Path):
    folder = tmp_path / "in"
    make_corpus(folder, setup["rgb"])
    good = folder / "good.png"
    manifest = tmp_path / "m" / "manifest.csv"
    scan = cli("data", "scan", folder, "--out", manifest)
    assert scan.exit_code == 0, scan.output
    if LINUX:  # a manifest is UTF-8: such names are left out, by name, and the rest goes in
        assert "skipped 2 files whose names are not valid UTF-8" in scan.output
        assert "\\xff\\xfe.png" in scan.output
    table = load_manifest(manifest).table
    assert len(table) == len(CORPUS) - 1  # notes.txt is not an image
    line = {p: i + 2 for i, p in enumerate(table["path"])}

    bad = {  # file -> what data check and preprocess both say
        "one pixel.png": "only 1x1 pixels, too small",
        "truncated.jpg": "truncated",
        "zero.jpg": "empty file (0 bytes)",
        "page.jpg": "not a recognised image format",
        "bomb.png": "decompression bomb",
    }
    same = {"with space.png", "rgba.png"}  # the same pixels as good.png: reported as copies
    report = tmp_path / "problems.csv"
    check = cli("data", "check", manifest, "-q", "--report", report)
    assert check.exit_code == 1
    problems = pd.read_csv(report).set_index("line")
    assert sorted(problems.index) == sorted(line[n] for n in [*bad, *same])
    for name, why in bad.items():
        assert problems.loc[line[name], "message"].startswith(f"{name}: "), name
        assert why in problems.loc[line[name], "message"], name
    for name in same:
        assert "same image content as 'good'" in problems.loc[line[name], "message"]
    assert f"{len(table) - len(bad)} images decoded" in check.output  # the others were read

    cache = tmp_path / "cache"
    first = cli("preprocess", manifest, "--resolution", 32, "--cache", cache, "-q")
    assert first.exit_code == 1
    assert f"{len(table) - len(bad)} built" in first.output
    said = {ln.split(" (")[0].strip(): ln for ln in first.output.splitlines() if "): " in ln}
    for name, why in bad.items():
        iid = name.rsplit(".", 1)[0]
        assert f"({folder.resolve() / name}): " in said[iid] and why in said[iid], name
    (directory,) = cache.glob("32px-*")
    index = pd.read_csv(directory / "index.csv")
    errors = pd.read_csv(directory / "errors.csv")
    assert len(index) == len(table) - len(bad)
    assert set(errors.image_id) == {n.rsplit(".", 1)[0] for n in bad}
    arrays = {p.name: p.stat().st_mtime_ns for p in (directory / "arrays").iterdir()}
    # nothing already written is lost: one more bad file, a rerun keeps every cached image
    (folder / "late.png").write_bytes(good.read_bytes()[:100])
    assert cli("data", "scan", folder, "--out", manifest).exit_code == 0
    second = cli("preprocess", manifest, "--resolution", 32, "--cache", cache, "-q")
    assert second.exit_code == 1 and "0 built" in second.output
    assert f"{len(index)} unchanged, {len(bad) + 1} failed" in second.output
    assert {p.name: p.stat().st_mtime_ns for p in (directory / "arrays").iterdir()} == arrays
    assert len(pd.read_csv(directory / "index.csv")) == len(index)


def test_a_failed_manifest_write_keeps_the_previous_manifest(tmp_path: Path):
    table = pd.DataFrame(
        {"image_id": ["a"], "path": ["a.png"], "patient_id": ["a"], "eye": ["left"]}
    )
    path = save_manifest(table, DatasetSpec(), tmp_path / "manifest.csv")
    before = path.read_bytes()
    table.loc[0, "path"] = os.fsdecode(b"caf\xe9.png")  # a name that is not UTF-8
    with pytest.raises(DataError, match=r"line 2, column path: 'caf\\xe9.png' is not valid"):
        save_manifest(table, DatasetSpec(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "manifest.yaml"]


def test_data_import_folder_and_csv(setup, tmp_path: Path):
    rgb = setup["rgb"]
    root = tmp_path / "folder"
    for label in ("normal", "dr"):
        (root / label).mkdir(parents=True)
    Image.fromarray(rgb).save(root / "normal" / "left eye.png")
    Image.fromarray(rgb[::-1]).save(root / "dr" / "one.png")
    Image.new("RGB", (1, 1)).save(root / "dr" / "one pixel.png")
    (root / "dr" / "zero.jpg").write_bytes(b"")
    if LINUX:
        write_bytes_name(root / "dr", b"\xff.png", (root / "dr" / "one.png").read_bytes())
    result = cli("data", "import", "folder", root, "--out", tmp_path / "f.csv", "-q")
    assert result.exit_code == 0, result.output
    if LINUX:
        assert "skipped 1 files whose names are not valid UTF-8 (dr/\\xff.png)" in result.output
    imported = load_manifest(tmp_path / "f.csv").table.set_index("path")
    names = ["dr/one pixel.png", "dr/one.png", "dr/zero.jpg", "normal/left eye.png"]
    assert sorted(imported.index) == names
    check = cli("data", "check", tmp_path / "f.csv", "-q")  # unreadable files: found there
    assert check.exit_code == 1 and "zero.jpg: empty file" in check.output

    table_root = tmp_path / "csv"
    table_root.mkdir()
    Image.fromarray(rgb).save(table_root / "a b.png")
    Image.fromarray(rgb[:, ::-1]).save(table_root / "c.png")
    labels = table_root / "labels.csv"
    cases = {  # labels.csv bytes -> None (imports) or the error it must give
        "\ufeffpath;label;patient_id\r\na b.png;normal;P1\r\nc.png;dr;\r\n": None,
        "path,label\na b.png,normal\nc.png,\n": "line 3: empty label",
        "path,label\na b.png,normal\nc.png,dr\na b.png,dr\n": "lines 2 and 4 both list 'a b.png'",
        "file,label\na b.png,normal\n": "missing columns ['path']",
        "path,label\nnothere.png,normal\nc.png,dr\n": "line 2: no file 'nothere.png'",
    }
    for text, error in cases.items():
        labels.write_bytes(text.encode("utf-8"))
        out = tmp_path / "c.csv"
        result = cli("data", "import", "csv", table_root, "--out", out, "--no-group-duplicates")
        if error is None:
            assert result.exit_code == 0, result.output
            got = load_manifest(out).table.set_index("path")
            assert list(got.label) == ["normal", "dr"] and got.loc["c.png", "patient_id"] == "c"
        else:
            assert result.exit_code == 2 and error in result.output, (text, result.output)


def manifest_variant(setup: dict, folder: Path, change=None, text=None) -> Path:
    """The generated manifest with its data root pointed back at the images, then changed:
    `change` is a column to drop or (row, column, value); `text` a dialect to save it in."""
    folder.mkdir(parents=True)
    source = setup["manifest"]
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    if isinstance(change, str):
        table = table.drop(columns=change)
    elif change:
        table.loc[change[0], change[1]] = change[2]
    path = folder / "manifest.csv"
    table.to_csv(path, index=False, sep=";" if text in ("semicolon", "all") else ",")
    sidecar = (source.with_suffix(".yaml")).read_text()
    path.with_suffix(".yaml").write_text(sidecar.replace("root: .", f"root: {source.parent}"))
    data = path.read_bytes()
    if text in ("bom", "all"):
        data = "\ufeff".encode() + data
    if text in ("crlf", "all"):
        data = data.replace(b"\n", b"\r\n")
    path.write_bytes(data)
    return path


FAULTS = {  # name -> (change, data check says, split and finetune say)
    "missing_column": (
        "patient_id",
        "manifest patient_id: required columns missing",
        "missing column(s) patient_id",
    ),
    "missing_label_column": (
        "abnormal",
        "manifest abnormal: task 'abnormal' needs these columns",
        "missing column(s) abnormal; run `fundusfm data check",
    ),
    "empty_label": (
        (3, "abnormal", ""),
        "line 5 [P00001_left] abnormal: missing label for task 'abnormal'",
        "line 5: empty label in column abnormal (1 empty in all); fill in a label",
    ),
    "duplicate_id": (
        (3, "image_id", "P00000_right"),
        "line 5 [P00000_right] image_id: duplicate image_id (first on line 2)",
        "line 5: image_id 'P00000_right' repeats line 2",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_manifest_faults_are_named_by_every_command(setup, tmp_path: Path, fault: str):
    change, check_says, training_says = FAULTS[fault]
    path = manifest_variant(setup, tmp_path / "m", change)
    check = cli("data", "check", path, "-q", "--no-decode")
    assert check.exit_code == 1 and check_says in check.output, check.output
    split = cli("split", path, "--out", tmp_path / "s.csv", "--folds", 3, "--task", "abnormal")
    assert split.exit_code == 2 and training_says in split.output, split.output
    assert not (tmp_path / "s.csv").exists()
    train = cli(*setup["args"], "--set", f"data.manifest={path}", "--set", f"run.out={tmp_path}/r")
    assert train.exit_code == 2 and training_says in train.output, train.output
    assert "Traceback" not in train.output


def test_bom_semicolon_and_crlf_just_work(setup, tmp_path: Path):
    clean = manifest_variant(setup, tmp_path / "clean")
    baseline = cli("data", "check", clean, "-q", "--no-decode").output.replace(str(clean), "M")
    splits = {}
    for text in ("bom", "semicolon", "crlf", "all"):
        path = manifest_variant(setup, tmp_path / text, text=text)
        check = cli("data", "check", path, "-q", "--no-decode")
        assert check.output.replace(str(path), "M") == baseline, text
        out = tmp_path / f"{text}.csv"
        assert cli("split", path, "--out", out, "--task", "abnormal").exit_code == 0
        splits[text] = pd.read_csv(out)
    assert cli("split", clean, "--out", tmp_path / "clean.csv", "--task", "abnormal").exit_code == 0
    for table in splits.values():
        pd.testing.assert_frame_equal(table, pd.read_csv(tmp_path / "clean.csv"))
    latin = clean.read_text().replace("P00000_right", "caf\xe9").encode("latin-1")
    (tmp_path / "latin.csv").write_bytes(latin)  # Excel's "CSV" on Windows: not UTF-8
    check = cli("data", "check", tmp_path / "latin.csv")
    assert check.exit_code == 2 and "not UTF-8 text (byte 0xe9 at offset" in check.output
    path = tmp_path / "all" / "manifest.csv"  # and it trains
    run = tmp_path / "run"
    more = [f"data.manifest={path}", f"run.out={run}", "train.epochs=1"]
    train = cli(*setup["args"], *[x for kv in more for x in ("--set", kv)])
    assert train.exit_code == 0, train.output
    assert len(pd.read_csv(run / "predictions.csv")) > 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_then_resume_equals_an_uninterrupted_run(setup, tmp_path: Path):
    """A real process is killed as soon as its first checkpoint appears, then resumed."""
    args = [*setup["args"], "--set", f"run.out={tmp_path / 'cut'}"]
    run = tmp_path / "cut"
    for _attempt in range(3):  # a run that finished before the kill landed is simply redone
        shutil.rmtree(run, ignore_errors=True)
        with open(tmp_path / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fundusfm", *map(str, args)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            )
        deadline = time.monotonic() + 300  # a safety net against a hang, not a timing check
        while not (run / "checkpoint.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.kill()  # SIGKILL; nothing is sent to a process already reaped
        proc.wait()
        if not (run / "metrics.json").exists():
            break
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    assert (run / "checkpoint.pt").is_file() and not (run / "metrics.json").exists()
    refused = cli(*args)
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = cli(*[a for a in args if a != "-q"], "--resume")  # prints each epoch it trains
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 1:" not in resumed.output and "epoch 3:" in resumed.output  # continued
    whole = setup["whole"]
    pd.testing.assert_frame_equal(
        pd.read_csv(whole / "predictions.csv"), pd.read_csv(run / "predictions.csv"), atol=1e-6
    )
    a, b = (  # numbers to 1e-6 (they are in fact equal: training is deterministic on CPU)
        json.loads((d / "metrics.json").read_text(), parse_float=lambda v: round(float(v), 6))
        for d in (whole, run)
    )
    assert len(a["history"]) == 3 and a == b
