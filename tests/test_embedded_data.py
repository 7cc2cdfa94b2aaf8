"""The embedded scattered-digits set: deterministic, cheap, and every nuisance factor one that aug+ randomises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moco_transfer.data import (
    DataError,
    DigitsDataset,
    ScatteredDigitsDataset,
    SceneStyle,
    digits_arrays,
    draw_digits,
    draw_scene_params,
    embedded_name,
    jitter_colours,
    make_datasets,
    render_scattered_digits,
    split_indices,
)

CANVAS = 24


@pytest.fixture(scope="module")
def glyphs() -> np.ndarray:
    return digits_arrays()[0][:300]


def test_same_seed_same_images_other_seed_other_images(glyphs: np.ndarray) -> None:
    a = render_scattered_digits(glyphs[:50], CANVAS, seed=3)
    b = render_scattered_digits(glyphs[:50], CANVAS, seed=3)
    c = render_scattered_digits(glyphs[:50], CANVAS, seed=4)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert sum(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c, strict=True)) == 0
    assert all(im.size == (CANVAS, CANVAS) and im.mode == "RGB" for im in a)


def test_factor_ranges_are_those_of_aug_plus() -> None:
    """Scale log-uniform in the style's range, positions covering the canvas, colour factors inside ColorJitter's."""
    style = SceneStyle(flip=0.5)
    p = draw_scene_params(4000, CANVAS, seed=0, style=style)
    fractions = p.sides / CANVAS
    assert fractions.min() >= style.scale[0] - 1 / CANVAS and fractions.max() <= style.scale[1]
    assert np.median(np.log(fractions)) == pytest.approx(np.mean(np.log(style.scale)), abs=0.05)
    assert (p.corners >= 0).all() and (p.corners + p.sides[:, None] <= CANVAS).all()
    centres = p.corners + p.sides[:, None] / 2
    assert centres.std(axis=0).min() > CANVAS / 10          # the digit really moves around
    assert p.factors.min() >= 1 - style.jitter and p.factors.max() <= 1 + style.jitter
    assert np.abs(p.hues).max() <= style.hue
    for flag, rate in ((p.gray, style.grayscale), (p.flip, style.flip)):
        assert abs(flag.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / len(flag))
    assert {tuple(o) for o in p.orders} == {tuple(o) for o in np.array(list(__import__("itertools").permutations(
        range(4))))}  # every order of the four colour ops occurs, as in ColorJitter


def test_no_mirror_by_default_since_the_preset_views_do_not_mirror() -> None:
    assert SceneStyle().flip == 0.0 and not draw_scene_params(500, CANVAS, seed=0).flip.any()


def test_colours_are_colorjitter_of_one_clean_drawing(glyphs: np.ndarray) -> None:
    """Each image is torchvision's ColorJitter ops (its own factors and order) and grayscale on a clean drawing.

    With the factor-range test above this says the colour nuisance is exactly what aug+ randomises anyway.
    """
    style = SceneStyle()
    images = render_scattered_digits(glyphs[:200], CANVAS, seed=1, style=style)
    p = draw_scene_params(200, CANVAS, seed=1, style=style)
    clean = draw_digits(glyphs[:200], CANVAS, p, style)
    for i in range(200):
        expected = np.asarray(jitter_colours(clean[i], p, i))
        assert np.array_equal(np.asarray(images[i]), expected), i
    for drawing in clean:  # the clean drawings share one background colour, the base one
        values, counts = np.unique(np.asarray(drawing).reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(values[counts.argmax()]) == style.background


def test_glyph_scale_and_position_follow_the_params(glyphs: np.ndarray) -> None:
    style = SceneStyle(flip=0.0)
    p = draw_scene_params(100, CANVAS, seed=2, style=style)
    images = draw_digits(glyphs[:100], CANVAS, p, style)
    bg = np.asarray(style.background)
    for i, image in enumerate(images):
        ink = np.abs(np.asarray(image).astype(int) - bg).sum(axis=2) > 30
        rows, cols = np.nonzero(ink)
        (y0, x0), side = p.corners[i], p.sides[i]
        assert rows.min() >= y0 and rows.max() < y0 + side and cols.min() >= x0 and cols.max() < x0 + side


def test_split_is_the_plain_digits_split_and_the_dataset_is_cheap() -> None:
    train, val = ScatteredDigitsDataset("train", image_size=16), ScatteredDigitsDataset("val", image_size=16)
    plain_train, plain_val = DigitsDataset("train", image_size=16), DigitsDataset("val", image_size=16)
    assert (len(train), len(val)) == (1437, 360)
    assert train.targets == plain_train.targets and val.targets == plain_val.targets
    assert train.classes == [str(c) for c in range(10)]
    image, target, bad = train[0]
    assert isinstance(image, Image.Image) and bad == () and target == train.targets[0]


def test_pretrain_split_is_the_canonical_drawing_of_the_train_digits() -> None:
    """Pretraining images differ only in the digit's shape: centred, one size, the base colours, no jitter."""
    style = SceneStyle()
    pretrain = ScatteredDigitsDataset("pretrain", image_size=CANVAS)
    train = ScatteredDigitsDataset("train", image_size=CANVAS)
    assert pretrain.targets == train.targets and len(pretrain) == 1437
    glyphs, labels = digits_arrays()
    keep = split_indices(labels, "pretrain")
    side = round(CANVAS * style.canonical_scale)
    y0 = (CANVAS - side) // 2
    bg, fg = np.asarray(style.background), np.asarray(style.foreground)
    for i in range(0, 1437, 97):
        pixels = np.asarray(pretrain[i][0]).astype(int)
        ink = np.abs(pixels - bg).sum(axis=2) > 30
        rows, cols = np.nonzero(ink)
        assert rows.min() >= y0 and rows.max() < y0 + side and cols.min() >= y0 and cols.max() < y0 + side
        # every pixel lies on the segment between the two base colours: no per-image colour at all
        t = ((pixels - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        assert np.abs(pixels - (bg + t[..., None] * (fg - bg))).max() <= 2
        small = np.asarray(Image.fromarray(glyphs[keep[i]]).resize((side, side), Image.BICUBIC), float) / 255
        assert np.allclose(t[y0:y0 + side, y0:y0 + side], small, atol=0.02)


def test_embedded_names() -> None:
    assert embedded_name(None) == "scattered-digits"
    assert embedded_name("embedded:digits") == "digits"
    assert embedded_name("/data/imagenet") is None
    with pytest.raises(DataError, match="embedded:nope: unknown embedded set; expected one of embedded:scattered"):
        embedded_name("embedded:nope")
    pair = make_datasets("embedded:digits", None, None, 16)
    assert pair.root == "<embedded digits 16px>" and len(pair.train) == 1437


def _random_init_knn(name: str) -> float:
    from moco_transfer.augment import eval_transform
    from moco_transfer.backbone import ResNetTrunk, build_resnet
    from moco_transfer.knn import topk_accuracy, weighted_knn_predict

    tf = eval_transform(16)
    pair = make_datasets(f"embedded:{name}", tf, tf, 16)
    torch.manual_seed(0)
    trunk = ResNetTrunk(build_resnet("resnet18", small_images=True)).eval()
    with torch.no_grad():
        feats = [torch.nn.functional.normalize(trunk(torch.stack([im for im, _, _ in ds])), dim=1)
                 for ds in (pair.train, pair.val)]
    scores = weighted_knn_predict(feats[0], torch.tensor(pair.train.targets), feats[1], 10, k=20, temperature=0.07)
    return topk_accuracy(scores, torch.tensor(pair.val.targets), ks=(1,))[1]


def test_random_weights_do_poorly_on_scattered_digits_but_not_on_plain_digits() -> None:
    """The point of the set: what random features get right on plain digits, they get wrong here."""
    plain, scattered = _random_init_knn("digits"), _random_init_knn("scattered-digits")
    assert plain > 85.0
    assert scattered < 45.0
    assert plain - scattered > 40.0
