"""The cache of decoded volumes: a second read of an unchanged file comes from memory as a private copy; a rewritten
file is read again; nothing is kept when the cache is off or the volume exceeds its limit."""
import numpy as np
import pytest

from ldm.data import read_cache
from ldm.data.synthetic_geometry import geometry_for
from ldm.data.volume import read_label, read_volume, write_volume


@pytest.fixture
def cache():
    read_cache.enable(0)
    read_cache.enable()
    yield read_cache
    read_cache.enable(0)


def test_unchanged_file_is_decoded_once_and_each_read_is_a_private_copy(tmp_path, cache):
    geometry = geometry_for((4, 5, 6), (2.0, 1.0, 1.0))
    path = write_volume(tmp_path / "ct.nii.gz", np.arange(120, dtype=np.float32).reshape(4, 5, 6), geometry)
    first, first_geometry = read_volume(path)
    first[:] = -1
    first_geometry.affine[:] = 0
    second, second_geometry = read_volume(path)
    assert cache.cached_count() == 1
    np.testing.assert_array_equal(second, np.arange(120, dtype=np.float32).reshape(4, 5, 6))
    np.testing.assert_array_equal(second_geometry.affine, geometry.affine)
    labels, _ = read_label(path)          # another dtype: its own entry
    assert labels.dtype == np.int16 and cache.cached_count() == 2
    write_volume(path, np.ones((4, 5, 6), dtype=np.float32), geometry)     # atomic rewrite: a new file version
    np.testing.assert_array_equal(read_volume(path)[0], 1.0)


def test_nothing_is_kept_when_off_or_too_large(tmp_path, cache):
    path = write_volume(tmp_path / "ct.nii.gz", np.zeros((8, 8, 8), dtype=np.float32),
                        geometry_for((8, 8, 8), (1.0, 1.0, 1.0)))
    cache.enable(8 * 8 * 8 * 4 - 1)
    read_volume(path)
    assert cache.cached_count() == 0
    cache.enable(0)
    read_volume(path)
    assert cache.cached_count() == 0
    with pytest.raises(Exception, match="file not found"):
        read_volume(tmp_path / "absent.nii.gz")


def test_enabled_holds_for_the_block_only(tmp_path, cache):
    cache.enable(0)
    path = write_volume(tmp_path / "ct.nii.gz", np.zeros((4, 4, 4), dtype=np.float32),
                        geometry_for((4, 4, 4), (1.0, 1.0, 1.0)))
    with cache.enabled():
        read_volume(path)
        assert cache.cached_count() == 1
    assert cache.cached_count() == 0
    read_volume(path)
    assert cache.cached_count() == 0
