import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import validate
from common.data import (DATASET_SCHEMA, ResumableDistributedSampler, ShapesDataset, UnreadableImageWarning,
                         build_dataset, build_dataset_from_config, build_loader, build_transform,
                         parse_official_transform, save_image_grid, to_uint8)
from common.errors import DataError


def write_image(path, size=(40, 30), seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def truncated_jpeg(path, seed=0):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------

def test_shapes_are_deterministic_by_index_in_any_order_and_object():
    first, second = ShapesDataset("train", 32), ShapesDataset("train", 32)
    forward = [first[i]["image"] for i in range(12)]
    backward = [second[i]["image"] for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
    assert torch.equal(first[5]["image"], first[5]["image"])
    assert not torch.equal(forward[0], forward[10])  # same class, different drawing


def test_shapes_are_class_balanced_with_ten_labels_in_range():
    dataset = ShapesDataset("val", 16, num_samples=40)
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    assert labels == [i % 10 for i in range(40)]
    assert len(ShapesDataset.class_names) == len(set(ShapesDataset.class_names)) == 10
    item = dataset[3]
    assert item["skipped"] == 0 and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1


@pytest.mark.parametrize("resolution", [8, 32, 64, 256])
def test_shapes_resolution_gives_requested_shape(resolution):
    assert ShapesDataset("train", resolution, num_samples=2)[1]["image"].shape == (3, resolution, resolution)


def test_shapes_splits_sizes_and_seeds_differ():
    train, val = ShapesDataset("train", 32), ShapesDataset("val", 32)
    assert (len(train), len(val)) == (10_000, 1_000)
    assert not torch.equal(train[0]["image"], val[0]["image"])
    assert not torch.equal(train[0]["image"], ShapesDataset("train", 32, seed=1)[0]["image"])


def test_shapes_refuse_bad_split_and_resolution():
    with pytest.raises(DataError, match="'test'"):
        ShapesDataset("test")
    with pytest.raises(DataError, match=">= 8"):
        ShapesDataset("train", resolution=4)


def test_shapes_flip_depends_on_epoch_not_on_global_rng():
    dataset = ShapesDataset("train", 32, num_samples=64, flip=True)
    plain = ShapesDataset("train", 32, num_samples=64)
    flipped = [not torch.equal(dataset[i]["image"], plain[i]["image"]) for i in range(64)]
    assert 10 < sum(flipped) < 54
    for i in range(64):
        expected = plain[i]["image"].flip(-1) if flipped[i] else plain[i]["image"]
        assert torch.equal(dataset[i]["image"], expected)
    torch.manual_seed(123)
    again = dataset[7]["image"]
    torch.manual_seed(456)
    assert torch.equal(again, dataset[7]["image"])
    dataset.set_epoch(1)
    assert [not torch.equal(dataset[i]["image"], plain[i]["image"]) for i in range(64)] != flipped


def test_augmentation_leaves_global_rng_untouched():
    dataset = ShapesDataset("train", 16, flip=True)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dataset[0], dataset[1]
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def folder_with_bad_files(tmp_path):
    root = tmp_path / "images"
    for i in range(6):
        write_image(root / f"sub{i % 2}" / f"img{i}.png", seed=i)
    (root / "sub0" / "img2b.png").write_bytes(np.random.default_rng(9).bytes(300))  # not an image at all
    truncated_jpeg(root / "sub1" / "img3b.JPEG")
    (root / "notes.txt").write_text("not an image extension: ignored")
    return root


def test_folder_lists_images_recursively_sorted(folder_with_bad_files):
    dataset = build_dataset("folder", "train", root=str(folder_with_bad_files), resolution=16)
    names = [p.split("images/")[1] for p in dataset.paths]
    assert names == sorted(names) and len(names) == 8
    assert "sub1/img3b.JPEG" in names and all(label == 0 for label in dataset.labels)


def test_unreadable_images_are_skipped_counted_and_warned_once(folder_with_bad_files):
    dataset = build_dataset("folder", "val", root=str(folder_with_bad_files), resolution=16)
    bad = {i for i, p in enumerate(dataset.paths) if p.endswith(("img2b.png", "img3b.JPEG"))}
    with pytest.warns(UnreadableImageWarning) as caught:
        items = [dataset[i] for i in range(len(dataset))]
    assert sorted(str(w.message).split(":")[0].rsplit("/", 1)[1] for w in caught) == ["img2b.png", "img3b.JPEG"]
    assert [i for i, item in enumerate(items) if item["skipped"]] == sorted(bad)
    for i in bad:
        assert torch.equal(items[i]["image"], dataset[(i + 1) % len(dataset)]["image"])  # the next readable file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already reported: silent now
        dataset[min(bad)]
    loader = build_loader(dataset, batch_size=4, shuffle=False)
    batches = list(loader)
    assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)
    assert sum(int(b["skipped"].sum()) for b in batches) == 2
    assert batches[0]["label"].shape == (4,) and batches[0]["skipped"].shape == (4,)


def test_folder_with_no_readable_image_is_a_data_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    dataset = build_dataset("folder", "train", root=str(tmp_path), resolution=8)
    with pytest.warns(UnreadableImageWarning), pytest.raises(DataError, match="none of the 1 images"):
        dataset[0]


def test_missing_root_names_path_and_config_key(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        build_dataset("ffhq", "train", root=str(missing))
    assert str(missing) in str(error.value) and "dataset.root" in str(error.value)
    assert "\n" not in str(error.value)


def test_empty_folder_is_a_data_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        build_dataset("lsun-church", "train", root=str(tmp_path / "empty"))


def test_ffhq_style_folder_uses_train_val_subfolders_when_both_exist(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            write_image(tmp_path / split / f"{i}.png")
    assert len(build_dataset("ffhq", "train", root=str(tmp_path), resolution=16)) == 3
    assert len(build_dataset("LSUN-cat", "val", root=str(tmp_path), resolution=16)) == 2


def test_imagenet_labels_follow_sorted_train_class_folders(tmp_path):
    for split, classes in (("train", ["n03", "n01", "n02"]), ("val", ["n02", "n03"])):
        for name in classes:
            write_image(tmp_path / split / name / "a.JPEG", fmt="JPEG")
            write_image(tmp_path / split / name / "b.jpg", fmt="JPEG")
    train = build_dataset("imagenet", "train", root=str(tmp_path), resolution=16)
    val = build_dataset("imagenet", "val", root=str(tmp_path), resolution=16)
    assert train.labels == [0, 0, 1, 1, 2, 2]
    assert val.labels == [1, 1, 2, 2]
    assert [val[i]["label"] for i in range(4)] == [1, 1, 2, 2]
    assert build_dataset("imagenet_u", "val", root=str(tmp_path), resolution=16).labels == [0] * 4
    write_image(tmp_path / "val" / "n99" / "a.png")
    with pytest.raises(DataError, match="n99"):
        build_dataset("imagenet", "val", root=str(tmp_path), resolution=16)
    assert len(build_dataset("imagenet", "train", root=str(tmp_path), resolution=16, num_samples=3)) == 3


def test_build_dataset_refuses_unknown_type_and_split(tmp_path):
    with pytest.raises(DataError, match="shapes, folder"):
        build_dataset("cifar", "train")
    with pytest.raises(DataError, match="'test'.*dataset.split"):
        build_dataset("shapes", "test")


def test_official_config_section_builds_dataset(tmp_path):
    write_image(tmp_path / "0.png", size=(24, 20))
    section = validate({"type": "ffhq", "root": str(tmp_path), "transforms": {"type": "ffhq16x16"}},
                       DATASET_SCHEMA, "c.yaml")
    assert build_dataset_from_config(section, "val")[0]["image"].shape == (3, 16, 16)
    shapes = validate({"type": "shapes", "resolution": 16, "num_samples": 20}, DATASET_SCHEMA, "c.yaml")
    assert len(build_dataset_from_config(shapes, "train")) == 20
    with pytest.raises(DataError, match="disagrees"):
        build_dataset("ffhq", "train", root=str(tmp_path), resolution=32, transform="ffhq16x16")


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ffhq", "imagenet", "lsun", "center_crop", "random_crop", "openmagvit2"])
@pytest.mark.parametrize("train", [True, False])
def test_transforms_give_requested_size_and_range(name, train):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    out = build_transform(name, 24, train=train)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert -1 <= out.min() and out.max() <= 1


def test_center_crop_is_adm_box_halving_then_bicubic():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 1000, 3), dtype=np.uint8))
    halved = image.resize((500, 300), resample=Image.BOX)  # 600 >= 2 * 256; 300 < 512 stops
    resized = halved.resize((427, 256), resample=Image.BICUBIC)  # round(500 * 256 / 300) = 427
    expected = np.array(resized)[:, 85:85 + 256]  # (427 - 256) // 2 = 85
    out = build_transform("center_crop", 256, train=False)(image)
    assert torch.equal(to_uint8(out[None])[0], torch.from_numpy(expected))


def test_none_transform_normalizes_exactly_and_checks_size():
    pixels = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(8, 8, 3)
    out = build_transform("none", 8, train=False)(Image.fromarray(pixels))
    assert torch.allclose(out, torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1, atol=1e-6)
    with pytest.raises(DataError, match="8x8"):
        build_transform("none", 8, train=False)(Image.new("RGB", (9, 8)))
    with pytest.raises(DataError, match="center_crop"):
        build_transform("bogus", 8, train=True)


def test_parse_official_transform_names():
    assert parse_official_transform("ffhq256x256") == ("ffhq", 256)
    assert parse_official_transform("ffhq16x16") == ("ffhq", 16)
    assert parse_official_transform("imagenet256x256") == ("imagenet", 256)
    assert parse_official_transform("LSUN") == ("lsun", 256)
    assert parse_official_transform("LSUN-church") == ("lsun", 256)
    with pytest.raises(DataError, match="ffhq256x256"):
        parse_official_transform("cifar32")


def test_flip_switch_overrides_official_choice_in_training_only():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mirrored = build_transform("none", 16, train=False)(image).flip(-1)

    def outcomes(name, train, flip):
        flips = []
        for seed in range(16):
            torch.manual_seed(seed)
            flips.append(torch.equal(build_transform(name, 16, train=train, flip=flip)(image), mirrored))
        return set(flips)

    assert outcomes("lsun", True, None) == {False}  # LSUN's official recipe does not flip
    assert outcomes("lsun", True, True) == {False, True}
    assert outcomes("imagenet", True, None) == {False, True}
    assert outcomes("imagenet", True, False) == {False}
    assert outcomes("imagenet", False, True) == {False}  # evaluation never flips


def test_augmentation_is_identical_with_zero_or_two_workers(tmp_path):
    for i in range(8):
        write_image(tmp_path / f"{i}.png", size=(40, 32), seed=i)
    dataset = build_dataset("ffhq", "train", root=str(tmp_path), resolution=16)
    runs = []
    for workers in (0, 2):
        loader = build_loader(dataset, batch_size=4, seed=3, num_workers=workers, epoch=2)
        runs.append(torch.cat([b["image"] for b in loader]))
    assert torch.equal(runs[0], runs[1])
    other_epoch = torch.cat([b["image"] for b in build_loader(dataset, batch_size=4, seed=3, epoch=3)])
    assert not torch.equal(runs[0], other_epoch)


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------

def test_two_ranks_are_disjoint_and_together_equal_one_rank():
    single = ResumableDistributedSampler(20, shuffle=True, seed=5)
    ranks = [ResumableDistributedSampler(20, num_replicas=2, rank=r, shuffle=True, seed=5) for r in range(2)]
    for sampler in [single, *ranks]:
        sampler.set_epoch(3)
    order, (zero, one) = list(single), [list(s) for s in ranks]
    assert len(zero) == len(one) == 10 and not set(zero) & set(one)
    assert sorted(zero + one) == sorted(order) == list(range(20))
    for k in range(5):  # global batch of 4 on one process == union of the two ranks' batches of 2
        assert sorted(order[4 * k: 4 * k + 4]) == sorted(zero[2 * k: 2 * k + 2] + one[2 * k: 2 * k + 2])


def test_sampler_epochs_differ_and_repeat():
    sampler = ResumableDistributedSampler(50, seed=1)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_resume_with_start_index_continues_the_same_sequence():
    sampler = ResumableDistributedSampler(23, num_replicas=3, rank=1, seed=7)
    sampler.set_epoch(4)
    full = list(sampler)
    assert len(full) == len(sampler) == 7  # 23 // 3, drop_last
    sampler.set_epoch(4, start_index=5)
    assert list(sampler) == full[5:] and len(sampler) == 2
    with pytest.raises(DataError, match="resume"):
        sampler.set_epoch(4, start_index=8)


def test_sampler_pads_without_drop_last_and_keeps_order_without_shuffle():
    ranks = [ResumableDistributedSampler(5, num_replicas=4, rank=r, shuffle=False, drop_last=False) for r in range(4)]
    assert [list(s) for s in ranks] == [[0, 4], [1, 0], [2, 1], [3, 2]]


def test_loader_resume_yields_the_remaining_batches():
    dataset = ShapesDataset("train", 8, num_samples=24, flip=True)
    full = [b["label"] for b in build_loader(dataset, batch_size=4, seed=2, epoch=1)]
    resumed = [b["label"] for b in build_loader(dataset, batch_size=4, seed=2, epoch=1, start_index=8)]
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))


# ----------------------------------------------------------------------------------------------
# Images out
# ----------------------------------------------------------------------------------------------

def test_to_uint8_rounds_and_clamps():
    images = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 2 * 100.4 / 255 - 1]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    out = to_uint8(images)
    assert out.shape == (1, 2, 3, 3) and out.dtype == torch.uint8
    assert out[0, :, :, 0].flatten().tolist() == [0, 0, 128, 255, 255, 100]


def test_save_image_grid_writes_png_in_new_folder(tmp_path):
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    path = tmp_path / "deep" / "er" / "grid.png"
    save_image_grid(images, str(path))
    with Image.open(path) as grid:
        assert grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 3 per row (ceil sqrt 5), padding 2
    save_image_grid(images, str(path), nrow=5)
    with Image.open(path) as grid:
        assert grid.size == (5 * 10 + 2, 12)
