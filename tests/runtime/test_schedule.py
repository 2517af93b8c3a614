"""Schedules and respacing against the original guided-diffusion's tables and semantics."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from runtime.schedule import Schedule, betas_for, make_schedule, space_timesteps

SHARED = Path(__file__).parents[2].parent / "shared"
GOLDEN_TABLES = SHARED / "golden" / "diffusion_tables.npz"


def _golden_groups() -> list:
    """One case per `<schedule>_<respacing>` prefix in the golden file."""
    if not GOLDEN_TABLES.exists():
        reason = f"golden tables not found at {GOLDEN_TABLES} (shared/ is not beside the checkout)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    with np.load(GOLDEN_TABLES) as golden:
        return sorted({key.split("__")[0] for key in golden.files})


@pytest.mark.parametrize("prefix", _golden_groups())
def test_tables_match_original(prefix):
    noise_schedule, respacing_key = prefix.split("_", 1)
    respacing = respacing_key.replace("-", ",")  # "10-5-3" in a key stands for the spec "10,5,3"
    schedule = make_schedule(noise_schedule, 1000, respacing)
    with np.load(GOLDEN_TABLES) as golden:
        keys = [key for key in golden.files if key.startswith(prefix + "__")]
        assert any(key.endswith("__timestep_map") for key in keys)
        for key in keys:
            table = key.split("__", 1)[1]
            expected, actual = golden[key], getattr(schedule, table)
            assert actual.shape == expected.shape, key
            if table == "timestep_map":
                assert actual.dtype == np.int64
                np.testing.assert_array_equal(actual, expected, err_msg=key)
                assert space_timesteps(1000, respacing) == set(expected.tolist())
            else:
                assert actual.dtype == np.float64
                np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=0, err_msg=key)


def test_betas_formulas():
    linear = betas_for("linear", 4000)  # the 1000-step curve, rescaled
    np.testing.assert_allclose(linear[[0, -1]], [0.0001 / 4, 0.02 / 4], rtol=1e-15)
    np.testing.assert_allclose(np.diff(linear), (0.02 - 0.0001) / 4 / 3999, rtol=1e-9)

    num = 1000
    cosine = betas_for("cosine", num)
    f = np.cos((np.arange(num + 1) / num + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(cosine, np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-12)
    assert cosine[-1] == 0.999  # clipped by max_beta
    np.testing.assert_allclose(np.cumprod(1 - cosine)[:-1], f[1:-1] / f[0], rtol=1e-10)


def test_unknown_noise_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        betas_for("sqrt", 1000)


def test_ddim_spacing_is_the_smallest_integer_stride():
    for count in (10, 25, 50, 100, 250, 500):
        stride = next(s for s in range(1, 1000) if math.ceil(1000 / s) == count)
        steps = space_timesteps(1000, f"ddim{count}")
        assert steps == set(range(0, 1000, stride))
        assert 999 not in steps  # unlike the plain count, the last step is dropped
        assert 999 in space_timesteps(1000, str(count))
    assert space_timesteps(1000, "ddim2") == {0, 500}  # strides 500..999 all give 2 steps
    # The last step is kept only when the stride divides T - 1.
    assert 999 in space_timesteps(1000, "ddim334")  # stride 3
    assert space_timesteps(1000, "ddim1000") == set(range(1000))


def test_section_counts():
    # T = 1000 in sections of 334, 333, 333 steps, each spanned end to end.
    expected = {*range(0, 334, 37), 334, 417, 500, 583, 666, 667, 833, 999}
    assert space_timesteps(1000, "10,5,3") == expected
    assert space_timesteps(1000, [10, 5, 3]) == expected
    # Python's round is half to even: 2.5 -> 2 (round half up would give 3).
    assert space_timesteps(6, "3") == {0, 2, 5}
    assert space_timesteps(4, "3") == {0, 2, 3}  # 1.5 -> 2
    assert space_timesteps(6, "4") == {0, 2, 3, 5}  # 5/3 accumulated: 1.67, 3.33, 5.0
    assert space_timesteps(10, "1,2") == {0, 5, 9}
    for empty in ("", None):
        assert space_timesteps(7, empty) == set(range(7))


@pytest.mark.parametrize(
    ("num", "spec", "message"),
    [
        (10, "ddim7", "exactly 7 steps out of 10"),
        (1000, "ddim1001", r"'ddimN' needs 2 <= N <= 1000"),
        (1000, "ddim0", r"'ddimN' needs 2 <= N <= 1000"),
        (1000, "ddim-1", r"'ddimN' needs 2 <= N <= 1000"),
        (1000, "ddim999", "exactly 999 steps"),
        (10, "20", "section 0 of 10 steps into 20"),
        (12, "10,5,3", "section 0 of 4 steps into 10"),
        (1000, "10-5-3", "comma-separated"),
        (1000, "ddimx", "ddimN"),
        (1000, "5,-1", ">= 0"),
    ],
)
def test_impossible_respacing_raises(num, spec, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(num, spec)


def test_respaced_schedule_keeps_alphas_cumprod():
    full = make_schedule("cosine", 1000)
    for respacing in ("ddim50", "10,5,3", "7"):
        spaced = make_schedule("cosine", 1000, respacing)
        # Not bit-exact: the respaced betas 1 - ab_t / ab_prev cancel where ab is ~1e-9.
        np.testing.assert_allclose(
            spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-8
        )
        assert spaced.num_timesteps == len(space_timesteps(1000, respacing))
    np.testing.assert_array_equal(make_schedule("cosine", 1000, None).betas, full.betas)
    np.testing.assert_array_equal(full.timestep_map, np.arange(1000))


def test_schedule_is_immutable_and_validates():
    schedule = Schedule.from_betas([0.1, 0.2, 0.3], [0, 5, 9])
    assert schedule.num_timesteps == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.betas = np.zeros(3)
    with pytest.raises(ValueError, match="read-only"):
        schedule.betas[0] = 0.5
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Schedule.from_betas([0.1, 0.0, 0.3])
    with pytest.raises(ValueError, match="at least 2 steps"):
        Schedule.from_betas([0.1])
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        Schedule.from_betas([0.1, 0.2, 0.3], [0, 1])


def test_truncate_keeps_the_low_noise_steps_exactly():
    from runtime.schedule import truncate

    full = make_schedule("cosine", 1000, "ddim25")
    cut = truncate(full, 500)
    k = cut.num_timesteps
    assert (cut.timestep_map <= 500).all() and full.timestep_map[k] > 500
    np.testing.assert_array_equal(cut.timestep_map, full.timestep_map[:k])
    for name in (
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "posterior_variance",
        "posterior_mean_coef1",
    ):
        np.testing.assert_allclose(getattr(cut, name), getattr(full, name)[:k], rtol=1e-12)
    with pytest.raises(ValueError, match="keeps"):
        truncate(full, 0)
