"End-to-end check of `mmfm.examples.astronomy.run` at size 'tiny': finite metrics with baselines, figures, determinism."
import math
import pytest
import torch
from mmfm.examples.astronomy import run, ASTRO_METRICS

@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
    "Two runs with one torch thread: threaded float reductions may differ in the last bits from run to run, and the "
    "photo-z read as the mean of p(z) carries such differences through training into the metric."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = tmp_path_factory.mktemp('data')
        a = run('tiny', tmp_path_factory.mktemp('out_a'), data, seed=0)
        out_b = tmp_path_factory.mktemp('out_b')
        b = run('tiny', out_b, data, seed=0)
    finally: torch.set_num_threads(threads)
    return a, b, out_b

def test_metrics_finite_with_baselines(two_runs):
    a, _, _ = two_runs
    assert set(a) == set(ASTRO_METRICS)
    for name, m in a.items():
        assert math.isfinite(m['model']) and m['description'], name
        if name == 'hsc_codec_floor_rms_sigma': assert m['baseline'] is None; continue   # a floor, not a contest
        assert m['baseline'] is not None and math.isfinite(m['baseline']) and m['baseline_name'], name
    # the codec floor is recorded beside the HSC figures; p(z) is scored as a distribution
    assert a['hsc_from_legacy_rms_sigma']['codec_floor'] == a['hsc_codec_floor_rms_sigma']['model']
    m = a['hsc_from_legacy_rms_sigma_mean']   # the decoded HSC pixels, and how many the codec's fitted range held in
    assert m['pixels_decoded'] > 0 and 0 <= m['pixels_held_at_bound'] <= m['pixels_decoded']
    assert 0 <= a['photoz_crps']['model'] and len(a['photoz_crps']['pit_hist']) == 10
    assert all(0 <= a[f'photoz_coverage{l}_error']['model'] <= 1 for l in (68, 95))

def test_figures_written(two_runs):
    _, _, out = two_runs
    for f in ('hsc_from_legacy.png', 'photoz.png', 'pz.png', 'probe_curves.png'):
        assert (out / f).is_file() and (out / f).stat().st_size > 1000, f

def same_metrics(a, b, rel=1e-4, abs_tol=1e-6):
    """Equal structure and text, floats equal to a tolerance: the probes read float embeddings of a transformer whose threaded
    float reductions may differ in the last bits from run to run (the token-based metrics come out bit-identical)."""
    if isinstance(a, dict): return a.keys() == b.keys() and all(same_metrics(a[k], b[k], rel, abs_tol) for k in a)
    if isinstance(a, float) and isinstance(b, float): return math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)
    return a == b

def test_same_metrics_twice(two_runs):
    a, b, _ = two_runs
    assert same_metrics(a, b), (a, b)
    for name in ('hsc_from_legacy_rms_sigma', 'photoz_sigma_nmad', 'photoz_sigma_nmad_argmax', 'photoz_outlier_fraction'):
        assert a[name] == b[name], name

def test_probe_curves_nested_and_complete(two_runs):
    a, _, _ = two_runs
    for name in ('probe_r2_mag', 'probe_r2_size', 'probe_r2_ellipticity'):
        m = a[name]
        assert m['higher_is_better'] and m['n_test'] > 0, name
        curve = m['curve']
        assert sorted(curve) == [0.01, 0.1, 1.0], name
        n = [curve[f]['n_labels'] for f in sorted(curve)]
        assert n == sorted(n) and n[0] >= 5, (name, n)
        assert m['model'] == curve[1.0]['probe'] and m['baseline'] == curve[1.0]['cnn'], name
        assert all(math.isfinite(curve[f][k]) for f in curve for k in ('probe', 'cnn')), name
