"End-to-end check of `mmfm.astro_example.run` at size 'tiny': finite metrics with baselines, figures, determinism."
import math
import pytest
from mmfm.astro_example import run

@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
    data = tmp_path_factory.mktemp('data')
    a = run('tiny', tmp_path_factory.mktemp('out_a'), data, seed=0)
    out_b = tmp_path_factory.mktemp('out_b')
    b = run('tiny', out_b, data, seed=0)
    return a, b, out_b

def test_metrics_finite_with_baselines(two_runs):
    a, _, _ = two_runs
    assert set(a) == {'hsc_from_legacy_rms_sigma', 'photoz_sigma_nmad', 'photoz_outlier_fraction'}
    for name, m in a.items():
        assert math.isfinite(m['model']) and m['baseline'] is not None and math.isfinite(m['baseline']), name
        assert m['baseline_name'] and m['description'], name

def test_figures_written(two_runs):
    _, _, out = two_runs
    for f in ('hsc_from_legacy.png', 'photoz.png'):
        assert (out / f).is_file() and (out / f).stat().st_size > 1000, f

def test_same_metrics_twice(two_runs):
    a, b, _ = two_runs
    assert a == b
