"""What `python -m raysnet.predict` reads and writes: the images named by `images=`, and the rows of
predictions in `out=`. One place for each, shared by the local engine and the Ray Data one, so the
same input gives the same rows in the same file either way.

    inputs = list_inputs("photos/")                # Input(name, path, data) in a sorted walk
    item = load(inputs[0], preprocess)             # raysnet.classifier.Item: views, or why not
    with open_output("preds.jsonl", k=5) as out:   # written under a temporary name, renamed at the end
        out.write(row)

`images=`: a file (always tried, whatever its name), a directory or an object-store prefix (its
files with an image extension, recursively, in walk order), a .tar/.tar.gz archive (its members, in
the archive's order, read into memory) or a list of any of these. `out=`: .jsonl, .csv or
.parquet, a local path or a URI; nothing (stdout): one line per image.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from raysnet.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
ARCHIVES = (".tar", ".tar.gz", ".tgz")
FORMATS = (".jsonl", ".csv", ".parquet")


class Input(NamedTuple):
    """One image to predict: its name in the output, where to read it (a local absolute path or a
    URI), or its bytes already read (an archive's member)."""

    name: str
    path: str
    data: bytes | None = None


# --- images= ----------------------------------------------------------------------------------------

def _is_uri(s: str) -> bool:
    return "://" in s


def _image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _visible(relative: str) -> bool:
    return not any(part.startswith(".") for part in relative.split("/"))


def _missing(spec: str, why: str) -> UsageError:
    return UsageError(f"images={spec}: {why}. Expected an image file, a directory of images (searched "
                      f"recursively for {', '.join(IMAGE_EXTENSIONS)}), a .tar/.tar.gz archive of images, an "
                      "object-store prefix such as s3://bucket/photos/, or a list of these: images=[a.jpg,dir].")


def list_inputs(images: str | tuple[str, ...] | list[str]) -> tuple[list[Input], int]:
    """-> (the images, in order; how many files a directory held without an image extension)."""
    specs = [images] if isinstance(images, str) else list(images)
    if not specs or not all(specs):
        raise _missing(str(images) if images else "", "nothing given")
    inputs, skipped = [], 0
    for spec in specs:
        found, skip = _list_one(str(spec))
        inputs += found
        skipped += skip
    return inputs, skipped


def _list_one(spec: str) -> tuple[list[Input], int]:
    if spec.endswith(ARCHIVES):
        return _archive(spec), 0
    if _is_uri(spec):
        return _list_uri(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return [Input(spec, str(path.resolve()))], 0
    if not path.is_dir():
        raise _missing(spec, "no such file or directory")
    # The walk order of raysnet.data.sources (each folder's files, then its folders, sorted), so a
    # tree in a bucket gives its rows in the order the same tree on disk does.
    from raysnet.data.sources import _walk_order

    files = sorted((Path(d, f).relative_to(path).as_posix() for d, _, names in os.walk(path) for f in names),
                   key=_walk_order)
    files = [f for f in files if _visible(f)]
    images = [f for f in files if _image_name(f)]
    root = path.resolve()
    return [Input(f"{spec.rstrip('/')}/{f}", str(root / f)) for f in images], len(files) - len(images)


def _list_uri(spec: str) -> tuple[list[Input], int]:
    from pyarrow import fs

    from raysnet.data.sources import _walk_order
    from raysnet.storage import open_uri

    filesystem, base = open_uri(spec, "images")
    try:
        info = filesystem.get_file_info(base)
        if info.type == fs.FileType.File:
            return [Input(spec, spec)], 0
        if info.type != fs.FileType.Directory:
            raise _missing(spec, "no such object or prefix")
        found = [i.path[len(base) + 1:] for i in filesystem.get_file_info(fs.FileSelector(base, recursive=True))
                 if i.type == fs.FileType.File]
    except OSError as e:
        raise _missing(spec, f"cannot list it ({str(e).splitlines()[0]})") from None
    files = [f for f in sorted(found, key=_walk_order) if _visible(f)]
    images = [f for f in files if _image_name(f)]
    top = spec.rstrip("/")
    return [Input(f"{top}/{f}", f"{top}/{f}") for f in images], len(files) - len(images)


def _archive(spec: str) -> list[Input]:
    """The regular members of a tar archive (local or an object), in the archive's order, read."""
    from raysnet.data.encode import read_bytes

    if not _is_uri(spec) and not Path(spec).expanduser().is_file():
        raise _missing(spec, "no such archive")
    try:
        data = read_bytes(spec if _is_uri(spec) else str(Path(spec).expanduser()))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return [Input(f"{spec}/{m.name}", f"{spec}/{m.name}", tar.extractfile(m).read())
                    for m in tar if m.isfile() and _visible(m.name)]
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise _missing(spec, f"the archive cannot be read ({type(e).__name__}: {e}): it is truncated or damaged") \
            from None


def read(item: Input) -> bytes:
    from raysnet.data.encode import read_bytes

    return item.data if item.data is not None else read_bytes(item.path)


def load(item: Input, preprocess) -> Any:
    """The image made ready for the network (raysnet.classifier.Item); a file that cannot be read
    is an Item with the reason, like one that is not an image."""
    from raysnet.classifier import Item

    try:
        data = read(item)
    except OSError as e:
        return Item(None, error=f"cannot read the file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return preprocess(data)


# --- out= -------------------------------------------------------------------------------------------

def check_out(out: str, overwrite: bool) -> None:
    """Before any work: a known format, and nothing there unless overwrite=true."""
    if not out:
        return
    if not out.lower().endswith(FORMATS):
        raise UsageError(f"out={out}: unknown format. Expected a file name ending in {', '.join(FORMATS)} "
                         "(JSON lines, CSV or Parquet), a local path or a URI; without out=, the rows are printed.")
    if overwrite:
        return
    if _is_uri(out):
        from pyarrow import fs

        from raysnet.storage import open_uri

        filesystem, where = open_uri(out, "out")
        try:
            there = filesystem.get_file_info(where).type != fs.FileType.NotFound
        except OSError as e:
            raise UsageError(f"cannot reach out={out}: {str(e).splitlines()[0]}.") from None
    else:
        there = Path(out).expanduser().exists()
    if there:
        raise UsageError(f"out={out} already exists and was left as it is. Give another out=, or overwrite=true "
                         "to replace it.")


def csv_header(k: int) -> list[str]:
    """path, class_1, prob_1, ..., class_k, prob_k, note, error: the top k, best first."""
    return ["path", *(f"{w}_{i}" for i in range(1, k + 1) for w in ("class", "prob")), "note", "error"]


def csv_row(row: dict, k: int) -> list:
    pairs = [v for c, p in zip(row["classes"], row["probs"]) for v in (c, repr(p))]
    return [row["path"], *pairs, *[""] * (2 * k - len(pairs)), row["note"], row["error"]]


def from_csv(record: dict) -> dict:
    """A row as csv_row wrote it, back (tests and readers of the CSV)."""
    k = sum(key.startswith("class_") for key in record)
    classes = [record[f"class_{i}"] for i in range(1, k + 1) if record[f"class_{i}"] != ""]
    probs = [float(record[f"prob_{i}"]) for i in range(1, len(classes) + 1)]
    return {"path": record["path"], "classes": classes, "probs": probs, "note": record["note"],
            "error": record["error"]}


def line(row: dict) -> str:
    """`path: name (p) name (p) ...`, or the error; a note in brackets."""
    if row["error"]:
        return f"{row['path']}: error: {row['error']}"
    best = " ".join(f"{c} ({p:.3f})" for c, p in zip(row["classes"], row["probs"]))
    return f"{row['path']}: {best}" + (f"  [{row['note']}]" if row["note"] else "")


class _Lines:
    def __init__(self, stream):
        self.stream = stream

    def write(self, row: dict) -> None:
        print(line(row), file=self.stream, flush=False)


class _Jsonl:
    def __init__(self, f):
        self.f = f

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")


class _Csv:
    def __init__(self, f, k: int):
        self.k, self.w = k, csv.writer(f)
        self.w.writerow(csv_header(k))

    def write(self, row: dict) -> None:
        self.w.writerow(csv_row(row, self.k))


class _Parquet:
    """Row groups of ROWS rows: path, classes list<string>, probs list<double>, note, error."""

    ROWS = 4096

    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = pa.schema([("path", pa.string()), ("classes", pa.list_(pa.string())),
                                 ("probs", pa.list_(pa.float64())), ("note", pa.string()), ("error", pa.string())])
        self.writer, self.rows = pq.ParquetWriter(path, self.schema), []

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.ROWS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


@contextlib.contextmanager
def open_output(out: str, k: int) -> Iterator[Any]:
    """A writer of rows (`.write(row)`) into `out`, or lines on stdout when `out` is empty. The file
    is written under a temporary name beside it (locally) or on this machine (a URI) and takes its
    name only when every row is in: a failed or stopped run leaves no half-written `out`."""
    if not out:
        yield _Lines(sys.stdout)
        sys.stdout.flush()
        return
    suffix = Path(out).suffix.lower()
    local = None if _is_uri(out) else Path(out).expanduser()
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(out).name}.", suffix=".part",
                               dir=str(local.parent) if local is not None else None)
    os.close(fd)
    try:
        if suffix == ".parquet":
            writer = _Parquet(tmp)
            yield writer
            writer.close()
        else:
            with open(tmp, "w", newline="") as f:
                yield _Csv(f, k) if suffix == ".csv" else _Jsonl(f)
        if local is not None:
            os.replace(tmp, local)
        else:
            _upload(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _upload(tmp: str, out: str) -> None:
    """One whole object (an object store has no rename; a PUT of the finished file is the same)."""
    from raysnet.storage import CHUNK, open_uri

    filesystem, where = open_uri(out, "out")
    try:
        with open(tmp, "rb") as f, filesystem.open_output_stream(where) as dst:
            while chunk := f.read(CHUNK):
                dst.write(chunk)
    except OSError as e:
        raise UsageError(f"cannot write out={out}: {str(e).splitlines()[0]}. Check the URI and this machine's "
                         "credentials for the object store; nothing was written there.") from None


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a local output file of any format (tests, and a reader's quick look)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [from_csv(r) for r in csv.DictReader(f)]
    return [json.loads(x) for x in path.read_text().splitlines()]
