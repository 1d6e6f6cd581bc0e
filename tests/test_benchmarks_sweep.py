"""The transfer sweep's core at a tiny size: every cell is measured, the arms get equal budgets,
the linear probe leaves the source backbone untouched, L2-SP anchors to the source weights."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("transfer_sweep")


@pytest.fixture
def source(tmp_path: Path) -> str:
    """A 'pretrained' source state dict: random weights, but not the ones any arm starts from."""
    from lit_finetune import ImageClassifier

    torch.manual_seed(1234)
    path = tmp_path / "source.pt"
    torch.save(ImageClassifier(num_classes=5).state_dict(), path)
    return str(path)


def test_sweep_core_tiny(sweep, source: str, fashion_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sweep, "GENEROUS_VAL", 10)  # the 'generous' set: 10/class here, so evaluation stays cheap
    profile = sweep.Profile(seeds=(0,), shots=(5,), steps={5: 3}, evals=2, generous_shots=(5,), pretrain_epochs=0)
    results = sweep.run_sweep(profile, source, fashion_root=str(fashion_root), test_limit=100, log=lambda _: None)

    assert set(results) == {"fashion", "digits"}
    reference = sweep.source_backbone(source)
    for tname, cells in results.items():
        cell = cells[5]
        assert set(cell.runs) == set(sweep.ARMS), tname
        assert cell.val_small == 5 and cell.val_generous == 10
        for arm, runs in cell.runs.items():
            assert len(runs) == 1
            run = runs[0]
            assert run.steps == run.batches == 3, (tname, arm)  # same optimizer steps, every arm
            assert set(run.test_acc) == {"small", "generous"}
            assert set(run.chosen_step.values()) <= sweep.eval_steps(3, 2) == {2, 3}
        # the probe trained only its head: the backbone (weights and BatchNorm statistics) is the source's, bit for bit
        assert cell.runs["probe"][0].backbone_change == 0.0
        for arm in ("finetune", "unfreeze", "l2sp", "dlr"):
            assert 0 < cell.runs[arm][0].backbone_change < math.inf, (tname, arm)
        assert cell.runs["scratch"][0].backbone_change == math.inf
        assert cell.runs["l2sp"][0].l2sp_anchor_error == 0.0  # anchored to the source, not to the random init
        assert cell.runs["finetune"][0].l2sp_anchor_error is None
    assert any(k.startswith("layer4.") for k in reference)

    text = sweep.markdown(results, "tiny", profile, "this machine", "0.1 min", "a random state dict")
    for arm in sweep.ARMS.values():
        assert text.count(f"| {arm.label} |") == 2 * 2 + 2  # main table + validation-size table (2 targets) + per seed
    assert "bit-identical to the source after training: yes" in text
    assert "anchor equal to the source weights: yes" in text
    sweep.plot(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_validation_never_larger_than_training(sweep) -> None:
    """Digits' smallest class has 122 training images: at N=100 only 22 are left for validation."""
    digits = sweep.targets()["digits"]
    assert sweep.min_class_pool(digits) == 122
    labels = torch.arange(10).repeat_interleave(30)
    picked = sweep.class_balanced_subset(labels, 7, seed=3)
    assert labels[picked].bincount().tolist() == [7] * 10
    assert not torch.equal(picked, sweep.class_balanced_subset(labels, 7, seed=4))


def test_arms_differ_only_in_their_treatment(sweep) -> None:
    arms = sweep.ARMS
    assert [a.pretrained for a in arms.values()].count(False) == 1 and not arms["scratch"].pretrained
    assert arms["probe"].freeze == "probe" and arms["unfreeze"].freeze == "unfreeze"
    assert arms["l2sp"].l2sp_alpha > 0 and arms["dlr"].backbone_lr_ratio < 1
    base, fields = arms["finetune"], ("pretrained", "freeze", "l2sp_alpha", "backbone_lr_ratio")
    for name, arm in arms.items():
        changed = {f for f in fields if getattr(arm, f) != getattr(base, f)}
        assert len(changed) == (0 if name == "finetune" else 1), (name, changed)
