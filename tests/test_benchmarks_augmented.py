"""benchmarks/gan_augmented.py at a tiny size: end to end (GAN, generator selection, every arm for both
inits, markdown and figure), and the arms' mechanics with a generator whose samples can be recognised."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO, assert_provenance, save_lightning_checkpoint
from torch import nn

sys.path.insert(0, str(REPO / "benchmarks"))
import gan_augmented as bench
from transfer_sweep import evaluate, mean_std


class ConstantGenerator(nn.Module):
    """G(z, y): constant images (never a real photo) whose grey level encodes the label."""

    latent_dim = 4

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = 0.1 * y.float() - 0.45 + 0.01 * torch.tanh(z[:, 0])
        return value.view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()


def is_constant(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return (flat.max(1).values - flat.min(1).values) < 1e-6


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A 'pretrained' source classifier: random weights, not the ones any scratch arm starts from."""
    from lit_finetune import ImageClassifier

    torch.manual_seed(1234)
    return save_lightning_checkpoint(ImageClassifier(num_classes=5), tmp_path_factory.mktemp("src") / "source.ckpt")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, source, fashion_root):
    tmp = tmp_path_factory.mktemp("gan_augmented")
    argv = ["--tiny", "--pretrained", source, "--fashion-root", str(fashion_root),
            "--results", str(tmp / "results"), "--workdir", str(tmp / "work")]  # fmt: skip
    results, selections = bench.main(argv, keep_models=True)
    return results, selections, tmp / "results"


def test_arms_and_profiles_cover_the_protocol():
    keys = [a.key for a in bench.ARMS]
    assert keys == ["real", "r0.25", "r0.5", "r1", "r0.25f", "r0.5f", "r1f", "cas"]
    assert [a.ratio for a in bench.ARMS if a.augments and not a.filtered] == list(bench.RATIOS) == [0.25, 0.5, 1.0]
    assert [a.ratio for a in bench.ARMS if a.filtered] == [0.25, 0.5, 1.0]
    assert bench.ARM_BY_KEY["cas"].cas and not bench.ARM_BY_KEY["cas"].augments
    assert set(bench.INITS) == {"finetuned", "scratch"}
    for name in ("quick", "full"):
        profile = bench.PROFILES[name]
        assert profile.shots == (10, 50, 200) and len(profile.seeds) >= 5, name
        assert profile.val_per_class == 100 and profile.test_limit is None, name  # the full 5,000 test images
        assert profile.gan_steps % profile.snapshot_every == 0


def test_tiny_end_to_end_numbers_come_from_the_runs(tiny_run, fashion_root):
    results, selections, _ = tiny_run
    profile = bench.PROFILES["tiny"]
    (n,) = profile.shots
    assert set(results[n]) == set(bench.INITS)
    dm = bench.target_data(n, 0, profile, profile.batch_size, False, str(fashion_root))
    dm.setup("test")
    test = dm.test_set.__getitems__(range(profile.test_limit))
    for init, runs in results[n].items():
        assert list(runs) == [a.key for a in bench.ARMS] + [bench.CHOSEN]
        for key, (run,) in runs.items():
            assert run.steps == profile.steps, (init, key)  # equal optimizer steps, every arm
            assert run.chosen_step in bench.eval_steps(profile.steps, profile.evals), (init, key)
            filtered = bench.ARM_BY_KEY[run.arm].filtered  # the chosen row: the arm validation picked
            assert (run.acceptance is not None) == filtered, (init, key)
            if key != bench.CHOSEN:  # the reported accuracy is what evaluating the run's model gives
                assert evaluate(run.model, *test, "cpu", chunk=250)[0] == run.test_acc, (init, key)
        # the chosen row is the real + G run with the best validation accuracy, reported by its test accuracy
        candidates = {k: r[0] for k, r in runs.items() if k in bench.ARM_BY_KEY and bench.ARM_BY_KEY[k].augments}
        best = max(candidates.values(), key=lambda r: (r.val_acc, -r.val_loss))
        chosen = runs[bench.CHOSEN][0]
        assert chosen.arm in candidates and chosen.test_acc == candidates[chosen.arm].test_acc == best.test_acc
    # fine-tuned and scratch start differently
    assert not torch.equal(
        results[n]["finetuned"]["real"][0].model.backbone.conv1.weight,
        results[n]["scratch"]["real"][0].model.backbone.conv1.weight,
    )
    (selection,) = selections[n]
    assert len(selection.snapshots) == 2 * profile.gan_steps // profile.snapshot_every  # raw and EMA each time
    assert selection.chosen.fid == min(s.fid for s in selection.snapshots)
    assert selection.generator_steps == profile.gan_steps


def test_tiny_run_records_provenance(tiny_run, source):
    _, _, out = tiny_run
    record = assert_provenance(out / "gan_augmented.md", "gan_augmented.py", {"source classifier": source})
    assert record["command"].startswith("python benchmarks/gan_augmented.py --tiny --pretrained")
    assert set(record["inputs"]) == {"source classifier", "source DCGAN"}  # the DCGAN was trained, then hashed
    assert record["config"]["profile"] == "tiny" and "seeds" not in record["config"]


def test_tiny_markdown_and_figure_list_every_arm(tiny_run):
    results, _, out = tiny_run
    text = (out / "gan_augmented.md").read_text()
    assert "source DCGAN: 1 epoch(s) of `configs/dcgan/pretrain.yaml`" in text  # the generator's start, pretrained here
    (n,) = results
    for init, runs in results[n].items():
        for key, arm_runs in runs.items():
            cells = f"| {bench.INITS[init]} | {bench.label(key)} | {mean_std([r.test_acc for r in arm_runs])} |"
            assert cells in text, cells
    needles = [f"τ = {bench.THRESHOLD}", "CAS gap", "2.03 %", "Ravuri & Vinyals", "val FID", "load average"]
    needles += ["min wall", "min CPU time", "torch ", "lightning ", "profile `tiny`", "Holm-corrected"]
    for needle in needles:
        assert needle in text, needle
    assert (out / "gan_augmented.png").stat().st_size > 10_000


def test_cas_sees_no_real_image_and_ratios_add_what_they_say(source, fashion_root, monkeypatch):
    """With a generator of recognisable (constant) images: real only sees none of them, ratio r adds
    round(r * B) per batch of B real images, CAS sees only them."""
    from lit_finetune import GANAugmentedClassifier

    seen: list[tuple[str, torch.Tensor]] = []
    shared = GANAugmentedClassifier._shared_step

    def recorder(self, batch, metrics):
        if metrics is self.train_metrics:
            arm = "cas" if self.hparams.synthetic_only else f"{self.hparams.synthetic_ratio:g}"
            seen.append((arm + ("f" if self.teacher is not None else ""), is_constant(batch[0])))
        return shared(self, batch, metrics)

    monkeypatch.setattr(GANAugmentedClassifier, "_shared_step", recorder)
    profile = bench.PROFILES["tiny"]
    dm = bench.target_data(5, 0, profile, profile.batch_size, True, str(fashion_root))
    val = dm.val_set.__getitems__(range(20))
    arms = [bench.ARM_BY_KEY[k] for k in ("real", "r0.5", "r1f", "cas")]
    cell = bench.run_cell(5, 0, dm, ConstantGenerator(), profile, source, val, val, "cpu", arms, log=lambda _: None)
    assert set(cell) == set(bench.INITS)
    by_arm: dict[str, list[torch.Tensor]] = {}
    for arm, marks in seen:
        by_arm.setdefault(arm, []).append(marks)
    B = profile.batch_size
    assert len(by_arm["0"]) == len(by_arm["0.5"]) == len(by_arm["cas"]) == 2 * profile.steps  # two inits
    assert all(not m.any() for m in by_arm["0"])
    # b real images per batch (B, or what the epoch has left) plus round(r * b) synthetic ones
    assert all(0 < int((~m).sum()) <= B and int(m.sum()) == round(0.5 * int((~m).sum())) for m in by_arm["0.5"])
    assert all(0 < len(m) <= B and m.all() for m in by_arm["cas"])  # CAS: no real training image at all
    assert all(int(m.sum()) <= int((~m).sum()) for m in by_arm["1f"])  # filtered: at most r * b kept
    for runs in cell.values():
        assert 0 <= runs["r1f"].acceptance <= 1 and 0 <= runs["r1f"].filled <= 1


def test_verdict_is_a_holm_corrected_paired_test_without_the_chosen_row():
    def runs(values, arm="r0.25"):
        return [bench.Run(test_acc=v, val_acc=v, val_loss=0.0, steps=1, arm=arm) for v in values]

    real = [0.50, 0.52, 0.54]
    results = {10: {"finetuned": {
        "real": runs(real),
        "r0.25": runs([0.60, 0.61, 0.65]),  # +10, +9, +11: t = 17.3, p = 0.0033
        "r1": runs([0.40, 0.41, 0.42]),  # -10, -11, -12: p = 0.0027
        "r0.5": runs([0.55, 0.47, 0.58]),  # +5, -5, +4: p = 0.72
        bench.CHOSEN: runs([0.60, 0.61, 0.65]),  # a copy of r0.25: not a member of the family
    }, "scratch": {}}}  # fmt: skip
    assert [key for _, _, key, _ in bench.family(results)] == ["r0.25", "r1", "r0.5"]
    text = bench.verdict(results)
    assert "family of 3 cells" in text
    assert "helped significantly in 1, hurt significantly in 1, and was not distinguishable from real only in 1" in text
    table = {line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| fine-tuned")}
    assert "| -12.0 |" in table[bench.label("r1")]  # the worst seed is shown
    assert table[bench.label("r0.25")].endswith("| 0.003 | 0.008 * |")  # Holm: max(3 x 0.0027, 2 x 0.0033)
    assert not table[bench.label("r0.5")].endswith("* |")


def test_a_second_piece_merges_with_the_first(tiny_run, source, fashion_root):
    """``--seeds 1`` beside the tiny run (seed 0), same cached source DCGAN; ``--merge`` gives both seeds per cell."""
    import json

    import provenance

    results, _, out = tiny_run
    tmp = out.parent
    argv = ["--tiny", "--seeds", "1", "--pretrained", source, "--fashion-root", str(fashion_root),
            "--results", str(tmp / "piece1"), "--workdir", str(tmp / "work")]  # fmt: skip
    bench.main(argv)
    pieces = [out / "gan_augmented.json", tmp / "piece1" / "gan_augmented.json"]
    merged, selections = bench.main(["--merge", *map(str, pieces), "--results", str(tmp / "merged")])
    text = (tmp / "merged" / "gan_augmented.md").read_text()
    record = provenance.read(text)
    assert provenance.missing(text) == [] and [p["file"] for p in record["pieces"]] == list(map(str, pieces))
    assert "Merged from 2 pieces" in text
    second = json.loads(pieces[1].read_text())["data"]["results"]
    (n,) = results
    assert [len(s) for s in selections.values()] == [2]
    for init, runs in merged[n].items():
        for key, arm_runs in runs.items():
            assert [r.test_acc for r in arm_runs] == [results[n][init][key][0].test_acc,
                                                       second[str(n)][init][key][0]["test_acc"]]  # fmt: skip
            cells = f"| {bench.INITS[init]} | {bench.label(key)} | {mean_std([r.test_acc for r in arm_runs])} |"
            assert cells in text, cells
