"""The GPU speed profile's mechanics, on the CPU (CI has no GPU; the device runs the same code at full size)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, assert_provenance


def run(*args: str, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)  # fmt: skip


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_refuses_and_names_the_dry_run(tmp_path):
    proc = run("--out", str(tmp_path), timeout=120)
    assert proc.returncode != 0 and "--dry-run" in proc.stderr and "CUDA" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_dry_run_pieces_measure_count_flops_check_device_batches_and_merge(tmp_path, fashion_root):
    """Two pieces (speed rows of two variants; a one-epoch time-to-accuracy fit) written with provenance, then
    merged into one gpu_check.md."""
    # the pieces of one table share their settings (merging refuses others): the fast tta variant in both
    common = ["--dry-run", "--data-root", str(fashion_root), "--out", str(tmp_path), "--tta-variant", "fp32"]
    speed = run(*common, "--models", "vae", "--variants", "fp32", "bf16+device", "--piece", "speed")
    assert speed.returncode == 0, speed.stderr[-3000:]
    work = tmp_path / "cwd"
    work.mkdir()
    tta = run(*common, "--models", "--tta-epochs", "1", "--tta-limit-batches", "0.02", "--piece", "tta", cwd=work)
    assert tta.returncode == 0, tta.stderr[-3000:]

    piece = json.loads((tmp_path / "speed.json").read_text())["data"]
    assert [(r["model"], r["variant"]) for r in piece["rows"]] == [("vae", "fp32"), ("vae", "bf16+device")]
    assert all("error" not in r and r["finite"] and r["steps_per_s"] > 0 for r in piece["rows"]), piece["rows"]
    assert piece["flops"]["vae"] > 0  # counted by FlopCounterMode over one training batch
    assert piece["device_batches"][0]["max_abs_difference"] == 0.0 and piece["device_batches"][0]["batches"] == 8
    record = assert_provenance(tmp_path / "speed.md", "gpu_check.py")
    assert record["config"]["dry_run"] is True and "--dry-run: mechanics only" in (tmp_path / "speed.md").read_text()
    (fit,) = json.loads((tmp_path / "tta.json").read_text())["data"]["tta"]
    assert "error" not in fit, fit
    assert not list(work.iterdir()), "the fit left files in the working directory"
    assert fit["epochs"] == 1 and len(fit["val_acc"]) == 1 and 0 <= fit["test_acc"] <= 1 and fit["fit_s"] > 0

    merged = run("--merge", str(tmp_path / "speed.json"), str(tmp_path / "tta.json"), "--out", str(tmp_path))
    assert merged.returncode == 0, merged.stderr[-3000:]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| vae | bf16+device |" in text and "| 1 |" in text and "Merged from 2 pieces" in text
    assert_provenance(tmp_path / "gpu_check.md", "gpu_check.py")


def test_peaks_and_rows():
    gpu_check = load_gpu_check()
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0 and gpu_check.peak_bf16_tflops("Quadro") is None
    rows = [{"model": "classifier", "variant": v, "steps_per_s": s, "first_loss": 2.3, "last_loss": 1.0,
             "finite": True, "warmup_s": 1.0} for v, s in (("fp32", 40.0), ("bf16+device+compile", 200.0))]  # fmt: skip
    lines = gpu_check.speed_rows(rows, {"classifier": 23e9}, 989.0)
    # 23 GFLOP a batch at 200 steps/s: 4.6 TFLOP/s, 0.47 % of 989, 5x fp32
    assert "| classifier | bf16+device+compile | 200.0 | 5.00x | 23 | 4.6 | 0.47% |" in lines[-1]
    tta = gpu_check.tta_rows([
        {"epochs": 2, "fit_s": 20.0, "first_step_s": 5.0, "val_acc": [(10.0, 0.91), (20.0, 0.925)],
         "reached_s": None, "test_acc": 0.92},
        {"epochs": 3, "fit_s": 28.0, "first_step_s": 5.0, "val_acc": [(10, 0.9), (19, 0.931), (28, 0.94)],
         "reached_s": 19.0, "test_acc": 0.935},
    ])  # fmt: skip
    assert tta[0].startswith("**Time to 93 %") and "28.0 s end to end, 3 epoch(s); test accuracy 93.50 %" in tta[0]


@pytest.mark.parametrize("variant", ["bf16+device+compile", "bf16+device+cudagraphs"])
def test_compiled_variants_ask_for_compilation_and_data_on_device(variant):
    precision, channels_last, on_device, mode = load_gpu_check().VARIANTS[variant]
    assert precision == "bf16-mixed" and channels_last and on_device and mode in ("default", "reduce-overhead")
