"""Caption datasets: captions files (TSV, JSONL), the CC-3M and MS-COCO layouts, captioned shapes, bad caption files."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.captions import read_caption_rows, sample_file_name, write_captions_file
from common.config import validate
from common.data import (DATASET_SCHEMA, PLACES, SHAPE_COLOURS, CaptionedShapesDataset, ShapesDataset, build_dataset,
                         build_dataset_from_config, caption_list)
from common.errors import DataError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def solid_image(path, colour, size=(24, 16), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path, format=fmt)


def mean_colour(item):
    """The dominant channel of an item's image: which of COLOURS it shows."""
    return list(COLOURS)[int(item["image"].mean(dim=(1, 2)).argmax())]


@pytest.fixture
def folder(tmp_path):
    """Three solid images, each captioned by its colour."""
    for colour in COLOURS:
        solid_image(tmp_path / "images" / f"{colour}.png", colour)
    return tmp_path


def check_items(dataset, expected_colours):
    assert len(dataset) == len(expected_colours)
    for index, colour in enumerate(expected_colours):
        item = dataset[index]
        assert item["caption"] == f"a {colour} square" and mean_colour(item) == colour
        assert item["label"] == -1 and item["skipped"] == 0 and item["image"].shape == (3, 16, 16)


def test_captions_tsv_and_jsonl_pair_each_image_with_its_caption(folder):
    (folder / "list.tsv").write_text("images/green.png\ta green square\n\nimages/red.png\t  a red square \n")
    rows = [{"file": f"images/{c}.png", "caption": f"a {c} square"} for c in ("blue", "red")]
    (folder / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    section = validate({"type": "captions", "root": str(folder), "captions_file": str(folder / "list.tsv"),
                        "resolution": 16}, DATASET_SCHEMA, "test")
    check_items(build_dataset_from_config(section, "train"), ["green", "red"])
    check_items(build_dataset("captions", "val", root=str(folder), resolution=16,
                              captions_file=str(folder / "list.jsonl")), ["blue", "red"])
    assert caption_list(section, "val") == ["a green square", "a red square"]


def test_samples_folder_with_its_captions_file_is_a_caption_dataset(tmp_path):
    for index, colour in enumerate(COLOURS):
        solid_image(tmp_path / sample_file_name(index), colour)
    write_captions_file(str(tmp_path / "captions.jsonl"), [f"a {c} square" for c in COLOURS])
    assert read_caption_rows(str(tmp_path / "captions.jsonl"))[1] == ("00001.png", "a green square")
    check_items(build_dataset("captions", "val", root=str(tmp_path), resolution=16), list(COLOURS))


def test_cc3m_layout_reads_the_split_list_and_extensionless_images(tmp_path):
    for split, colours in (("train", ["red", "green"]), ("val", ["blue"])):
        lines = []
        for colour in colours:
            name = hashlib.md5(colour.encode()).hexdigest()  # the official download names files by hash
            solid_image(tmp_path / split / name, colour, size=(32, 16))
            lines.append(f"./{split}/{name}\ta {colour} square\n")
        (tmp_path / f"{split}_list.txt").write_text("".join(lines))
    check_items(build_dataset("cc3m", "train", root=str(tmp_path), resolution=16), ["red", "green"])
    check_items(build_dataset("cc3m", "val", root=str(tmp_path), resolution=16), ["blue"])
    assert caption_list({"type": "cc3m", "root": str(tmp_path)}, "train") == ["a red square", "a green square"]
    (tmp_path / "val_list.txt").unlink()
    with pytest.raises(DataError, match="val_list.txt: CC-3M list file not found"):
        build_dataset("cc3m", "val", root=str(tmp_path))


def test_coco_layout_gives_one_item_per_image_with_its_first_caption(tmp_path):
    images = [{"id": 30, "file_name": "COCO_val2014_30.jpg"}, {"id": 4, "file_name": "COCO_val2014_4.jpg"},
              {"id": 9, "file_name": "COCO_val2014_9.jpg"}]  # id 9 has no caption
    annotations = [{"image_id": 30, "id": 1, "caption": "a blue square"},
                   {"image_id": 4, "id": 2, "caption": "a green square\n"},
                   {"image_id": 30, "id": 3, "caption": "another caption"}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2014.json").write_text(json.dumps(
        {"images": images, "annotations": annotations}))
    section = {"type": "coco_2014val", "root": str(tmp_path), "resolution": 16}
    assert caption_list(section, "val") == ["a green square", "a blue square"]  # no image needed for the captions
    with pytest.raises(DataError, match="images/val2014 or val2014; put the MS-COCO val2014 images"):
        build_dataset_from_config(section, "val")
    solid_image(tmp_path / "images" / "val2014" / "COCO_val2014_4.jpg", "green", fmt="JPEG")
    solid_image(tmp_path / "images" / "val2014" / "COCO_val2014_30.jpg", "blue", fmt="JPEG")
    check_items(build_dataset_from_config(section, "val"), ["green", "blue"])


def test_caption_file_naming_missing_images_is_refused_naming_the_first(folder):
    listing = folder / "list.tsv"
    listing.write_text("images/red.png\tred\nimages/gone.png\tgone\nimages/lost.png\tlost\n")
    with pytest.raises(DataError) as error:
        build_dataset("captions", "train", root=str(folder), captions_file=str(listing))
    message = str(error.value)
    assert "\n" not in message and str(listing) in message and "gone.png" in message and "2 of its 3" in message


@pytest.mark.parametrize("content, fragment", [
    ("", "no captions in the file"),
    ("\n  \n", "no captions in the file"),
    ("images/red.png\t \n", ":1: an empty caption"),
    ("images/red.png\tred\tmore\n", ":1: 3 tab-separated fields"),
    ("images/red.png\tred\njust a caption\n", ":2: some lines name an image file and others do not"),
    ("a caption alone\n", "the lines hold captions only"),
])
def test_bad_captions_files_are_refused_with_one_line(folder, content, fragment):
    listing = folder / "list.tsv"
    listing.write_text(content)
    with pytest.raises(DataError, match=fragment) as error:
        build_dataset("captions", "train", root=str(folder), captions_file=str(listing))
    assert "\n" not in str(error.value)


def test_caption_options_are_refused_where_they_mean_nothing(folder):
    with pytest.raises(DataError, match="dataset.captions applies to the built-in shapes"):
        build_dataset("folder", "train", root=str(folder), captions=True)
    with pytest.raises(DataError, match="captions_file is read by dataset.type captions and coco_2014val"):
        build_dataset("cc3m", "train", root=str(folder), captions_file="x.tsv")
    with pytest.raises(DataError, match="a flip would turn left into right"):
        build_dataset("shapes", "train", captions=True, flip=True)
    with pytest.raises(DataError, match="no captions.jsonl or captions.tsv"):
        build_dataset("captions", "train", root=str(folder))
    with pytest.raises(DataError, match="dataset.type shapes has no captions"):
        caption_list({"type": "shapes"}, "train")


def test_dalle_vqvae_transform_squashes_in_eval_and_crops_in_training(tmp_path):
    solid_image(tmp_path / "wide.png", "red", size=(64, 20))
    (tmp_path / "c.tsv").write_text("wide.png\ta red square\n")
    kwargs = {"root": str(tmp_path), "captions_file": str(tmp_path / "c.tsv"), "resolution": 16,
              "transform": "dalle-vqvae"}
    assert build_dataset("captions", "val", **kwargs)[0]["image"].shape == (3, 16, 16)
    train = build_dataset("captions", "train", **kwargs)
    assert train[0]["image"].shape == (3, 16, 16) and torch.equal(train[0]["image"], train[0]["image"])


# ----------------------------------------------------------------------------------------------
# Captioned shapes
# ----------------------------------------------------------------------------------------------

def test_captioned_shapes_captions_are_true_of_the_drawing():
    dataset = build_dataset("shapes", "train", resolution=32, num_samples=60, captions=True)
    assert isinstance(dataset, CaptionedShapesDataset) and dataset.captions == caption_list(
        {"type": "shapes", "captions": True, "num_samples": 60}, "train")
    places = [place for row in PLACES for place in row]
    colours, seen_places = set(), set()
    for index in range(len(dataset)):
        item, scene = dataset[index], dataset.scene(index)
        kind = ShapesDataset.class_names[index % 10]
        assert item["label"] == index % 10 and item["caption"].split(" on ")[0].endswith(f" {kind}")
        pixels = dataset.draw(index).astype(int)
        shape = (np.abs(pixels - SHAPE_COLOURS[scene.colour]).max(axis=2) <= 2)
        background = (np.abs(pixels - SHAPE_COLOURS[scene.background]).max(axis=2) <= 2)
        assert shape.sum() > 3 and background.sum() > 32 * 32 // 2, item["caption"]
        rows, columns = np.nonzero(shape)
        place = PLACES[int(rows.mean() / 32 * 3)][int(columns.mean() / 32 * 3)]  # the thirds its pixels centre in
        assert item["caption"] == (f"{'an' if scene.colour[0] in 'aeiou' else 'a'} {scene.colour} {kind} on "
                                   f"{'an' if scene.background[0] in 'aeiou' else 'a'} {scene.background} "
                                   f"background, {place}")
        assert torch.allclose(item["image"], torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1, atol=1e-6)
        colours.add(scene.colour)
        seen_places.add(place)
    assert len(colours) >= 6 and len(seen_places) >= 7 and seen_places <= set(places)


def test_uncaptioned_shapes_are_the_pixels_they_always_were():
    """Captioned shapes draw on their own stream: the images the quickstart, tests and the cached shapes
    classifier rely on are unchanged (digest taken before captions existed)."""
    digest = hashlib.sha256()
    for split in ("train", "val"):
        shapes = ShapesDataset(split, 32, num_samples=20)
        for index in range(20):
            digest.update(shapes.draw(index).tobytes())
    digest.update(ShapesDataset("train", 96, num_samples=3).draw(2).tobytes())
    assert digest.hexdigest() == "9326247c8da96fcfc4442ddc7707c0be3c2eb39d7f88f044021661783f42ae10"
