"""Caption files and caption sets: what image goes with what caption, read from the layouts users have.

- A captions file: `.jsonl` rows `{"file": ..., "caption": ...}`, or text lines `file<TAB>caption`
  (`.tsv`, CC-3M's `*_list.txt`), or text lines holding only a caption (a prompt list; paired by
  index). Blank lines are skipped; a file mixes none of these forms.
- CC-3M as the official download script lays it out: `<root>/<split>_list.txt` rows
  `./<split>/<hash><TAB>caption`, split train or val, image files without an extension.
- MS-COCO 2014 val captions: the annotation JSON (`images`, `annotations`); one item per image in
  ascending image id, captioned by its first caption in file order, as the official text-to-image
  evaluation reads `captions_val2014_30K_samples.json`. Images without a caption are left out.
- The captions file written beside text-to-image samples (`CAPTIONS_FILE`): image `sample_file_name(i)`
  was generated from caption i.

Nothing here opens an image: `missing_files` only checks that the listed files exist.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from common.errors import DataError
from common.paths import require_file

CAPTIONS_FILE = "captions.jsonl"
CC3M_SPLIT_FILE = "{split}_list.txt"
COCO_ANNOTATIONS = ("annotations/captions_val2014_30K_samples.json", "annotations/captions_val2014.json")
COCO_IMAGE_FOLDERS = ("images/val2014", "val2014")

Row = tuple[str | None, str]  # (image file or None, caption)


def sample_file_name(index: int) -> str:
    """The file name of the sample generated from caption `index`: `00012.png` (its stem is the index)."""
    return f"{index:05d}.png"


def read_text(path: str, what: str) -> str:
    require_file(path, what, DataError)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; a {what} file is UTF-8") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the {what} file ({error.strerror})") from None


def parse_jsonl_row(line: str, where: str) -> Row:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not a JSON object ({error.msg}); each line is "
                        '{"file": "...", "caption": "..."}') from None
    if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
        raise DataError(f"{where}: each line needs a string \"caption\" (and \"file\" naming its image)")
    file = row.get("file")
    if file is not None and not isinstance(file, str):
        raise DataError(f"{where}: \"file\" must be a string, got {file!r}")
    return file, row["caption"]


def parse_text_row(line: str, where: str) -> Row:
    fields = line.split("\t")
    if len(fields) > 2:
        raise DataError(f"{where}: {len(fields)} tab-separated fields; a line is file<TAB>caption or a caption alone")
    return (fields[0].strip(), fields[1]) if len(fields) == 2 else (None, fields[0])


def read_caption_rows(path: str) -> list[Row]:
    """The (file or None, caption) rows of a captions file, in file order (see the module's doc)."""
    parse = parse_jsonl_row if path.lower().endswith(".jsonl") else parse_text_row
    rows, forms = [], set()
    for number, line in enumerate(read_text(path, "captions").split("\n"), start=1):  # as readlines: \n only
        if not line.strip():
            continue
        where = f"{path}:{number}"
        file, caption = parse(line, where)
        caption = caption.strip()
        if not caption:
            raise DataError(f"{where}: an empty caption; give every image a caption or remove the line")
        if file == "":
            raise DataError(f"{where}: an empty file name before the caption")
        forms.add(file is None)
        if len(forms) > 1:
            raise DataError(f"{where}: some lines name an image file and others do not; "
                            "name the image of every caption, or of none")
        rows.append((file, caption))
    if not rows:
        raise DataError(f"{path}: no captions in the file; it should hold file<TAB>caption lines or "
                        '{"file": ..., "caption": ...} JSON lines')
    return rows


def read_captioned_files(path: str) -> tuple[list[str], list[str]]:
    """Image names and captions of a captions file whose rows all name their image."""
    rows = read_caption_rows(path)
    if rows[0][0] is None:
        raise DataError(f"{path}: the lines hold captions only; a caption dataset needs file<TAB>caption lines "
                        '(or {"file": ..., "caption": ...} JSON lines) naming each image')
    return [file for file, _ in rows], [caption for _, caption in rows]


def first_existing(root: str, names: Sequence[str], exists: Callable[[str], bool], otherwise: str) -> str:
    """The first `root/name` that `exists`; else a DataError naming them all and saying what to do."""
    for name in names:
        candidate = os.path.join(root, name)
        if exists(candidate):
            return candidate
    raise DataError(f"{root}: no {' or '.join(names)}; {otherwise}")


def default_captions_file(root: str) -> str:
    """`root/captions.jsonl` or `root/captions.tsv`, whichever exists (the first if both)."""
    return first_existing(root, (CAPTIONS_FILE, "captions.tsv"), os.path.isfile,
                          "set dataset.captions_file=PATH (file<TAB>caption lines, or "
                          '{"file": ..., "caption": ...} JSON lines)')


def cc3m_list_file(root: str, split: str) -> str:
    """CC-3M's `<root>/<split>_list.txt`, image path (relative to `root`) and caption per line."""
    listing = os.path.join(root, CC3M_SPLIT_FILE.format(split=split))
    if not os.path.isfile(listing):
        raise DataError(f"{listing}: CC-3M list file not found; the official data/cc3m/download_cc3m.py writes it "
                        "(image path<TAB>caption per line); set dataset.root to the folder that holds it")
    return listing


def coco_annotations_file(root: str, explicit: str | None) -> str:
    """`explicit`, else the official 30K-sample file, else the full captions_val2014.json under `root`."""
    return explicit or first_existing(root, COCO_ANNOTATIONS, os.path.isfile, "put the MS-COCO 2014 caption "
                                      "annotations there or set dataset.captions_file=PATH")


def coco_image_folder(root: str) -> str:
    return first_existing(root, COCO_IMAGE_FOLDERS, os.path.isdir, "put the MS-COCO val2014 images in that "
                          "folder or set dataset.root=PATH")


def coco_captions(annotations: str) -> tuple[list[str], list[str]]:
    """Image file names and first captions of a COCO caption annotation file, by ascending image id."""
    try:
        data = json.loads(read_text(annotations, "COCO annotation"))
    except json.JSONDecodeError as error:
        raise DataError(f"{annotations}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{annotations}: not a COCO caption file (needs 'images' and 'annotations' lists)")
    try:
        file_of = {image["id"]: image["file_name"] for image in data["images"]}
        first_caption: dict = {}
        for annotation in data["annotations"]:
            first_caption.setdefault(annotation["image_id"], annotation["caption"])
    except (KeyError, TypeError) as error:
        raise DataError(f"{annotations}: a COCO entry lacks {error} (images need id and file_name, "
                        "annotations image_id and caption)") from None
    ids = sorted(i for i in file_of if i in first_caption)
    if not ids:
        raise DataError(f"{annotations}: no image has a caption")
    return [file_of[i] for i in ids], [first_caption[i].strip() for i in ids]


def missing_files(paths: Sequence[str]) -> list[str]:
    """The paths that do not exist, in order; each folder is listed once (CC-3M has millions of files in one)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder or ".")) if os.path.isdir(folder or ".") else set()
        if name not in listings[folder] and not os.path.exists(path):  # exists: case-insensitive file systems
            missing.append(path)
    return missing


def require_images(paths: Sequence[str], listed_in: str) -> None:
    """Refuse a caption set whose captions file names images that are not there."""
    missing = missing_files(paths)
    if missing:
        raise DataError(f"{listed_in}: {len(missing)} of its {len(paths)} images do not exist, the first "
                        f"{missing[0]}; add them or remove their lines")


def write_captions_file(path: str, captions: Sequence[str], files: Sequence[str] | None = None) -> None:
    """Write the captions file of a set of samples (JSON lines, written whole or not at all).

    `files` are the samples' file names relative to the file's folder; default `sample_file_name(i)`.
    """
    # Imported here: common.metrics imports common.data, which imports this module.
    from common.metrics.fidelity import write_atomic

    files = list(files) if files is not None else [sample_file_name(i) for i in range(len(captions))]
    if len(files) != len(captions):
        raise ValueError(f"{len(files)} file names for {len(captions)} captions")
    text = "".join(json.dumps({"file": file, "caption": caption}, ensure_ascii=False) + "\n"
                   for file, caption in zip(files, captions))
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))
