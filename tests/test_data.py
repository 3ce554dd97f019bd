import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from synthetic import make_category
from uadc.data.mvtec import build_test_sets, build_train_set, list_test_samples, untested, validate_test_masks
from uadc.data.sources import resolve_sources
from uadc.core.errors import UadcError

NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture
def data(tmp_path):
    make_category(tmp_path, "a", n_train=3, n_good=1, n_defect=2, seed=3)
    make_category(tmp_path, "b", n_train=2, n_good=1, n_defect=1, seed=4, rgb=False)
    return tmp_path


def test_unified_train_set_and_per_category_tests(data):
    pairs = resolve_sources([{"root": str(data), "categories": None}])
    assert [c for _, c in pairs] == ["a", "b"]
    train = build_train_set(pairs, 32, NORM)
    assert len(train) == 5 and {s.category for s in train.samples} == {"a", "b"}
    item = train[3]  # grayscale category comes back as 3-channel
    assert item["image"].shape == (3, 32, 32) and item["label"] == 0
    tests = build_test_sets(pairs, 32, NORM)
    assert sorted(tests) == ["a", "b"]
    labels = [s.label for s in tests["a"].samples]
    assert labels == [1, 1, 0]
    m = tests["a"][0]["mask"]
    assert m.shape == (1, 32, 32) and set(np.unique(m.numpy())) <= {0.0, 1.0} and m.sum() > 0


def test_hidden_files_and_folders_are_not_images(data):
    """A dataset copied from a Mac carries `._000.png` resource forks (not images): training
    stopped on them as unreadable images; a notebook's `.ipynb_checkpoints/` under test/ became a
    defect type. The predict walk leaves them out too, counted."""
    from uadc.core.images import find_images
    good = data / "a" / "train" / "good"
    (good / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    hidden = data / "a" / "test" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(good / "000.png", hidden / "000-checkpoint.png")
    pairs = [(data, "a")]
    train = build_train_set(pairs, 32, NORM)
    assert len(train) == 3 and all(not s.path.name.startswith(".") for s in train.samples)
    tests = build_test_sets(pairs, 32, NORM)
    assert {s.defect for s in tests["a"].samples} == {"good", "blob"}
    found = find_images([data / "a"])
    assert not any(part.startswith(".") for f in found.files for part in f.parts[-3:])
    assert found.skipped["hidden (a name starting with '.', or a macOS zip's __MACOSX)"] == 2
    assert find_images([good / "._000.png"]).files == [good / "._000.png"]   # a file named on purpose still runs


def test_masks_named_as_other_mvtec_style_datasets_name_them(data):
    """BTAD and VisA's MVTec-style split name a mask `<stem>.png` (BTAD's images may be .bmp);
    only MVTec's `<stem>_mask.png` was found, so such a set stopped at `defect image without mask`."""
    gt = data / "a" / "ground_truth" / "blob"
    img_dir = data / "a" / "test" / "blob"
    first, second = sorted(img_dir.glob("*.png"))
    Image.open(first).save(img_dir / "000.bmp")
    first.unlink()
    (gt / "000_mask.png").rename(gt / "000.png")             # BTAD: <stem>.png for a .bmp image
    (gt / "001_mask.png").rename(gt / "001_MASK.PNG")         # case of the name does not matter
    samples = {s.path.name: s.mask_path.name for s in list_test_samples(data, "a") if s.mask_path}
    assert samples == {"000.bmp": "000.png", "001.png": "001_MASK.PNG"}
    (gt / "001_MASK.PNG").rename(gt / "001_other.png")
    with pytest.raises(UadcError, match="defect image without mask: .*001.png"):
        list_test_samples(data, "a")


def test_images_in_subfolders_of_train_good_are_named_in_a_warning(data, caplog):
    """train/good/cam1/*.png (one folder per camera) was left out of training without a word."""
    good = data / "a" / "train" / "good"
    (good / "cam1").mkdir()
    shutil.copy(good / "000.png", good / "cam1" / "x.png")
    (good / "cam2.png").mkdir()                          # a folder named like an image: "unreadable image" before
    shutil.copy(good / "000.png", good / "cam2.png" / "y.png")
    (good / ".ipynb_checkpoints").mkdir()
    shutil.copy(good / "000.png", good / ".ipynb_checkpoints" / "z.png")      # hidden: not counted
    with caplog.at_level("WARNING", logger="uadc.data.mvtec"):
        train = build_train_set([(data, "a")], 32, NORM)
    assert len(train) == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{good}: 2 images in its subfolders are not read (the MVTec layout keeps them directly in the folder)"]


def test_subfolder_warning_is_given_once_per_folder_by_prepare_data(data, caplog):
    """The validation split and the training set both listed train/good: the warning came twice."""
    from uadc.config.recipe import load_recipe
    from uadc.data.prepare import prepare_data

    good = data / "a" / "train" / "good"
    (good / "cam1").mkdir()
    shutil.copy(good / "000.png", good / "cam1" / "x.png")
    recipe = load_recipe({"data": {"sources": [{"root": str(data), "categories": ["a"]}], "image_size": 32},
                          "model": {"backbone": "efficientnet_lite0", "taps": ["blocks.1"]}})
    with caplog.at_level("WARNING", logger="uadc.data.mvtec"):
        prepare_data(recipe)
    assert [r.getMessage() for r in caplog.records if "subfolders" in r.getMessage()] == [
        f"{good}: 1 image in its subfolders is not read (the MVTec layout keeps them directly in the folder)"]


def test_normalisation(data):
    ds = build_train_set(resolve_sources([{"root": str(data), "categories": ["a"]}]), 16, NORM)
    x = ds[0]["image"].numpy()
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_missing_folder(tmp_path):
    with pytest.raises(UadcError, match="data folder not found"):
        resolve_sources([{"root": str(tmp_path / "nope"), "categories": ["a"]}])


def test_missing_category(data):
    with pytest.raises(UadcError, match="category 'zzz' not found"):
        build_train_set(resolve_sources([{"root": str(data), "categories": ["zzz"]}]), 32, NORM)


def test_empty_category(data):
    for f in (data / "a" / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(UadcError, match="category 'a' has no training images"):
        build_train_set([(data, "a")], 32, NORM)


def test_unreadable_image(data):
    (data / "a" / "train" / "good" / "000.png").write_bytes(b"not a png")
    ds = build_train_set([(data, "a")], 32, NORM)
    with pytest.raises(UadcError, match="unreadable image .*000.png"):
        ds[0]


def test_defect_without_mask(data):
    (data / "a" / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(UadcError, match="defect image without mask: .*blob/001.png"):
        list_test_samples(data, "a")


def test_mask_size_mismatch(data):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "a" / "ground_truth" / "blob" / "000_mask.png")
    ds = build_test_sets([(data, "a")], 32, NORM)["a"]
    with pytest.raises(UadcError, match="mask size .* differs from image size"):
        validate_test_masks(ds)


def test_a_category_named_global_is_refused(data):
    """`global` names the thresholds over all categories: a category of that name would be judged at them."""
    shutil.copytree(data / "a", data / "global")
    with pytest.raises(UadcError, match="category name 'global' is reserved"):
        resolve_sources([{"root": str(data), "categories": None}])


def test_duplicate_category(data, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    shutil.copytree(data / "a", other / "a")
    with pytest.raises(UadcError, match="category 'a' appears twice"):
        resolve_sources([{"root": str(data), "categories": ["a"]}, {"root": str(other), "categories": ["a"]}])


def test_category_and_defect_folders_whose_names_are_not_utf8_are_refused(data):
    """Their names become keys of uadc's outputs: a latin-1 category folder (`Gehäuse` from a
    Windows zip) stopped `uadc train` with a UnicodeEncodeError traceback."""
    import os
    odd = os.fsdecode(b"Geh\xe4use")
    shutil.copytree(data / "a", data / odd)
    with pytest.raises(UadcError, match=r"category folder name is not UTF-8 text: .*Geh\\xe4use \(it becomes"):
        resolve_sources([{"root": str(data)}])
    shutil.rmtree(data / odd)
    (data / "a" / "test" / "blob").rename(data / "a" / "test" / os.fsdecode(b"bl\xf6b"))
    with pytest.raises(UadcError, match=r"defect type folder name is not UTF-8 text: .*bl\\xf6b"):
        list_test_samples(data, "a")


def test_folder_walks_follow_symlinked_folders_once(data, tmp_path):
    """A predict input organised with symlinked folders: their images were silently left out (not
    even counted); a link back up must not loop."""
    from uadc.core.images import find_images
    walk = tmp_path / "walk"
    (walk / "own").mkdir(parents=True)
    shutil.copy(data / "a" / "train" / "good" / "000.png", walk / "own" / "x.png")
    (walk / "linked").symlink_to(data / "a" / "test" / "blob", target_is_directory=True)
    (walk / "own" / "up").symlink_to(walk, target_is_directory=True)
    found = find_images([walk])
    blobs = sorted(p.name for p in (data / "a" / "test" / "blob").glob("*.png"))
    assert sorted(f.name for f in found.files) == sorted(blobs + ["x.png"]) and found.skipped == {}
    assert all(f.parts[-2] in ("own", "linked") for f in found.files)     # named by the path walked


@pytest.mark.parametrize("camera", ["bb", "zz"])   # listed before / after the link's name
def test_a_folder_and_a_link_to_it_are_walked_by_the_real_path_whatever_the_names(data, tmp_path, camera):
    """Which of a folder and a symlink to it was kept followed the file system's listing order, and
    the kept path's folder name is the image's category in `uadc predict`; of a file and a link to
    it, the link was kept and the file reported as 'given twice'."""
    from uadc.core.images import find_images
    walk = tmp_path / "walk"
    (walk / camera).mkdir(parents=True)
    shutil.copy(data / "a" / "test" / "blob" / "000.png", walk / camera / "img.png")
    (walk / "stripes").symlink_to(camera, target_is_directory=True)
    (walk / camera / "a_link.png").symlink_to("img.png")
    found = find_images([walk])
    assert found.files == [walk / camera / "img.png"] and found.skipped == {"given twice": 1}


def test_a_named_pipe_or_dangling_link_is_counted_not_read(data, tmp_path):
    """A FIFO named like an image blocked `uadc predict` (and training) forever in the open; in a
    folder walk it and a dangling link were dropped without a count."""
    from uadc.core.images import find_images, open_image
    walk = tmp_path / "walk"
    walk.mkdir()
    shutil.copy(data / "a" / "train" / "good" / "000.png", walk / "x.png")
    os.mkfifo(walk / "pipe.png")
    (walk / "gone.png").symlink_to(tmp_path / "nowhere.png")
    found = find_images([walk])
    assert [f.name for f in found.files] == ["x.png"]
    assert found.skipped == {"broken link": 1, "not a regular file": 1}
    with pytest.raises(UadcError, match="unreadable image .*pipe.png: not a regular file"):
        with open_image(walk / "pipe.png"):
            pass


def test_a_hidden_folder_is_no_category(data):
    """A `.hidden/train/good/` under the data root was taken for a category (and stopped training as
    empty), while hidden names are left out everywhere else."""
    (data / ".trash" / "train" / "good").mkdir(parents=True)
    assert [c for _, c in resolve_sources([{"root": str(data), "categories": None}])] == ["a", "b"]


def test_masks_whose_names_differ_only_in_case_go_to_their_own_image(data):
    """`A.png` and `a.png` both got `a_mask.png` (masks were looked up by lower-cased name only)."""
    blob, gt = data / "a" / "test" / "blob", data / "a" / "ground_truth" / "blob"
    for stem in ("A", "a"):
        shutil.copy(blob / "000.png", blob / f"{stem}.png")
    shutil.copy(gt / "000_mask.png", gt / "A_mask.png")
    shutil.copy(gt / "001_mask.png", gt / "a_mask.png")
    masks = {s.path.name: s.mask_path.name for s in list_test_samples(data, "a") if s.mask_path}
    if os.path.exists(blob / "A.PNG"):
        pytest.skip("a case-insensitive file system cannot hold A.png and a.png side by side")
    assert masks["A.png"] == "A_mask.png" and masks["a.png"] == "a_mask.png" and masks["000.png"] == "000_mask.png"


def test_a_camera_jpeg_rotated_by_its_exif_tag_is_read_as_displayed(tmp_path):
    """EXIF Orientation was ignored: a phone's JPEG (pixels stored rotated, tag 6) was read sideways,
    misaligned with its mask (drawn on the displayed image) and with what an operator sees."""
    from uadc.data.mvtec import load_image
    pix = np.zeros((16, 32, 3), np.uint8)
    pix[:, :8] = 255                                   # stored: 32 wide, bright left edge
    im = Image.fromarray(pix)
    exif = im.getexif()
    exif[0x0112] = 6                                   # displayed rotated 90 degrees clockwise
    im.save(tmp_path / "cam.jpg", exif=exif, quality=100)
    up = load_image(tmp_path / "cam.jpg", 32)
    assert up[:4].mean() > 0.9 and up[-4:].mean() < 0.1   # the bright edge is on top, as displayed
    # the runtime reads it so whether given as a path, bytes or an opened PIL image (which was sideways)
    from uadc.core.manifest import Preprocessing
    from uadc.runtime.preprocess import load_rgb
    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    with Image.open(tmp_path / "cam.jpg") as opened:
        for source in (tmp_path / "cam.jpg", (tmp_path / "cam.jpg").read_bytes(), opened):
            np.testing.assert_array_equal(load_rgb(source, pre), up)


def test_one_folder_under_two_category_names_is_refused(data):
    """`data/link` -> `data/a` was trained on and judged twice (both in the mean), without a word."""
    os.symlink(data / "a", data / "link")
    with pytest.raises(UadcError, match=r"categories 'a' and 'link' are the same folder"):
        resolve_sources([{"root": str(data), "categories": None}])


def test_images_of_types_not_read_are_named_in_a_warning(data, caplog):
    """`.webp` / `.gif` images were left out of training and test without a word."""
    good = data / "a" / "train" / "good"
    Image.open(good / "000.png").save(good / "x.gif")
    Image.open(good / "001.png").save(good / "y.webp")
    train = build_train_set([(data, "a")], 32, NORM)
    assert len(train) == 3 and "its .gif / .webp images are not read (uadc reads .png" in caplog.text


def test_an_unreadable_validation_image_stops_before_training(data, tmp_path):
    """A damaged validation normal passed train and eval (neither reads them) and stopped `uadc compile`."""
    from uadc.config.recipe import recipe_from_dict
    from uadc.data.prepare import prepare_data
    val = tmp_path / "val"
    val.mkdir()
    shutil.copy(data / "a" / "train" / "good" / "000.png", val / "000.png")
    (val / "001.png").write_bytes(b"garbage")
    recipe = recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32,
                                        "val": [{"category": "a", "folder": str(val)}]}, "train": {"epochs": 1}})
    prepare_data(recipe)   # eval and compile of an artifact read no validation image: not stopped by one
    import uadc
    with pytest.raises(UadcError, match=r"unreadable image .*001.png"):
        uadc.train(recipe, artifacts=tmp_path / "art")
    assert not list((tmp_path / "art").rglob("checkpoint.pt"))


def test_a_category_folder_without_train_good_is_named_not_dropped_silently(data, caplog):
    """Images straight in train/, or in train/Good, left the category out of the unified model and its
    mean without a word."""
    (data / "flat" / "train").mkdir(parents=True)
    shutil.copy(data / "a" / "train" / "good" / "000.png", data / "flat" / "train" / "000.png")
    (data / "capital" / "train" / "Good").mkdir(parents=True)
    (data / "notes").mkdir()   # a folder with no train/ or test/ is no category, and no warning
    with caplog.at_level("WARNING", logger="uadc"):
        assert [c for _, c in resolve_sources([{"root": str(data), "categories": None}], warn=True)] == ["a", "b"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("but no train/good/: left out" in m for m in said)
    assert said[0].startswith(f"{data / 'capital'} has train/") and said[1].startswith(f"{data / 'flat'} has train/")
    from uadc.config.recipe import recipe_from_dict
    from uadc.data.prepare import prepare_data
    from uadc.data.sources import check_outside_data
    from uadc.training.checkpoint import data_files
    caplog.clear()   # train listed the root three times (data preparation, the checkpoint, the outside-data
    recipe = recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32}})   # check): said thrice
    with caplog.at_level("WARNING", logger="uadc"):
        prepare_data(recipe)
        data_files(recipe)
        check_outside_data(data.parent / "out", recipe)
    assert [r.getMessage() for r in caplog.records if "but no train/good" in r.getMessage()] == said


def test_test_images_that_are_training_images_or_loose_in_test_are_named(data, caplog):
    """A test/good linked to train/good gave AUROC on images the model trained on, and images straight in
    test/ were left out of the figures; neither said a word."""
    from uadc.config.recipe import recipe_from_dict
    from uadc.data.prepare import prepare_data
    shutil.rmtree(data / "a" / "test" / "good")
    (data / "a" / "test" / "good").symlink_to(data / "a" / "train" / "good", target_is_directory=True)
    shutil.copy(data / "b" / "test" / "good" / "000.png", data / "b" / "test" / "x.png")
    recipe = recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32, "val_fraction": 0}})
    with caplog.at_level("WARNING", logger="uadc"):
        prepare_data(recipe)
    assert "category 'a': 3 of its training images are test images too" in caplog.text
    assert f"{data / 'b' / 'test'}: 1 image directly in it is not read" in caplog.text
    # hard links (cp -al, rsync --link-dest) are the same files: a test/good of them was trained on without a word
    shutil.rmtree(data / "b" / "test" / "good")
    shutil.copytree(data / "b" / "train" / "good", data / "b" / "test" / "good", copy_function=os.link)
    caplog.clear()
    with caplog.at_level("WARNING", logger="uadc"):
        prepare_data(recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32, "val_fraction": 0.5}}))
    n = len(list((data / "b" / "train" / "good").iterdir()))
    assert f"category 'b': {n - n // 2} of its training images are test images too" in caplog.text, caplog.text
    assert f"category 'b': {n // 2} of its {n // 2} validation normals (drawn from train/good by " \
           f"data.val_fraction) are test images" in caplog.text
    # byte-identical copies (cp -r train/good test/good) too: only links were seen
    shutil.rmtree(data / "b" / "test" / "good")
    shutil.copytree(data / "b" / "train" / "good", data / "b" / "test" / "good")
    caplog.clear()
    with caplog.at_level("WARNING", logger="uadc"):
        prepare_data(recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32, "val_fraction": 0}}))
    assert f"category 'b': {n} of its training images are test images too" in caplog.text, caplog.text
    # a copy of another category's test image is named there, not blamed on the category that trains on it
    shutil.rmtree(data / "b" / "test" / "good")
    shutil.copy(data / "a" / "test" / "blob" / "000.png", data / "b" / "train" / "good" / "copy.png")
    caplog.clear()
    with caplog.at_level("WARNING", logger="uadc"):
        prepare_data(recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32, "val_fraction": 0}}))
    assert "category 'a': 1 of its test images are training images of category 'b'" in caplog.text, caplog.text
    assert "category 'b': 1 of its training images" not in caplog.text


def test_an_image_removed_while_a_folder_is_read_is_named_so(tmp_path):
    """It was counted "not a regular file", and its read error showed Python's FileNotFoundError."""
    from uadc.core.errors import UadcError
    from uadc.core.images import _skip_reason, open_image
    gone = tmp_path / "sub" / "img.png"
    assert _skip_reason(gone, tmp_path, {}) == "gone while the folder was read"
    with pytest.raises(UadcError, match=r"^unreadable image .*img.png: No such file or directory$"):
        with open_image(gone):
            pass


@pytest.mark.parametrize("where", ["train/good", "test/blob"])
def test_a_link_loop_or_dangling_link_among_images_is_one_line_naming_it(data, where):
    """A link loop in train/good/ was a RuntimeError traceback (Path.resolve); a dangling link in a
    defect folder was reported as a 'defect image without mask'."""
    folder = data / "a" / where
    os.symlink("loop.png", folder / "loop.png")
    with pytest.raises(UadcError, match=r"unreadable image .*loop.png: broken link"):
        (build_train_set if where == "train/good" else build_test_sets)([(data, "a")], 32, NORM)
    (folder / "loop.png").unlink()
    os.symlink(data / "gone.png", folder / "003.png")
    with pytest.raises(UadcError, match=r"unreadable image .*003.png: broken link"):
        (build_train_set if where == "train/good" else build_test_sets)([(data, "a")], 32, NORM)


def _mask_of(tmp_path, mask: Image.Image, size=(48, 32), fmt="PNG"):
    from uadc.data.mvtec import Sample
    Image.new("RGB", size, (90, 90, 90)).save(tmp_path / "img.png")
    name = tmp_path / f"m.{'jpg' if fmt == 'JPEG' else 'png'}"
    mask.save(name, fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return Sample(tmp_path / "img.png", "c", "blob", name)


def test_masks_in_16_bits_jpeg_soft_or_not_square_mark_what_they_show(tmp_path):
    """A 0/1 label mask in 16 bits came out empty (8-bit rounding first); a red mask saved as JPEG
    marked its ringing too (26.8 % of the image instead of 2.8 %); an empty mask of a non-square image
    passed the 'marks no pixel' check. Instance masks (1..N, one value per defect) keep every defect."""
    from uadc.data.mvtec import ImageDataset, load_mask
    box = np.zeros((32, 48), np.uint8)
    box[8:16, 10:30] = 1                                                      # 160 of 1536 pixels
    s = _mask_of(tmp_path, Image.fromarray(box.astype(np.uint16)), fmt="PNG")
    assert Image.open(s.mask_path).mode.startswith("I")
    assert load_mask(s, 48).sum() == pytest.approx(160 * 48 * 48 / 1536, rel=0.1)
    red = np.zeros((32, 48, 3), np.uint8)
    red[8:16, 10:30, 0] = 255                                                 # L value 76
    s = _mask_of(tmp_path, Image.fromarray(red), fmt="JPEG")
    assert abs(int(load_mask(s, 48).sum()) - 160 * 48 * 48 // 1536) < 40
    instances = np.zeros((32, 48), np.uint8)
    for i in range(10):
        instances[2 * i:2 * i + 2, 4 * i:4 * i + 4] = i + 1                   # ten defects of 8 pixels, 1..10
    s = _mask_of(tmp_path, Image.fromarray(instances))
    assert load_mask(s, 48).sum() == pytest.approx(80 * 48 * 48 / 1536, rel=0.15)
    s = _mask_of(tmp_path, Image.fromarray(np.zeros((32, 48), np.uint8)))
    with pytest.raises(UadcError, match="marks no pixel"):
        validate_test_masks(ImageDataset([s], 32, *NORM))


def test_an_image_over_pillows_warning_limit_is_checked_without_its_warning(tmp_path):
    """A 90-megapixel test image (1-2x Pillow's pixel limit: read, resized) printed Pillow's DecompressionBombWarning
    at train, eval and compile (the mask check read its header without uadc's filter); predict did not."""
    import warnings

    from uadc.data.mvtec import ImageDataset, Sample
    Image.new("L", (9500, 9500), 60).save(tmp_path / "big.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        validate_test_masks(ImageDataset([Sample(tmp_path / "big.png", "c", "good", None)], 32, *NORM))
    assert not [w for w in seen if "DecompressionBomb" in w.category.__name__]


def test_a_cameras_mpo_jpeg_is_one_photo_not_an_animation(tmp_path, caplog):
    """A phone's JPEG carrying a preview (MPO) was warned about as an animation or a multi-page file."""
    from uadc.core.images import open_image
    a = Image.new("RGB", (48, 32), (90, 120, 150))
    a.save(tmp_path / "cam.jpg", format="MPO", save_all=True, append_images=[a.resize((24, 16))])
    with caplog.at_level("WARNING", logger="uadc"), open_image(tmp_path / "cam.jpg") as im:
        assert im.size == (48, 32)
    assert "several frames" not in caplog.text


def test_masks_that_vanish_at_the_working_size_are_said(tmp_path, caplog):
    """Defects smaller than a pixel at data.image_size: the category's pixel figures vanished (`-` in the
    table, which README reads as "no ground_truth folder") and the mean pixel AUROC was the others', unsaid."""
    from uadc.data.mvtec import ImageDataset
    dot = np.zeros((256, 384), np.uint8)
    dot[1:3, 1:3] = 255                                   # 4 pixels of 98304: none left at 32 px (NEAREST)
    with caplog.at_level("WARNING", logger="uadc"):
        validate_test_masks(ImageDataset([_mask_of(tmp_path, Image.fromarray(dot), size=(384, 256))], 32, *NORM))
    assert "category 'c': no defect mask marks a pixel at data.image_size 32" in caplog.text
    caplog.clear()
    dot[100:140, 100:160] = 255                           # a defect that stays: nothing said
    with caplog.at_level("WARNING", logger="uadc"):
        validate_test_masks(ImageDataset([_mask_of(tmp_path, Image.fromarray(dot), size=(384, 256))], 32, *NORM))
    assert "no defect mask marks a pixel" not in caplog.text and "stretched" not in caplog.text   # 1.5:1
    strip = np.zeros((20, 300), np.uint8)                  # a 300x20 strip: squeezed 15 times more one way, unsaid
    strip[5:15, 100:109] = 255
    (tmp_path / "sq").mkdir()
    square = _mask_of(tmp_path / "sq", Image.fromarray(dot), size=(384, 256))   # first, and near square
    with caplog.at_level("WARNING", logger="uadc"):
        validate_test_masks(ImageDataset([square, _mask_of(tmp_path, Image.fromarray(strip), size=(300, 20))], 32,
                                         *NORM))
    assert "category 'c': its images are 300x20, resized to 32x32 (stretched, the aspect ratio not kept): a defect " \
           "is squeezed 15.0 times more along the long side than across" in caplog.text


def test_colour_masks_inverted_masks_and_a_capitalised_good_folder(tmp_path, data, caplog):
    """A colour mask (one colour per class) lost its red defect: luminance 76, below the cut its white one
    set; an alpha-only mask on white marked the whole image; black-on-white masks were read without a
    word (pixel AUROC ~0.4); `test/Good` was scored as a defect type (image AUROC 1.0 -> 0.78)."""
    from uadc.data.mvtec import ImageDataset, load_mask
    colours = np.zeros((32, 48, 3), np.uint8)
    colours[4:12, 4:12] = (255, 0, 0)
    colours[20:28, 20:28] = 255
    assert load_mask(_mask_of(tmp_path, Image.fromarray(colours)), 48).sum() == pytest.approx(128 * 1.5, rel=0.1)
    alpha = np.full((32, 48, 4), 255, np.uint8)
    alpha[..., 3] = 0
    alpha[8:16, 10:30, 3] = 255
    assert load_mask(_mask_of(tmp_path, Image.fromarray(alpha, "RGBA")), 48).sum() == pytest.approx(160 * 1.5, rel=0.1)
    inverted = np.full((32, 48), 255, np.uint8)
    inverted[8:16, 10:30] = 0
    with caplog.at_level("WARNING", logger="uadc"):
        validate_test_masks(ImageDataset([_mask_of(tmp_path, Image.fromarray(inverted))], 32, *NORM))
    assert "c/blob: 1 of 1 masks mark more than half their image" in caplog.text and "invert them" in caplog.text
    (data / "a" / "test" / "good").rename(data / "a" / "test" / "Good")
    samples = list_test_samples(data, "a")
    assert {s.defect for s in samples} == {"good", "blob"} and sum(s.label == 0 for s in samples) == 1


def test_masks_of_a_few_class_levels_keep_every_class_and_anti_aliased_edges_are_cut(tmp_path):
    """A grey mask of two classes (0/100/255) and a palette mask of VOC colours (128,0,0) / (64,0,0)
    marked 64 of their 128 defect pixels: the cut at half the peak dropped the darker class."""
    from uadc.data.mvtec import load_mask
    grey = np.zeros((32, 48), np.uint8)
    grey[4:12, 4:12], grey[20:28, 20:28] = 100, 255
    assert load_mask(_mask_of(tmp_path, Image.fromarray(grey)), 48).sum() == pytest.approx(128 * 1.5, rel=0.1)
    palette = Image.fromarray((grey > 0).astype(np.uint8) + (grey == 255), "P")   # indices 0, 1, 2
    palette.putpalette([0, 0, 0, 64, 0, 0, 128, 0, 0] + [0] * 759)
    assert load_mask(_mask_of(tmp_path, palette), 48).sum() == pytest.approx(128 * 1.5, rel=0.1)
    soft = np.zeros((32, 48), np.uint8)   # one defect with an edge ramp of many levels: cut at half its peak
    soft[8:24, 8:40] = 255
    for i, v in enumerate((20, 60, 100, 140, 180, 220)):
        soft[8 + i, 8:40] = v
    assert load_mask(_mask_of(tmp_path, Image.fromarray(soft)), 48).sum() == pytest.approx((16 - 3) * 32 * 1.5, rel=0.05)
    big = np.zeros((256, 256), np.uint8)   # BOX-resized to a quarter: edges at levels 16 and 64, one pixel wide
    big[60:181, 40:201] = 255
    small = np.asarray(Image.fromarray(big).resize((64, 64), Image.BOX))
    assert np.unique(small).tolist() == [0, 16, 64, 255]
    s = _mask_of(tmp_path, Image.fromarray(small), size=(64, 64))
    assert load_mask(s, 64).sum() == (np.asarray(Image.fromarray(small > 127).resize((64, 64), Image.NEAREST))).sum()


def test_a_category_unpacked_one_folder_deeper_is_named_and_test_in_capitals_is_read(data, caplog):
    """`gray/gray/train/good` (an archive unpacked twice) was left out without a word; `Test/` read as
    "no test folder", the category left out of the mean."""
    nested = data / "c" / "c"
    nested.parent.mkdir()
    shutil.copytree(data / "b", nested)
    with caplog.at_level("WARNING", logger="uadc"):   # as data preparation lists it (once a command)
        assert [c for _, c in resolve_sources([{"root": str(data), "categories": None}], warn=True)] == ["a", "b"]
    assert f"{data / 'c'} holds a category one folder deeper (c/train/good/): left out" in caplog.text
    (data / "a" / "test").rename(data / "a" / "Test")
    samples = list_test_samples(data, "a")
    assert {s.defect for s in samples} == {"good", "blob"} and len(samples) == 3
    assert sorted(build_test_sets([(data, "a"), (data, "b")], 32, NORM)) == ["a", "b"]
    (data / "a" / "test").write_text("notes")   # a file named `test` beside `Test/` made it "no test folder"
    assert len(list_test_samples(data, "a")) == 3 and untested(data, "a") is None


def test_validation_normals_that_copy_training_images_are_named(data, caplog):
    """A `data.val` folder of copies (`cp`) of train/good images set thresholds on images the model trained
    on, without a word (links are left out of training)."""
    from uadc.config.recipe import recipe_from_dict
    from uadc.data.prepare import prepare_data
    val = data.parent / "val_a"
    val.mkdir()
    for name in ("000.png", "001.png"):
        shutil.copy(data / "a" / "train" / "good" / name, val / name)
    cfg = {"data": {"sources": [{"root": str(data)}], "image_size": 32, "val": [{"category": "a", "folder": str(val)}]}}
    with caplog.at_level("WARNING", logger="uadc"):
        prepare_data(recipe_from_dict(cfg))
    assert "category 'a': 2 of its validation normals (data.val) are copies of its training images" in caplog.text


def test_a_category_named_in_another_unicode_form_is_the_same_category(tmp_path):
    """A folder copied from macOS is named in NFD, the name typed in a recipe or `--category` in NFC:
    'category Prüfteil not found (found: Prüfteil)', 'unknown category', and images under a folder of the
    typed name were judged at the global thresholds (3 defects called good)."""
    import unicodedata
    from uadc.core.manifest import CategoryThresholds, Threshold, Thresholds, infer_category
    nfc, nfd = unicodedata.normalize("NFC", "Prüfteil"), unicodedata.normalize("NFD", "Prüfteil")
    assert nfc != nfd
    make_category(tmp_path, nfd, n_train=2, n_good=1, n_defect=1)
    pairs = resolve_sources([{"root": str(tmp_path), "categories": [nfc]}])
    assert pairs == [(tmp_path, nfd)] and len(build_train_set(pairs, 32, NORM)) == 2
    assert infer_category(tmp_path / "line" / nfc / "x.png", [nfd, "gray"]) == nfd
    t = Threshold(value=1.0, low=0.0, high=2.0, quantile=0.99, n=4)
    ct = CategoryThresholds(t, t)
    th = Thresholds(0.01, "x", {nfd: ct}, CategoryThresholds(t, t))
    assert th.get(nfc) is ct


def test_a_masks_folder_in_another_case_jfif_images_and_a_turned_images_mask(data, caplog):
    """`Ground_Truth/` (or `ground_truth/Blob`) turned pixel metrics off without a word; `.jfif` training images
    (web JPEGs saved on Windows) were skipped silently; a mask sized as the image's file, not as the image turned
    upright by its EXIF orientation, was "mask size (48, 32) differs from image size (32, 48)" unexplained."""
    (data / "a" / "ground_truth").rename(data / "a" / "Ground_Truth")
    (data / "a" / "Ground_Truth" / "blob").rename(data / "a" / "Ground_Truth" / "Blob")
    assert all(s.mask_path is not None for s in list_test_samples(data, "a") if s.label == 1)
    (data / "b" / "ground_truth").rename(data / "b" / "GroundTruth")
    with caplog.at_level("WARNING", logger="uadc"):
        assert all(s.mask_path is None for s in list_test_samples(data, "b"))
    assert "no ground_truth/ folder, so no pixel metrics; its masks are not read from GroundTruth/" in caplog.text
    first = sorted((data / "a" / "train" / "good").glob("*.png"))[0]
    Image.open(first).convert("RGB").save(first.with_suffix(".jfif"), "JPEG")
    first.unlink()
    pairs = resolve_sources([{"root": str(data), "categories": ["a"]}])
    assert len(build_train_set(pairs, 32, NORM)) == 3
    img = next(s for s in list_test_samples(data, "a") if s.label == 1)
    im = Image.open(img.path).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees to view: width and height swap
    im.resize((48, 32)).save(img.path, exif=exif)
    Image.new("L", (48, 32)).save(img.mask_path)
    from uadc.data.mvtec import load_mask
    with pytest.raises(UadcError, match=r"mask size \(48, 32\) differs from image size \(32, 48\) \(after its EXIF "
                                        r"orientation, which turns it upright\)"):
        load_mask(img, 32)


def test_a_validation_folder_of_masks_is_refused(data):
    """A data.val folder under ground_truth/, or holding *_mask files, was taken as validation normals: a threshold
    13x above the normals' range (escape rate 0.75), no warning."""
    from uadc.config.recipe import recipe_from_dict
    from uadc.core.errors import UadcError
    from uadc.data.prepare import prepare_data
    mixed = data.parent / "valb"
    mixed.mkdir()
    shutil.copy(next((data / "b" / "train" / "good").iterdir()), mixed / "000.png")
    shutil.copy(next((data / "b" / "ground_truth").rglob("*_mask.png")), mixed)
    masks = next((data / "b" / "ground_truth").iterdir())
    (data.parent / "empty").mkdir()   # the key named, as other recipe errors do
    for folder, said in ((masks, "is in a ground_truth/ folder of masks"), (mixed, "holds masks (000_mask.png"),
                         (data.parent / "nope", "data.val: validation folder not found: "),
                         (data.parent / "empty", "data.val: validation folder ")):
        recipe = recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32,
                                            "val": [{"category": "b", "folder": str(folder)}]}})
        with pytest.raises(UadcError, match=re.escape(said)):
            prepare_data(recipe)


def test_a_validation_category_typed_in_the_other_unicode_form_is_its_folder(data):
    """`data.val: [{category: café}]` typed NFC beside a folder café copied from macOS (NFD): "category 'café' is
    not in data.sources", naming what looked like the same name."""
    import unicodedata
    from uadc.config.recipe import recipe_from_dict
    from uadc.data.prepare import prepare_data
    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    (data / "b").rename(data / nfd)
    val = data.parent / "val"
    val.mkdir()
    for i, src in enumerate(sorted((data / nfd / "train" / "good").iterdir())[:2]):
        shutil.copy(src, val / f"v{i}.png")
    d = prepare_data(recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32,
                                                "val": [{"category": nfc, "folder": str(val)}]}}))
    assert len(d.val[nfd]) == 2
    # a hard-linked copy of the folder listed too (cp -al): its normals counted twice, thresholds on a doubled sample
    shutil.copytree(val, data.parent / "val_copy", copy_function=os.link)
    d = prepare_data(recipe_from_dict({"data": {"sources": [{"root": str(data)}], "image_size": 32, "val": [
        {"category": nfc, "folder": str(val)}, {"category": nfd, "folder": str(data.parent / "val_copy")}]}}))
    assert len(d.val[nfd]) == 2


def test_an_empty_test_folder_loose_training_images_other_products_normals_and_macos_forks(data, caplog):
    """An empty `test/` (or `test/good/` made, nothing in it yet) stopped training where no `test/` trains the
    product unevaluated; images straight in `train/` were left out without a word; `data.val` normals that are
    another product's test images were counted as the category's own; a macOS zip's `__MACOSX/` was named as a
    category one folder deeper."""
    from uadc.config.recipe import recipe_from_dict
    from uadc.data.prepare import prepare_data
    for p in (data / "b" / "test", data / "b" / "ground_truth"):
        shutil.rmtree(p, ignore_errors=True)
    (data / "b" / "test" / "good").mkdir(parents=True)
    shutil.copy(data / "a" / "train" / "good" / "000.png", data / "a" / "train" / "loose.png")
    forks = data / "__MACOSX" / "a" / "train" / "good"
    forks.mkdir(parents=True)
    (forks / "._000.png").write_bytes(b"\0\5\26\7")
    val = data.parent / f"{data.name}_val_a"   # beside this test's folder, its own
    shutil.copytree(data / "a" / "test" / "good", val)
    cfg = {"data": {"sources": [{"root": str(data)}], "image_size": 32,
                    "val": [{"category": "a", "folder": str(val)}]}}
    with caplog.at_level("INFO", logger="uadc"):
        d = prepare_data(recipe_from_dict(cfg))
    assert sorted(d.tests) == ["a"] and d.not_evaluated == {"b": "no test images"}
    assert "b: trained and given operating thresholds, not evaluated (no test images)" in caplog.text
    assert f"{data / 'a' / 'train'}: 1 image directly in it is not read (training images go in train/good/)" in caplog.text
    assert "__MACOSX" not in caplog.text
    (data / "b" / "test" / "good" / "notes.txt").write_text("to do")   # notes or Thumbs.db alone: no test set
    assert prepare_data(recipe_from_dict(cfg)).not_evaluated == {"b": "no test images: it holds .txt files only"}
    (data / "b" / "test" / "good" / "raw.DNG").write_bytes(b"II*\0")   # raw images alone: said what it holds
    with caplog.at_level("INFO", logger="uadc"):
        assert prepare_data(recipe_from_dict(cfg)).not_evaluated["b"] == "no test images: it holds .dng, .txt files only"
    assert "b: trained and given operating thresholds, not evaluated (no test images: it holds .dng, .txt files only)" in caplog.text
    (data / "b" / "test" / "good" / "Thumbs.db").write_bytes(b"x")   # a file manager's: not named
    (data / "b" / "test" / "good" / os.fsdecode(b"odd.\xff\nx")).write_bytes(b"x")   # a traceback writing report.md
    assert prepare_data(recipe_from_dict(cfg)).not_evaluated["b"] == "no test images: it holds .\\xff\\x0ax, .dng, .txt files only"
    for name in ("Thumbs.db", os.fsdecode(b"odd.\xff\nx")):
        (data / "b" / "test" / "good" / name).unlink()
    (data / "b" / "test" / "good" / "raw.DNG").unlink()
    (data / "b" / "test" / "good" / "x.png").symlink_to(data / "gone.png")   # a broken link: named by the loader
    with pytest.raises(UadcError, match="unreadable image .*x.png: broken link"):
        prepare_data(recipe_from_dict(cfg))
    (data / "b" / "test" / "good" / "x.png").unlink()
    moved = data.parent / f"{data.name}_moved"   # linked test folders are read, as the loader reads them
    moved.mkdir()                                # (a walk that did not follow them left a unevaluated)
    for kind in ("good", "blob"):
        (data / "a" / "test" / kind).rename(moved / kind)
        (data / "a" / "test" / kind).symlink_to(moved / kind, target_is_directory=True)
    assert sorted(prepare_data(recipe_from_dict(cfg)).tests) == ["a"]
    other = data.parent / f"{data.name}_val_b"   # b's normals taken from a's test images: a's, not b's own, were blamed
    shutil.copytree(data / "a" / "test" / "good", other)
    caplog.clear()
    shutil.rmtree(data / "b" / "test")
    cfg["data"]["val"] = [{"category": "b", "folder": str(other)}]
    with caplog.at_level("WARNING", logger="uadc"):
        prepare_data(recipe_from_dict(cfg))
    assert "category 'b': 1 of its 1 validation normals (data.val) are test images of category 'a' too (the same " \
           "files): keep each product's normals and test images apart" in caplog.text
