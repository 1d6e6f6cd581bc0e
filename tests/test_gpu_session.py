"""``benchmarks/gpu_session.py``: the GPU profile's pieces in one device call, run here at toy sizes on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

from conftest import REPO, assert_provenance


def session(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_session.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)  # fmt: skip


def make_bundle(fashion_root, bundle) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "full_dataset.py"), "--bundle", str(bundle),
                    "--data-root", str(fashion_root)],
                   check=True, capture_output=True, env=env, timeout=120)  # fmt: skip


def test_dry_session_runs_every_piece_packs_them_and_merges_with_provenance(tmp_path, fashion_root):
    bundle, out, results = tmp_path / "bundle", tmp_path / "out", tmp_path / "results"
    make_bundle(fashion_root, bundle)
    commit = (bundle / "COMMIT").read_text().strip()
    assert len(commit.removesuffix("-dirty")) == 40
    proc = session("--dry-run", "--bundle", str(bundle), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["classifier", "gan_vae", "full", "tta"]
    assert all(": ok," in line for line in proc.stdout.splitlines()), proc.stdout
    assert [p.name for p in out.iterdir()] == ["gpu_session.tgz"]  # one file back from the device, not 8+
    with tarfile.open(out / "gpu_session.tgz") as tar:
        names = set(tar.getnames())
    assert {"session.log", "classifier.json", "gan_vae.json", "tta.json", "fashion_mnist_full.md"} <= names
    results.mkdir()
    merged = session("--merge", str(out / "gpu_session.tgz"), "--results", str(results))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    record = assert_provenance(results / "gpu_check.md", "gpu_check.py")
    assert [p["file"].rsplit("/", 1)[-1] for p in record["pieces"]] == ["classifier.json", "gan_vae.json", "tta.json"]
    text = (results / "gpu_check.md").read_text()
    assert "| dcgan |" in text and "| vae |" in text and "93 %" in text
    assert text.count("Data on the device") == 1  # the speed pieces' identical checks are shown once
    assert_provenance(results / "fashion_mnist_full.md", "full_dataset.py")


def test_pieces_that_do_not_fit_the_budget_are_skipped_and_said(tmp_path, fashion_root):
    out = tmp_path / "out"
    proc = session("--dry-run", "--bundle", str(tmp_path / "none"), "--data-root", str(fashion_root),
                   "--out", str(out), "--budget", "30")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipped") == 4 and "needs about 90 s" in proc.stdout
    merged = session("--merge", str(out / "gpu_session.tgz"), "--results", str(tmp_path))
    assert merged.returncode != 0 and "holds no finished piece" in merged.stderr
    missing = session("--bundle", str(tmp_path / "none"), "--out", str(out))
    assert missing.returncode != 0 and "make the bundle first" in missing.stderr
