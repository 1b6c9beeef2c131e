"""How the synthetic cohort's build time scales: tables (vectorised) vs ECGs (per patient), ECGSYN vs the simple model.

Prints per-patient costs measured in this run and what they imply for 100,000 patients. Run:
    python bench/bench_medical_build.py
"""
import time

import numpy as np

from mmfm.medical import cohort_fields, patient_ecg


def per_patient_seconds(method: str, n: int, seed: int = 0) -> float:
    fields = cohort_fields(n, seed)
    t0 = time.perf_counter()
    for i in range(n): patient_ecg(seed, i, fields.heart_rate.iloc[i], fields.ecg_gain.iloc[i], method)
    return (time.perf_counter() - t0) / n


def main():
    t0 = time.perf_counter(); cohort_fields(100_000, 0); t_tables = time.perf_counter() - t0
    ecgsyn, simple = per_patient_seconds("ecgsyn", 60), per_patient_seconds("simple", 300)
    print(f"tables of 100,000 patients: {t_tables:.2f} s")
    print(f"one ECG, ECGSYN: {1e3 * ecgsyn:.1f} ms  -> 100,000 patients: {1e5 * ecgsyn / 60:.0f} CPU-minutes")
    print(f"one ECG, simple: {1e3 * simple:.2f} ms  -> 100,000 patients: {1e5 * simple / 60:.1f} CPU-minutes")
    print(f"ECGSYN / simple: {ecgsyn / simple:.0f}x;  ECG array for 100,000: {1e5 * 1024 * 4 / 1e6:.0f} MB (float32)")


if __name__ == "__main__": main()
