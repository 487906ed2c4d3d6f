"""The synthetic demo dataset: determinism, labels, water share, files."""

import numpy as np
import pytest
from PIL import Image

from res_unet.core.errors import UserError
from res_unet.demo import make_demo_dataset, synthesize_scene


def scene(seed: int, i: int, size=(64, 64), multiclass=False):
    return synthesize_scene(np.random.default_rng([seed, i]), size, multiclass)


def test_scene_shapes_dtypes_and_binary_labels():
    for size in [(64, 64), (48, 80), (16, 16)]:
        image, label = scene(0, 1, size)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        assert label.shape == size and label.dtype == np.uint8
        assert set(np.unique(label)) <= {0, 1}


def test_scene_is_deterministic():
    a, b = scene(3, 2), scene(3, 2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = scene(3, 3)
    assert not np.array_equal(a[0], c[0])


def test_multiclass_has_four_classes_and_the_same_image():
    seen = set()
    for i in range(4):
        image_b, label_b = scene(0, i, (96, 96))
        image_m, label_m = scene(0, i, (96, 96), multiclass=True)
        np.testing.assert_array_equal(image_b, image_m)
        np.testing.assert_array_equal(label_b, (label_m == 1).astype(np.uint8))
        assert set(np.unique(label_m)) <= {0, 1, 2, 3}
        seen |= set(np.unique(label_m).tolist())
    assert seen == {0, 1, 2, 3}


def test_water_share_varies_within_range():
    shares = [np.mean(scene(0, i, (128, 128))[1] == 1) for i in range(12)]
    assert 0.04 <= min(shares) and max(shares) <= 0.45
    assert max(shares) - min(shares) > 0.1


def test_water_is_not_one_colour_threshold():
    """No single threshold on a band or band difference separates water well."""
    images, labels = zip(*(scene(0, i, (96, 96)) for i in range(12)), strict=True)
    rgb = np.stack(images).astype(int)
    water = np.stack(labels) == 1
    features = [rgb[..., 0], rgb[..., 1], rgb[..., 2], rgb.sum(-1),
                rgb[..., 2] - rgb[..., 0], rgb[..., 2] - rgb[..., 1]]
    best = 0.0
    for feature in features:
        for t in np.unique(np.quantile(feature, np.linspace(0.01, 0.99, 99))):
            for pred in (feature < t, feature >= t):
                best = max(best, (pred & water).sum() / (pred | water).sum())
    assert best < 0.8


def test_make_demo_dataset_writes_pngs_that_read_back(tmp_path):
    images_dir, labels_dir = make_demo_dataset(tmp_path / "demo", 3, size=(40, 56), seed=5)
    assert images_dir == tmp_path / "demo" / "images"
    assert labels_dir == tmp_path / "demo" / "labels"
    names = ["demo_000.png", "demo_001.png", "demo_002.png"]
    assert sorted(p.name for p in images_dir.iterdir()) == names
    assert sorted(p.name for p in labels_dir.iterdir()) == names
    image, label = scene(5, 2, (40, 56))
    with Image.open(images_dir / "demo_002.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), image)
    with Image.open(labels_dir / "demo_002.png") as lab:
        assert lab.mode == "L"
        np.testing.assert_array_equal(np.asarray(lab), label)


def test_make_demo_dataset_same_seed_identical_and_prefix(tmp_path):
    make_demo_dataset(tmp_path / "a", 2, size=(32, 32), seed=1, multiclass=True)
    make_demo_dataset(tmp_path / "b", 4, size=(32, 32), seed=1, multiclass=True)
    make_demo_dataset(tmp_path / "c", 2, size=(32, 32), seed=2, multiclass=True)
    for sub in ("images", "labels"):
        for i in range(2):
            name = f"{sub}/demo_{i:03d}.png"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert ((tmp_path / "a" / sub / "demo_000.png").read_bytes()
                != (tmp_path / "c" / sub / "demo_000.png").read_bytes())
    before = (tmp_path / "a" / "images" / "demo_001.png").read_bytes()
    make_demo_dataset(tmp_path / "a", 2, size=(32, 32), seed=1, multiclass=True)
    assert (tmp_path / "a" / "images" / "demo_001.png").read_bytes() == before


def test_make_demo_dataset_removes_older_extra_files(tmp_path):
    make_demo_dataset(tmp_path, 4, size=(24, 24))
    (tmp_path / "images" / "mine.png").write_bytes(b"not ours")
    make_demo_dataset(tmp_path, 2, size=(24, 24))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "demo_000.png", "demo_001.png", "mine.png"]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [
        "demo_000.png", "demo_001.png"]
    assert not list(tmp_path.rglob("*.tmp*"))


@pytest.mark.parametrize(("n", "size"), [(0, (32, 32)), (2, (8, 32)), (2, (32,))])
def test_make_demo_dataset_rejects_bad_arguments(tmp_path, n, size):
    with pytest.raises(UserError, match="demo"):
        make_demo_dataset(tmp_path, n, size=size)
