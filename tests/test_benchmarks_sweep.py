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


@pytest.fixture
def meta_source(tmp_path: Path) -> str:
    """A stand-in for the meta-learned source: other random weights (an ordinary state dict, as a real one is)."""
    from lit_finetune import ImageClassifier

    torch.manual_seed(4321)
    path = tmp_path / "meta_source.pt"
    torch.save(ImageClassifier(num_classes=5).state_dict(), path)
    return str(path)


def test_sweep_core_tiny(sweep, source: str, meta_source: str, fashion_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sweep, "GENEROUS_VAL", 10)  # the 'generous' set: 10/class here, so evaluation stays cheap
    profile = sweep.Profile(seeds=(0,), shots=(5,), steps={5: 3}, evals=2, generous_shots=(5,), pretrain_epochs=0)
    results = sweep.run_sweep(profile, source, fashion_root=str(fashion_root), test_limit=100, log=lambda _: None,
                              meta_pretrained=meta_source)  # fmt: skip

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
        for arm in ("finetune", "unfreeze", "l2sp", "dlr", "meta"):
            assert 0 < cell.runs[arm][0].backbone_change < math.inf, (tname, arm)  # measured from the arm's own source
        assert cell.runs["scratch"][0].backbone_change == math.inf
        assert cell.runs["l2sp"][0].l2sp_anchor_error == 0.0  # anchored to the source, not to the random init
        assert cell.runs["finetune"][0].l2sp_anchor_error is None
    assert any(k.startswith("layer4.") for k in reference)

    text = sweep.markdown(results, "tiny", profile, "this machine", "0.1 min", "a random state dict")
    for name, arm in sweep.ARMS.items():
        # main table + validation-size table (2 targets) + per seed, + paired table (2 targets, not the base),
        # + the size table for the parameter-efficient arms and full fine-tuning
        expected = 2 * 2 + 2 + (0 if name == "finetune" else 2) + (1 if arm.peft or name == "finetune" else 0)
        assert text.count(f"| {arm.label} |") == expected, name
    assert "Holm-adjusted over all 20 comparisons" in text  # 10 arms besides full fine-tuning x 2 targets x 1 N
    assert "trainable parameters" in text and "KiB" in text
    assert text.count("| *meta-learned − supervised source (points)* |") == 2
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
    assert {arms[a].peft for a in ("bn_only", "bitfit", "adapters", "lora")} == {"bn_only", "bitfit", "adapters", "lora"}
    assert arms["meta"].source == "meta" and {a.source for n, a in arms.items() if n != "meta"} == {"supervised"}
    base, fields = arms["finetune"], ("pretrained", "freeze", "l2sp_alpha", "backbone_lr_ratio", "peft", "source")
    for name, arm in arms.items():
        changed = {f for f in fields if getattr(arm, f) != getattr(base, f)}
        assert len(changed) == (0 if name == "finetune" else 1), (name, changed)


def test_pieces_write_provenance_and_merge_into_one_table(sweep, source, fashion_root, tmp_path, monkeypatch):
    """Two pieces (seed 0, seed 1) of a tiny profile through main(); --merge gives one table over both seeds."""
    import functools
    import json

    import provenance

    tiny = sweep.Profile(seeds=(0, 1), shots=(5,), steps={5: 2}, evals=1, generous_shots=(), pretrain_epochs=0)
    monkeypatch.setitem(sweep.PROFILES, "tiny", tiny)
    monkeypatch.setattr(sweep, "run_sweep", functools.partial(sweep.run_sweep, target_names=("fashion",), test_limit=50))
    common = ["--profile", "tiny", "--pretrained", source, "--meta-pretrained", source, "--fashion-root", str(fashion_root)]
    for seed in (0, 1):
        sweep.main([*common, "--seeds", str(seed), "--results", str(tmp_path / f"piece{seed}")])
    pieces = [tmp_path / f"piece{seed}" / "transfer_sweep.json" for seed in (0, 1)]
    for seed, piece in zip((0, 1), pieces):
        text = piece.with_suffix(".md").read_text()
        assert provenance.missing(text) == []
        record = provenance.read(text)
        assert record["command"].endswith(f"--seeds {seed} --results {tmp_path / f'piece{seed}'}")
        assert record["inputs"]["source checkpoint"]["sha256"] == provenance.sha256(source)
        assert record["config"]["profile"] == "tiny" and "seeds" not in record["config"]

    sweep.main(["--merge", *map(str, pieces), "--results", str(tmp_path / "merged")])
    merged = tmp_path / "merged" / "transfer_sweep.md"
    text = merged.read_text()
    record = provenance.read(text)
    assert provenance.missing(text) == [] and [p["file"] for p in record["pieces"]] == list(map(str, pieces))
    assert "seeds [0, 1]" in text and "piece 1 (0 x N 5)" in text and "piece 2 (1 x N 5)" in text
    data = json.loads(merged.with_suffix(".json").read_text())["data"]
    one = [json.loads(p.read_text())["data"]["results"]["fashion"]["5"]["runs"] for p in pieces]
    for arm, runs in data["results"]["fashion"]["5"]["runs"].items():
        assert runs == [one[0][arm][0], one[1][arm][0]]  # every run kept, in seed order

    # the piece that trained the sources describes them, the others were given the same files (same sha256):
    # the merge keeps the trained description; two pieces that trained theirs differently are refused
    trained = json.loads(pieces[0].read_text())
    trained["data"]["source"] = "3 epochs of `pretrain_source.yaml` (1.9 min)"
    pieces[0].write_text(json.dumps(trained))
    sweep.main(["--merge", *map(str, pieces), "--results", str(tmp_path / "merged2")])
    merged2 = json.loads((tmp_path / "merged2" / "transfer_sweep.json").read_text())["data"]
    assert merged2["source"] == trained["data"]["source"]
    retrained = json.loads(pieces[1].read_text())
    retrained["data"]["source"] = "5 epochs of `pretrain_source.yaml` (3.0 min)"
    pieces[1].write_text(json.dumps(retrained))
    with pytest.raises(provenance.PieceMismatch, match="describe their source differently"):
        sweep.main(["--merge", *map(str, pieces), "--results", str(tmp_path / "refused")])

    # pieces from another commit (or the same seed twice) are refused
    other = json.loads(pieces[1].read_text())
    other["provenance"]["commit"] = "0" * 40
    pieces[1].write_text(json.dumps(other))
    with pytest.raises(provenance.PieceMismatch, match="different or unknown commits"):
        sweep.main(["--merge", *map(str, pieces), "--results", str(tmp_path / "refused")])
    with pytest.raises(provenance.PieceMismatch, match="seed 0 is in more than one piece"):
        sweep.main(["--merge", str(pieces[0]), str(pieces[0]), "--results", str(tmp_path / "refused")])


def test_meta_arm_needs_its_source_and_the_meta_pretraining_recipe(sweep, source, tmp_path, monkeypatch):
    """Without a meta-learned source the arm is left out (or refused when asked for); the meta-pretraining runs
    the shipped config with the meta step size decaying over the whole run; the cost is read from the run's files."""
    from conftest import save_lightning_checkpoint

    from lit_finetune import ImageClassifier, MetaPretrainer

    profile = sweep.Profile(seeds=(0,), shots=(5,), steps={5: 1}, evals=1, generous_shots=(), pretrain_epochs=0)
    with pytest.raises(ValueError, match=r"arms \['meta'\] need the 'meta' source"):
        sweep.run_sweep(profile, source, arms=("finetune", "meta"), target_names=())

    calls = []
    monkeypatch.setattr(sweep, "run_cli", calls.append)
    best = sweep.pretrain_meta(tmp_path, epochs=3, accelerator="cpu", fashion_root="/data/fm")
    args = calls[0]
    assert args[args.index("--config") + 1].endswith("meta_pretrain_source.yaml") and "--trainer.max_epochs" in args
    assert args[args.index("--model.init_args.lr_scheduler.init_args.total_iters") + 1] == str(3 * 60)  # 300/5 per epoch
    assert args[args.index("--data.init_args.dataset.init_args.root") + 1] == "/data/fm"
    assert best.endswith("meta_source/runs/classifier/meta_pretrain_source/checkpoints/best.ckpt")

    model = MetaPretrainer(num_classes=5)
    model.cost.update(episodes=1500, images=75_000)
    save_lightning_checkpoint(model, tmp_path / "last.ckpt")
    text = sweep.source_cost(str(tmp_path / "best.ckpt"))
    assert text.startswith("reptile, 0 outer steps, 1,500 episodes, 75,000 images drawn, 5 inner steps")
    (tmp_path / "sup").mkdir()
    save_lightning_checkpoint(ImageClassifier(num_classes=5), tmp_path / "sup" / "last.ckpt")
    assert sweep.source_cost(str(tmp_path / "sup" / "best.ckpt")) == "0 optimizer steps of 128 images, about 0 images"



def test_a_piece_of_some_arms_keeps_the_paired_base(sweep) -> None:
    assert sweep.selected_arms(None) is None
    assert sweep.selected_arms(["lora", "bn_only"]) == ["finetune", "bn_only", "lora"]  # ARMS order, base added
    with pytest.raises(ValueError, match="unknown arms"):
        sweep.selected_arms(["lora", "prefix"])
