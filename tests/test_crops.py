"""Crop helpers: lesion centre, clamping, padding, jitter/flip bookkeeping, paste-back round trip."""
import numpy as np
import pytest

from ldm.data.crops import (CropWindow, bbox_center, draw_flips, draw_offset, largest_component, paste_crop, plan_crop,
                            take_crop, with_flips)
from ldm.data.resample import match_shape, resize_nearest, respace
from ldm.errors import DataError


def test_largest_component_uses_face_connectivity():
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, 0:3] = True                       # 3 voxels in a row
    mask[2, 2, 2] = mask[3, 3, 3] = True         # diagonal neighbours: two components, not one of size 2
    mask[4, 0:2, 4] = True                       # 2 voxels
    largest = largest_component(mask)
    assert largest.sum() == 3 and largest[0, 0, 0:3].all()
    assert bbox_center(largest) == (0, 0, 1)
    with pytest.raises(DataError, match="no foreground"):
        largest_component(np.zeros((2, 2, 2), bool))


def test_unclamped_crop_is_centred_and_clamped_crop_stays_inside():
    window = plan_crop((100, 80, 60), (20, 20, 20), center=(50, 40, 30))
    assert window.crop_start == (40, 30, 20) and window.pad_before == (0, 0, 0)
    assert tuple(s + c // 2 for s, c in zip(window.crop_start, window.crop_size)) == (50, 40, 30)
    edge = plan_crop((100, 80, 60), (20, 20, 20), center=(2, 79, 30), offset=(0, 0, 5))
    assert edge.crop_start == (0, 60, 25)


def test_padding_when_volume_is_smaller_than_crop():
    volume = np.arange(4 * 6 * 10, dtype=np.float32).reshape(4, 6, 10) + 1
    window = plan_crop(volume.shape, (8, 6, 4), center=(1, 3, 7))
    assert window.pad_before == (2, 0, 0) and window.crop_start == (0, 0, 5)
    crop = take_crop(volume, window, fill=-1000.0)
    assert crop.shape == (8, 6, 4)
    assert np.all(crop[:2] == -1000.0) and np.all(crop[6:] == -1000.0)
    np.testing.assert_array_equal(crop[2:6], volume[:, :, 5:9])


def test_paste_round_trip_with_flips_and_channels():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(2, 9, 12, 7))
    window = with_flips(plan_crop(volume.shape[1:], (5, 16, 4), center=(4, 6, 3)), (0, 2))
    crop = take_crop(volume, window)
    unflipped = take_crop(volume, with_flips(window, ()))
    np.testing.assert_array_equal(crop, unflipped[:, ::-1, :, ::-1])
    pasted = paste_crop(np.zeros_like(volume), crop, window)
    covered = (slice(None),) + window.volume_slices()
    np.testing.assert_array_equal(pasted[covered], volume[covered])
    outside = np.ones(volume.shape, bool)
    outside[covered] = False
    assert np.all(pasted[outside] == 0)
    assert CropWindow.from_dict(window.as_dict()) == window
    with pytest.raises(DataError, match="cannot paste"):
        paste_crop(np.zeros((3, 3, 3)), crop[0], window)


def test_random_draws_are_bounded_and_seeded():
    offsets = [draw_offset(np.random.default_rng(seed), (3, 0, 1)) for seed in range(200)]
    assert {o[1] for o in offsets} == {0}
    assert {o[0] for o in offsets} == set(range(-3, 4)) and {o[2] for o in offsets} == {-1, 0, 1}
    assert draw_offset(np.random.default_rng(7), (3, 3, 3)) == draw_offset(np.random.default_rng(7), (3, 3, 3))
    flips = [draw_flips(np.random.default_rng(seed), (0, 2)) for seed in range(200)]
    assert set(flips) == {(), (0,), (2,), (0, 2)}


def test_resampling_helpers():
    labels = np.arange(24).reshape(2, 3, 4)
    resized = resize_nearest(labels, (4, 3, 2))
    assert resized.shape == (4, 3, 2) and set(np.unique(resized)) <= set(np.unique(labels))
    np.testing.assert_array_equal(resized[::2, :, :], labels[:, :, ::2])
    assert match_shape(labels, (2, 3, 4), "a", "b") is labels
    assert match_shape(labels, (3, 5, 6), "a", "b").shape == (3, 5, 6)
    with pytest.raises(DataError, match="label.nii.gz: shape .* does not match the image x.nii.gz"):
        match_shape(labels, (6, 3, 4), "label.nii.gz", "the image x.nii.gz")
    image = np.linspace(0, 1, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    coarse = respace(image, (1.0, 1.0, 1.0), (2.0, 2.0, 4.0), order=1)
    assert coarse.shape == (4, 4, 2) and coarse.dtype == np.float32
    assert respace(labels, (2, 2, 2), (1, 1, 1), order=0).shape == (4, 6, 8)
