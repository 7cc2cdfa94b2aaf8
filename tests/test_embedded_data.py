"""The embedded scattered-digits set: deterministic, cheap, and every nuisance factor one that aug+ randomises."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from moco_transfer.augment import moco_v2_augmentation
from moco_transfer.data import (
    DataError,
    DigitsDataset,
    ScatteredDigitsDataset,
    SceneStyle,
    digits_arrays,
    draw_digits,
    draw_scene_params,
    embedded_name,
    make_datasets,
    render_scattered_digits,
    split_indices,
)
from moco_transfer.pretrain.config import resolve_config

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


def _ks_uniform(x: np.ndarray, low: float, high: float) -> float:
    """One-sample Kolmogorov-Smirnov statistic of x against U[low, high]."""
    u = np.sort((np.asarray(x, float) - low) / (high - low))
    n = len(u)
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


def _preset_views() -> list:
    """The CPU transforms of the embedded preset's views (aug+ at its size, crop floor and mirror setting)."""
    cfg = resolve_config()
    assert cfg.preset == "scattered-digits" and cfg.aug_plus
    return moco_v2_augmentation(cfg.image_size, cfg.crop_min, flip=cfg.flip).transforms


def test_colour_factors_are_drawn_as_the_preset_views_draw_them() -> None:
    """Ranges and rates read off the preset's CPU aug+ transforms: ColorJitter's four ranges (filled uniformly,
    drawn independently), its random order of the four ops, RandomGrayscale's p and the (absent) mirror."""
    n = 4000
    views = _preset_views()
    jitter = next(t.transforms[0] for t in views
                  if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.ColorJitter))
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    gray_p = next(t.p for t in views if isinstance(t, T.RandomGrayscale))
    flip_p = sum(t.p for t in views if isinstance(t, T.RandomHorizontalFlip))  # 0: the preset has no mirror
    p = draw_scene_params(n, CANVAS, seed=0)
    columns = [p.factors[:, 0], p.factors[:, 1], p.factors[:, 2], p.hues]
    ks_critical = 1.95 / np.sqrt(n)  # alpha = 0.001
    for name, values, (lo, hi) in zip(("brightness", "contrast", "saturation", "hue"), columns, ranges,
                                      strict=True):
        assert lo <= values.min() and values.max() <= hi, name
        assert _ks_uniform(values, lo, hi) < ks_critical, name
    correlations = np.corrcoef(np.stack(columns))[np.triu_indices(4, 1)]
    assert np.abs(correlations).max() < 6 / np.sqrt(n), correlations  # four independent draws
    # every order of the four ops equally likely, as ColorJitter's randperm (chi-square, 23 dof, alpha 0.001)
    codes = p.orders @ np.array([64, 16, 4, 1])
    perms = [sum(c * m for c, m in zip(perm, (64, 16, 4, 1), strict=True)) for perm in itertools.permutations(range(4))]
    counts = np.array([(codes == code).sum() for code in perms])
    assert counts.sum() == n and ((counts - n / 24) ** 2 / (n / 24)).sum() < 49.7
    for flags, rate in ((p.gray, gray_p), (p.flip, flip_p)):
        assert abs(flags.mean() - rate) <= 5 * np.sqrt(max(rate * (1 - rate), 1 / n) / n), (flags.mean(), rate)


def test_scale_is_log_uniform_in_the_style_range_and_the_digit_moves() -> None:
    """The glyph's scale is the set's own (wider than the preset's crops reach, see README); position covers
    the canvas; a style that asks for mirrors gets them at its rate."""
    style = SceneStyle(flip=0.5)
    p = draw_scene_params(4000, CANVAS, seed=0, style=style)
    fractions = p.sides / CANVAS
    assert fractions.min() >= style.scale[0] - 1 / CANVAS and fractions.max() <= style.scale[1]
    assert np.median(np.log(fractions)) == pytest.approx(np.mean(np.log(style.scale)), abs=0.05)
    assert (p.corners >= 0).all() and (p.corners + p.sides[:, None] <= CANVAS).all()
    centres = p.corners + p.sides[:, None] / 2
    assert centres.std(axis=0).min() > CANVAS / 10          # the digit really moves around
    assert abs(p.flip.mean() - 0.5) < 4 * np.sqrt(0.25 / len(p.flip))


def test_no_mirror_by_default_since_the_preset_views_do_not_mirror() -> None:
    assert SceneStyle().flip == 0.0 and not draw_scene_params(500, CANVAS, seed=0).flip.any()


# torchvision's functional colour ops, by the op ids SceneParams.orders uses (ColorJitter's own ids)
COLOUR_OPS = {0: ("brightness", TF.adjust_brightness), 1: ("contrast", TF.adjust_contrast),
              2: ("saturation", TF.adjust_saturation), 3: ("hue", TF.adjust_hue)}


def test_colours_are_colorjitter_of_one_clean_drawing(glyphs: np.ndarray) -> None:
    """Each image is torchvision's colour ops, with its own drawn factors in its own drawn order, then grayscale
    where drawn, applied to its clean drawing: the reference is built here from torchvision's functional ops.

    With the factor test above this says the colour nuisance is exactly what the preset's aug+ randomises.
    """
    style = SceneStyle()
    images = render_scattered_digits(glyphs[:200], CANVAS, seed=1, style=style)
    p = draw_scene_params(200, CANVAS, seed=1, style=style)
    clean = draw_digits(glyphs[:200], CANVAS, p, style)
    factor = {"brightness": p.factors[:, 0], "contrast": p.factors[:, 1], "saturation": p.factors[:, 2],
              "hue": p.hues}
    assert p.gray.any() and not p.gray.all()
    for i in range(200):
        expected = clean[i]
        for op in p.orders[i]:
            name, adjust = COLOUR_OPS[int(op)]
            expected = adjust(expected, float(factor[name][i]))
        if p.gray[i]:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        assert np.array_equal(np.asarray(images[i]), np.asarray(expected)), i
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
