"""Normalisation modes and seeded augmentation: values, shapes, determinism, content preserved."""
import numpy as np
import pytest

from dualnet.data import channel_stats, normalize, random_crop_flip, random_resized_crop, two_views


@pytest.fixture
def images(rng):
    return rng.random((6, 3, 8, 10), dtype=np.float32)


def test_unit_and_symmetric(images):
    assert normalize(images, "unit") is images
    symmetric = normalize(images, "symmetric")
    assert symmetric.dtype == np.float32
    np.testing.assert_allclose(symmetric, 2 * images - 1, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(normalize(np.array([[[[0.0, 1.0]]]], np.float32), "symmetric"), [[[[-1.0, 1.0]]]])


def test_standardize_gives_zero_mean_unit_std_per_channel(images):
    out = normalize(images.astype(np.float64), "standardize")
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-12)


def test_standardize_uses_given_training_stats(images):
    train, test = images[:4], images[4:]
    mean, std = channel_stats(train)
    np.testing.assert_allclose(mean, train.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, train.std(axis=(0, 2, 3)), rtol=1e-5)
    expected = (test - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(normalize(test, "standardize", (mean, std)), expected, rtol=1e-6)


def test_normalize_errors(images):
    with pytest.raises(ValueError, match="unknown mode 'zca'"):
        normalize(images, "zca")
    with pytest.raises(ValueError, match="stats for 2 channels, images have 3"):
        normalize(images, "standardize", (np.zeros(2), np.ones(2)))


def test_crop_flip_is_a_window_of_the_padded_image(images):
    """Every output equals some (possibly mirrored) H x W window of the zero-padded input."""
    out = random_crop_flip(images, rng=3, pad=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    flips = 0
    for n in range(len(images)):
        windows = [(padded[n, :, dy:dy + 8, dx:dx + 10], mirror) for dy in range(5) for dx in range(5)
                   for mirror in (False, True)]
        matches = [mirror for window, mirror in windows
                   if np.array_equal(out[n], window[..., ::-1] if mirror else window)]
        assert matches, n
        flips += all(matches)
    assert 0 < flips < len(images)  # seed 3 mirrors some images and not others


def test_augmentations_are_deterministic_per_seed(images):
    for augment in (random_crop_flip, random_resized_crop):
        np.testing.assert_array_equal(augment(images, 7), augment(images, np.random.default_rng(7)))
        assert not np.array_equal(augment(images, 7), augment(images, 8))


def test_crop_flip_without_padding_or_flip_is_identity(images):
    np.testing.assert_array_equal(random_crop_flip(images, 0, pad=0, flip=False), images)


def test_resized_crop_identity_and_range(images):
    identity = random_resized_crop(images, 0, area=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    np.testing.assert_allclose(identity, images, rtol=0, atol=1e-6)
    out = random_resized_crop(images, 1, area=(0.2, 0.6))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= images.min() - 1e-6 and out.max() <= images.max() + 1e-6  # convex combinations
    assert not np.allclose(out, images)


def test_resized_crop_of_constant_image_is_constant():
    constant = np.full((3, 2, 5, 7), 0.25, np.float32)
    np.testing.assert_allclose(random_resized_crop(constant, 4), constant, rtol=0, atol=1e-7)


def test_two_views_differ_and_follow_the_generator(images):
    view_a, view_b = two_views(images, 9)
    assert view_a.shape == view_b.shape == images.shape and not np.array_equal(view_a, view_b)
    generator = np.random.default_rng(9)
    np.testing.assert_array_equal(view_a, random_resized_crop(images, generator, area=(0.5, 1.0)))
    np.testing.assert_array_equal(view_b, random_resized_crop(images, generator, area=(0.5, 1.0)))


def test_augmentation_rejects_non_image_input():
    with pytest.raises(ValueError, match=r"expected images \[N, C, H, W\], got shape \(4, 4\)"):
        random_crop_flip(np.zeros((4, 4)), 0)
