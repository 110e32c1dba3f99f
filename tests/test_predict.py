"""`python -m raysnet.predict`: the trained digits model on a folder of real digit images (PNG, as a
user saves them) with unreadable and unusual files among them; its rows against raysnet.evaluate's
predictions on the same images; every input form and output format giving the same rows; and the
Ray Data engine on the session's Ray head giving them too."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from clitools import REPO, one_paragraph, run_cli
from PIL import Image
from trained import images

from raysnet import predict
from raysnet.predict_io import read_rows


N = 150  # digits of the validation split, as PNG files in class folders
UNREADABLE = ("odd/x.jpg", "odd/cut.jpg")  # a text file named .jpg, a JPEG cut in half
CONVERTED = ("odd/cmyk.jpg", "odd/grey16.png")  # readable, converted as prepare converts them


def make_folder(root: Path, digits: str) -> Path:
    """root/<label>/<i>.png for the first N validation digits, and root/odd/ with the four odd files."""
    pixels, labels = images(digits, "val")
    for i, (p, label) in enumerate(zip(pixels[:N], labels[:N])):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(root / str(label) / f"{i:03d}.png")
    odd = root / "odd"
    odd.mkdir()
    (odd / "x.jpg").write_text("not an image, whatever its name says")
    jpeg = io.BytesIO()
    Image.fromarray(np.repeat(np.repeat(pixels[0], 4, 0), 4, 1)).save(jpeg, "JPEG")
    (odd / "cut.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    Image.fromarray(pixels[1]).convert("CMYK").save(odd / "cmyk.jpg", "JPEG")
    Image.fromarray(pixels[2][..., 0].astype(np.uint16) * 257).save(odd / "grey16.png")
    assert Image.open(odd / "grey16.png").mode in ("I;16", "I")
    (odd / "notes.txt").write_text("no image extension: skipped in a folder")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits) -> Path:
    return make_folder(tmp_path_factory.mktemp("predict") / "imgs", digits)


@pytest.fixture(scope="module")
def local(folder, trained_digits) -> Path:
    """The rows of the local engine on the folder, written to JSON lines (the reference)."""
    out = folder.parent / "local.jsonl"
    assert predict.run([f"model={trained_digits}", f"images={folder}", f"out={out}", "engine=local"]) == 0
    return out


def index(row: dict) -> int:
    return int(Path(row["path"]).stem)


def same_rows(a: list[dict], b: list[dict], strip: tuple[str, str] = ("", "")) -> None:
    """Same images in the same order, same classes, probabilities within 1e-5, same notes and errors;
    `strip`: the prefix of a's paths that b has instead."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["path"].replace(*strip) == y["path"]
        assert (x["classes"], x["note"], x["error"]) == (y["classes"], y["note"], y["error"]), (x, y)
        assert np.allclose(x["probs"], y["probs"], rtol=0, atol=1e-5), (x, y)


def test_predict_on_a_folder_is_right_says_why_per_file_and_agrees_with_evaluate(capsys, folder, local,
                                                                                  trained_digits, digits):
    """The folder: ≥ 95% of the digits right; one row with its reason for each unreadable file and a
    note for each converted one; exit 0 with the counts in the summary; and the probabilities those
    of raysnet.evaluate's own pipeline (FFCV's loader on val.beton) for the same images."""
    import torch

    from raysnet.checkpoint import load_model
    from raysnet.data import check_dataset
    from raysnet.inference import predictions

    rows = read_rows(local)
    assert len(rows) == N + len(UNREADABLE) + len(CONVERTED)  # notes.txt (no image extension) is not listed
    by_name = {r["path"].removeprefix(f"{folder}/"): r for r in rows}
    digits_rows = [r for name, r in by_name.items() if not name.startswith("odd/")]
    right = sum(r["classes"][0] == Path(r["path"]).parent.name for r in digits_rows)
    assert right >= 0.95 * N, right
    assert all(len(r["classes"]) == 5 and r["probs"] == sorted(r["probs"], reverse=True) for r in digits_rows)
    for name in UNREADABLE:
        assert by_name[name]["error"] and by_name[name]["classes"] == [], by_name[name]
    assert "UnidentifiedImageError" in by_name["odd/x.jpg"]["error"]
    assert "truncated" in by_name["odd/cut.jpg"]["error"].lower(), by_name["odd/cut.jpg"]
    assert "CMYK" in by_name["odd/cmyk.jpg"]["note"] and "16-bit" in by_name["odd/grey16.png"]["note"]
    assert all(by_name[n]["classes"] and not by_name[n]["error"] for n in CONVERTED)
    assert sum(bool(r["error"]) for r in rows) == 2 and sum(bool(r["note"]) for r in rows) == 2

    loaded = load_model(trained_digits)
    meta = check_dataset(loaded.config.data)
    probs = torch.cat([p for p, _ in predictions(loaded.model, loaded.config.data, meta, "single",
                                                  (meta["mean"], meta["std"]), (), 64, None)]).numpy()
    for r in digits_rows:
        top = probs[index(r)]
        assert np.allclose(r["probs"], np.sort(top)[::-1][:5], rtol=0, atol=1e-5), r
        assert r["classes"][0] == meta["classes"][int(top.argmax())]

    # Printed lines (no out=): one per image, and the summary with the counts on stderr.
    done = run_cli(capsys, "raysnet.predict", f"model={trained_digits}", f"images={folder}", "k=2", "engine=local")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert len(lines) == len(rows) and lines[0].startswith(f"{rows[0]['path']}: {rows[0]['classes'][0]} (")
    assert any(line.startswith(f"{folder}/odd/x.jpg: error: UnidentifiedImageError") for line in lines)
    assert f"{len(rows)} images in" in done.err and f"{N + 2} predicted, 2 unreadable" in done.err
    assert "2 converted" in done.err and "1 file(s) without an image extension skipped" in done.err


@pytest.mark.e2e  # five commands, each reading and predicting the whole folder
def test_every_input_form_and_output_format_gives_the_same_rows(capsys, tmp_path, folder, local, trained_digits):
    """CSV and Parquet hold the JSON lines' rows; a .tar.gz of the folder and a list of its files
    give the folder's rows; an existing out= is refused, a missing input is one paragraph, exit 2."""
    rows = read_rows(local)
    model = f"model={trained_digits}"
    for fmt in ("csv", "parquet"):
        done = run_cli(capsys, "raysnet.predict", model, f"images={folder}", f"out={tmp_path / f'p.{fmt}'}",
                       "engine=local")
        assert done.code == 0, done.err
        same_rows(rows, read_rows(tmp_path / f"p.{fmt}"))
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "path,class_1,prob_1,class_2,prob_2,class_3,prob_3,class_4,prob_4,class_5,prob_5,note,error"

    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # members in the folder's walk order
        for r in rows:
            tar.add(r["path"], arcname=r["path"].removeprefix(f"{folder}/"))
    listed = [r["path"] for r in rows]
    for form, images_arg, prefix in (("tar", f"images={archive}", f"{archive}/"),
                                     ("list", f"images=[{','.join(listed)}]", f"{folder}/")):
        out = tmp_path / f"from-{form}.jsonl"
        done = run_cli(capsys, "raysnet.predict", model, images_arg, f"out={out}", "engine=local")
        assert done.code == 0, done.err
        same_rows(rows, read_rows(out), (f"{folder}/", prefix))

    before = (tmp_path / "p.csv").read_bytes()
    refused = one_paragraph(run_cli(capsys, "raysnet.predict", model, f"images={folder}", f"out={tmp_path / 'p.csv'}"))
    assert f"out={tmp_path / 'p.csv'} already exists" in refused and "overwrite=true" in refused
    assert (tmp_path / "p.csv").read_bytes() == before
    missing = one_paragraph(run_cli(capsys, "raysnet.predict", model, f"images={tmp_path / 'nowhere'}",
                                    f"out={tmp_path / 'n.jsonl'}"))
    assert f"images={tmp_path / 'nowhere'}: no such file or directory" in missing
    assert not (tmp_path / "n.jsonl").exists() and not list(tmp_path.glob(".n.jsonl.*"))
    again = run_cli(capsys, "raysnet.predict", model, f"images={folder / '0'}", f"out={tmp_path / 'p.csv'}",
                    "overwrite=true", "engine=local")
    assert again.code == 0 and len(read_rows(tmp_path / "p.csv")) == len(list((folder / "0").iterdir()))


@pytest.mark.e2e
def test_the_ray_data_engine_gives_the_local_rows(folder, local, trained_digits, ray_head, tmp_path):
    """`python -m raysnet.predict ... engine=ray` as a driver of the session's Ray head: reading and
    preprocessing in Ray Data tasks, the model in an actor pool, the same rows as the local engine,
    in the same order."""
    import subprocess

    out = tmp_path / "ray.jsonl"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "raysnet.predict", f"model={trained_digits}", f"images={folder}",
                           f"out={out}", "engine=ray", "concurrency=2", "batch_size=32"], cwd=REPO, env=ray_head,
                          capture_output=True, text=True, timeout=120, check=False)
    print(f"\npredict engine=ray on the session's head: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    same_rows(read_rows(local), read_rows(out))
    assert f"{N + 2} predicted, 2 unreadable" in done.stderr, done.stderr[-2000:]
    assert "connected to the Ray cluster" in done.stderr  # not a Ray of its own
    assert "Traceback" not in done.stderr
    assert json.loads(out.read_text().splitlines()[0])["path"] == read_rows(local)[0]["path"]
