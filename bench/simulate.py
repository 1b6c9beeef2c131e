"""Throughput of the multi-survey simulation (`mmfm.simulate`): galaxies per second, goal ≥ 100/s on 2 cores.

    .venv/bin/python bench/simulate.py [--n 1000] [--workers 2]

Prints, in one run:
  * the whole data set (`simulate_dataset`: draw the population, render every galaxy into each survey that sees it,
    add noise, write the FITS cutouts, catalogs, manifest and truth), with 1 and with `--workers` processes;
  * rendering alone with every galaxy drawn into all three surveys (no footprints, no I/O);
  * a naive reference measured in the same run: one GalSim drawing per band (no sharing of equal PSFs) and
    astropy's `PrimaryHDU.writeto` per cutout. Ratios > 1 mean the library is faster than the reference.
The machine may be shared: figures vary with its load, ratios much less.
"""
import argparse, os, shutil, tempfile, time
import numpy as np
import galsim
from astropy.io import fits
from mmfm.surveys import survey_info, cutout_header
from mmfm.simulate import (SimConfig, simulate_dataset, draw_galaxies, render_cutout, galaxy_profile, survey_psf,
                           cutout_noise, IMAGE_SOURCES)


def naive_galaxy(g, cfg, out):
    "Reference: every band drawn on its own, every cutout written by astropy."
    for s in IMAGE_SOURCES:
        if not g[f'in_{s}']: continue
        info, n = survey_info(s), cfg.stamp_size(s)
        prof = galaxy_profile(g, cfg)
        bands = [galsim.Convolve(prof.withFlux(float(g[f'flux_{s}_{b}'] / info.nmgy_per_unit[i])), survey_psf(s, b))
                 .drawImage(nx=n, ny=n, scale=info.pixel_scale_arcsec).array for i, b in enumerate(info.bands)]
        img = (np.stack(bands) + cutout_noise(g, s, cfg, (info.n_bands, n, n))).astype(np.float32)
        fits.PrimaryHDU(img, header=cutout_header(s, g['ra'], g['dec'], n, g['id'])).writeto(f"{out}/{s}_{g['id']}.fits", overwrite=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=1000, help='galaxies per measurement')
    p.add_argument('--workers', type=int, default=2, help='processes for the parallel run')
    a = p.parse_args()
    cfg = SimConfig(n_galaxies=a.n, seed=0)
    tmp = tempfile.mkdtemp(prefix='bench_sim_')
    try:
        simulate_dataset(f'{tmp}/warm', SimConfig(n_galaxies=50, seed=1))          # GalSim tables, colour tables, imports
        print(f"multi-survey simulation, {a.n} galaxies, {os.cpu_count()} CPU(s) visible, load average {os.getloadavg()[0]:.1f}")
        rates = {}
        for w in sorted({1, a.workers}):
            s = simulate_dataset(f'{tmp}/w{w}', cfg, workers=w)
            rates[w] = s['galaxies_per_second']
            print(f"  simulate_dataset, workers={w}: {rates[w]:7.1f} galaxies/s  ({s['seconds']:.1f} s; "
                  f"{s['legacy_images']} Legacy, {s['hsc_images']} HSC, {s['gaia_images']} Gaia cutouts)")
        truth = draw_galaxies(cfg).to_dict('records')
        t0 = time.perf_counter()
        for g in truth:
            for sv in IMAGE_SOURCES: render_cutout(g, sv, cfg, noise=True)
        all3 = len(truth) / (time.perf_counter() - t0)
        print(f"  rendering only, every galaxy in all 3 surveys (1 process): {all3:7.1f} galaxies/s")
        n_ref = min(a.n, 300)
        os.makedirs(f'{tmp}/naive')
        t0 = time.perf_counter()
        for g in truth[:n_ref]: naive_galaxy(g, cfg, f'{tmp}/naive')
        ref = n_ref / (time.perf_counter() - t0)
        print(f"  naive reference (1 process, {n_ref} galaxies):            {ref:7.1f} galaxies/s")
        print(f"  ratio simulate_dataset workers=1 / naive: {rates[1] / ref:5.2f}")
        best = max(rates.values())
        print(f"  goal >= 100 galaxies/s on 2 cores: {'met' if best >= 100 else 'NOT met'} ({best:.0f}/s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
