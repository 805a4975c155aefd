"""The speed benchmark's machinery on the tiny architecture (no timing is asserted): it runs A, B and C, the latent
cache step and predict-images, writes its JSON with device, load and versions, and ends with the summary line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"speedup_vs_released=[\d.]+ latent_cache=[\d.]+ bf16_fraction_of_peak=[\d.]+")


def run_script(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``benchmarks/<script>`` in a subprocess from ``tmp_path`` (the repository importable), checked to succeed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_benchmark(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "speed.json"
    proc = run_script(tmp_path, "speed.py", "--tiny", "--repeats", "1", "--out", str(out), *args)
    return proc.stdout.strip().splitlines()[-1], json.loads(out.read_text())


@pytest.mark.slow  # ~25 s: a subprocess that imports and builds everything
def test_quick_mode_on_the_tiny_architecture(tmp_path):
    last, report = run_benchmark(
        tmp_path, "--quick", "--sizes", "32", "--c-batch", "3", "--c-precision", "bf16"
    )
    assert SUMMARY.fullmatch(last), last
    for key in ("device", "threads", "versions", "settings", "load_start", "load_end", "matmul_gflops"):
        assert key in report, key
    assert report["mode"] == "quick" and report["matmul_gflops"]["bf16"] > 0
    ev = report["diffews_eval_32"]
    assert set(ev) >= {
        "A_released_fp32_b1",
        "B_fsseg_fp32_b1",
        "C_fsseg_bf16_b3",
        "C_unet",
        "speedup_C_over_A",
    }
    assert report["settings"]["c_batch"] == 3 and report["settings"]["repeats"] == 1
    assert report["settings"]["c_vae_batch"] == 1  # on a CPU: one image per VAE call
    assert (
        report["settings"]["c_precision"] == "bf16"
        and report["settings"]["c_precision_reason"] == "--c-precision bf16"
    )
    assert ev["C_fsseg_bf16_b3"]["per_call"] == 3 and ev["C_unet"]["gflop_per_batch"] > 0
    # per component: each timed, the convolutions' and matmuls' FLOPs counted, post-processing has none
    comps = ev["C_components"]
    assert list(comps) == ["vae_encode", "unet", "vae_decode", "post_processing", "other"]
    for comp in ("vae_encode", "unet", "vae_decode"):
        assert comps[comp]["calls_per_batch"] >= 1 and comps[comp]["gflops"] > 0, comp
    # C's 3 queries, 3 supports and 3 support masks encoded one per call, its 3 predictions decoded one per call
    assert comps["vae_encode"]["calls_per_batch"] == 9 and comps["vae_decode"]["calls_per_batch"] == 3
    assert comps["post_processing"]["calls_per_batch"] == 1 and comps["post_processing"]["gflops"] is None
    assert sum(v["share_of_time"] for v in comps.values()) == pytest.approx(1, abs=0.01)
    assert ev["C_unet"]["gflops"] == comps["unet"]["gflops"]
    assert set(ev["A_B_component_seconds_per_episode"]["A_released_fp32_b1"]) == set(comps) - {"other"}
    # A (three VAE calls, the two-pass bank, uint8 through numpy) computes what B computes
    assert ev["agreement_episode0"]["A_vs_B_pixels_differ"] <= 0.01
    cache = report["latent_cache_32"]
    assert cache["live"]["seconds_min"] > 0 and cache["cached"]["seconds_min"] > 0
    assert f"speedup_vs_released={ev['speedup_C_over_A']}" in last
    assert "diffseg_eval_32" not in report and "predict_images_32" not in report  # quick: not run


@pytest.mark.slow
def test_c_runs_in_bf16_only_where_the_cpu_computes_it_natively(tmp_path):
    """``--c-precision auto``: C in bf16 on a CPU with AVX512-BF16 or AMX, else in fp32 (bf16 is emulated there),
    said in the JSON and the last line (nan: no bf16 figure)."""
    from fsseg.hardware import native_bf16

    native, why = native_bf16("cpu")
    last, report = run_benchmark(tmp_path, "--quick", "--sizes", "32", "--only", "diffews")
    precision = "bf16" if native else "fp32"
    assert report["settings"]["c_precision"] == precision and why in report["settings"]["c_precision_reason"]
    assert f"C_fsseg_{precision}_b2" in report["diffews_eval_32"]
    assert last.endswith("bf16_fraction_of_peak=nan") != native


@pytest.mark.slow
def test_full_mode_sections_on_the_tiny_architecture(tmp_path):
    _, report = run_benchmark(tmp_path, "--sizes", "32", "--only", "predict", "compile")
    assert report["predict_images_32"]["speedup_bf16"] > 0
    assert report["compile_32"]["first_compiled_call_s"] > 0


@pytest.mark.slow
def test_vae_paths_benchmark_compares_the_variants_with_fp32(tmp_path):
    out = tmp_path / "vae.json"
    args = ["--size", "32", "--encode-batch", "3", "--decode-batch", "2", "--repeats", "1", "--out", str(out)]
    proc = run_script(tmp_path, "vae_paths.py", *args)
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"fp32", "bf16_autocast", "bf16_autocast_per_image", "bf16_weights"}
    fp32 = report["variants"]["fp32"]
    assert fp32["latent_max_diff_vs_fp32"] == 0 and fp32["speedup_vs_fp32"] == 1
    for name, v in report["variants"].items():
        assert v["encode_s"] > 0 and v["decode_s"] > 0, name
        assert 0 <= v["mask_pixels_differ_vs_fp32"] <= 1, name
    # bf16 rounds: its latents differ from fp32's, by far less than their size
    bf16 = report["variants"]["bf16_autocast"]["latent_max_diff_vs_fp32"]
    assert 0 < bf16 < 0.1 * report["latent_abs_max"]
    prof = report["bf16_autocast_profile"]["encode"]
    assert prof["convolution_gflop"] > 0 and sum(prof["share"].values()) == pytest.approx(1, abs=0.01)
    assert f"wrote {out}" in proc.stdout
