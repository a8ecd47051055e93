"""The HU <-> [0, 1] map: knot values, clamping, monotonicity, exact inverse, numpy and torch agree."""
import numpy as np
import pytest
import torch

from ldm.data.intensity import AIR_HU, HU_KNOTS, UNIT_KNOTS, hu_to_unit, piecewise_linear, unit_to_hu
from ldm.errors import ConfigError


def reference_map(hu):
    """The original formula, segment by segment (slopes 0.2/800, 0.6/400, 0.2/800 per HU)."""
    hu = np.clip(np.asarray(hu, dtype=np.float64), -1000, 1000)
    return np.where(hu < -200, (hu + 1000) * 0.2 / 800,
                    np.where(hu < 200, 0.2 + (hu + 200) * 0.6 / 400, 0.8 + (hu - 200) * 0.2 / 800))


def test_knots_map_exactly():
    assert AIR_HU == -1000.0
    np.testing.assert_array_equal(hu_to_unit(np.array(HU_KNOTS)), np.array(UNIT_KNOTS))
    np.testing.assert_array_equal(unit_to_hu(np.array(UNIT_KNOTS)), np.array(HU_KNOTS))
    assert hu_to_unit(np.float64(0.0)) == pytest.approx(0.5)


def test_matches_original_formula_and_clamps():
    hu = np.linspace(-3000, 3000, 6001)
    np.testing.assert_allclose(hu_to_unit(hu), reference_map(hu), atol=1e-12)
    assert hu_to_unit(np.array([-5000.0]))[0] == 0.0 and hu_to_unit(np.array([4000.0]))[0] == 1.0
    np.testing.assert_array_equal(unit_to_hu(np.array([-0.5, 1.5])), [-1000.0, 1000.0])


def test_monotone_and_inverse():
    hu = np.linspace(-1000, 1000, 20001)
    unit = hu_to_unit(hu)
    assert np.all(np.diff(unit) > 0)
    np.testing.assert_allclose(unit_to_hu(unit), hu, atol=1e-9)
    unit32 = hu_to_unit(hu.astype(np.float32))
    assert unit32.dtype == np.float32
    np.testing.assert_allclose(unit_to_hu(unit32), hu, atol=0.01)


def test_torch_matches_numpy_and_keeps_dtype_and_device():
    hu = torch.linspace(-1500, 1500, 3001, dtype=torch.float64)
    unit = hu_to_unit(hu)
    assert isinstance(unit, torch.Tensor) and unit.dtype == torch.float64 and unit.device == hu.device
    np.testing.assert_allclose(unit.numpy(), reference_map(hu.numpy()), atol=1e-12)
    inside = hu.clamp(-1000, 1000)
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(inside)).numpy(), inside.numpy(), atol=1e-9)
    assert hu_to_unit(torch.tensor([-1000, 0, 1000])).dtype == torch.float32
    assert hu_to_unit(np.array([-1000, 0, 1000], dtype=np.int16)).dtype == np.float32


def test_custom_knots_and_bad_knots():
    np.testing.assert_allclose(piecewise_linear(np.array([-1.0, 0.0, 0.5, 2.0]), [0, 1], [10, 20]), [10, 10, 15, 20])
    with pytest.raises(ConfigError, match="strictly increasing"):
        hu_to_unit(np.zeros(2), hu_knots=[0, 0, 1, 2])
    with pytest.raises(ConfigError, match="equal length"):
        hu_to_unit(np.zeros(2), hu_knots=[-1000, 1000])
