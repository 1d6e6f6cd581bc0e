"""The GPU check script's mechanics, on the CPU (CI has no GPU; the device run uses the same code)."""

import subprocess
import sys

from conftest import REPO, assert_provenance


def test_gpu_check_runs_variants_and_reports_channels_last(tmp_path, fashion_root):
    cmd = [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--backbone", "resnet_small",
           "--batch-size", "16", "--steps", "2", "--warmup", "1", "--data-root", str(fashion_root), "--out", str(tmp_path),
           "--variants", "fp32", "bf16-mixed+channels_last"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in (tmp_path / "gpu_check.md").read_text().splitlines()[2:4]}
    assert set(rows) == {"fp32", "bf16-mixed+channels_last"}
    for cells in rows.values():
        assert "failed" not in cells[2] and cells[5].strip() == "yes"  # ran, finite losses
    assert rows["fp32"][7].strip() == "no" and rows["bf16-mixed+channels_last"][7].strip() == "yes"
    record = assert_provenance(tmp_path / "gpu_check.md", "gpu_check.py")
    assert record["command"].endswith("--variants fp32 bf16-mixed+channels_last")
