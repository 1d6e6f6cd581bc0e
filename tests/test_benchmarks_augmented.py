"""benchmarks/gan_augmented.py: the protocol's mechanics (early stopping and selection on validation, the
equal-steps and equal-epochs budgets, the Holm family without duplicated arms, merging pieces) and a tiny
end-to-end run (GAN, generator selection, every arm for both inits, markdown, figure, provenance)."""

from __future__ import annotations

import json
import math
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
def gan_source(tmp_path_factory) -> str:
    """An unconditional 'source' DCGAN of the tiny profile's widths (random weights: the mechanics only)."""
    from lit_finetune import DCGAN

    torch.manual_seed(4321)
    net = DCGAN(latent_dim=16, generator_width=8, discriminator_width=8)
    return save_lightning_checkpoint(net, tmp_path_factory.mktemp("gsrc") / "dcgan.ckpt")


def tiny_argv(source, gan_source, fashion_root, results, *extra) -> list[str]:
    return ["--tiny", "--pretrained", source, "--gan-source", gan_source, "--fashion-root", str(fashion_root),
            "--results", str(results), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, source, gan_source, fashion_root):
    out = tmp_path_factory.mktemp("gan_augmented") / "results"
    results, selections = bench.main(tiny_argv(source, gan_source, fashion_root, out), keep_models=True)
    return results, selections, out


# -- the budgets ---------------------------------------------------------------------------------------
def test_profiles_cover_the_protocol():
    for name in ("quick", "full"):
        profile = bench.PROFILES[name]
        assert len(profile.seeds) >= 5 and {10, 50} <= set(profile.shots), name
        assert profile.val_per_class == 100 and profile.test_limit is None, name  # the full 5,000 test images
        assert profile.gan_steps % profile.snapshot_every == 0 and profile.patience >= 2, name
        keys = [a.key for a in profile.arms()]
        assert keys[0] == "real" and keys[-1] == "cas", name
        by_steps = [k for k in keys if k.endswith("@steps")]
        assert by_steps and by_steps == [k.replace("@epochs", "@steps") for k in keys if k.endswith("@epochs")]
    full = bench.PROFILES["full"]
    assert full.ratios == bench.RATIOS and full.filtered and set(full.inits) == set(bench.INITS)
    assert full.shots == (10, 50, 200)


@pytest.mark.parametrize("n", [10, 50, 200])  # 5N > B: below, one step holds every real image
@pytest.mark.parametrize("ratio", bench.RATIOS)
def test_equal_steps_and_equal_epochs_hold_what_they_say(n, ratio):
    profile = bench.PROFILES["full"]
    real = bench.schedule(bench.REAL, n, profile)
    by_steps = bench.schedule(bench.augmented_arm(ratio, False, "steps"), n, profile)
    by_epochs = bench.schedule(bench.augmented_arm(ratio, True, "epochs"), n, profile)
    b = by_steps.real_batch
    assert b + round(ratio * b) == profile.batch_size == real.real_batch  # same images per step, fewer real
    assert by_epochs.real_batch == b and b < profile.batch_size
    assert by_steps.steps_per_epoch == by_epochs.steps_per_epoch == math.ceil(5 * n / b)
    # equal steps: the real-only arm's validation steps and cap, so fewer passes over the real images
    assert (by_steps.val_every, by_steps.max_steps) == (real.val_every, real.max_steps)
    assert by_steps.max_epochs < real.max_epochs
    # equal real epochs: the real-only arm's passes at every check and at the cap (whole epochs, exactly)
    assert by_epochs.epochs_per_check == real.epochs_per_check and by_epochs.max_epochs == real.max_epochs
    assert by_epochs.max_steps // by_epochs.val_every == real.max_steps // real.val_every  # same number of checks
    assert by_epochs.max_steps > real.max_steps  # about (1 + r) times the steps
    assert by_epochs.max_steps == pytest.approx((1 + ratio) * real.max_steps, rel=0.25)
    for plan in (real, by_steps, by_epochs):
        assert plan.max_steps % plan.val_every == 0  # the cap is a validation check


def test_epochs_scale_with_n_and_bad_batches_fail_early():
    profile = bench.PROFILES["quick"]
    caps = [bench.real_only_epochs(n, profile)[0] for n in (10, 50, 200)]
    steps = [bench.schedule(bench.REAL, n, profile).max_steps for n in (10, 50, 200)]
    assert caps == sorted(caps, reverse=True) and steps == sorted(steps)  # fewer passes, more steps as N grows
    with pytest.raises(ValueError, match="does not split"):
        bench.real_batch(32, 0.5)
    assert bench.real_batch(30, 0.25) == 24 and bench.real_batch(30, 0.5) == 20 and bench.real_batch(30, 1) == 15


# -- early stopping and selection on validation --------------------------------------------------------
def test_early_stopping_tests_the_best_validation_checkpoint(source, fashion_root, monkeypatch):
    """A scripted validation accuracy: rises, peaks at the 2nd check, then never rises again (a tie included).
    The run stops after ``patience`` checks past the peak and the peak's weights are tested."""
    from lit_finetune import GANAugmentedClassifier

    script = [0.5, 0.75, 0.625, 0.75, 0.6875, 0.875]  # exact in float32; the run stops before the 0.875
    states: dict[int, dict[str, torch.Tensor]] = {}
    calls = {"n": -1}

    def scripted(self, batch, batch_idx):
        if batch_idx == 0:
            calls["n"] += 1
            states[self.trainer.global_step] = {k: v.clone() for k, v in self.state_dict().items()}
        value = script[calls["n"]]
        self.log("val/acc", value)
        self.log("val/loss", 1 - value)

    monkeypatch.setattr(GANAugmentedClassifier, "validation_step", scripted)
    profile = bench.dataclasses.replace(bench.PROFILES["tiny"], patience=2, epochs_at_10=8, checks=6)
    plan = bench.schedule(bench.REAL, 4, profile)
    assert plan.max_steps // plan.val_every >= len(script)  # the cap alone would run every check
    dm = bench.target_data(4, 0, profile, profile.batch_size, True, str(fashion_root))
    test = dm.val_set.__getitems__(range(20))
    run = bench.train_arm(bench.REAL, "finetuned", 4, dm, None, None, 0, profile, source, test, "cpu", True)
    assert [p[1] for p in run.history] == script[:4]  # stopped 2 checks after the peak (the tie is no rise)
    assert run.stopped_early and run.steps == 4 * plan.val_every < run.max_steps == plan.max_steps
    assert run.best_step == 2 * plan.val_every and run.val_acc == 0.75  # the first of the tied best checks
    for key, value in run.model.state_dict().items():  # the tested weights are the best check's
        assert torch.equal(value.cpu(), states[run.best_step][key]), key
    assert run.test_acc == evaluate(run.model, *test, "cpu", chunk=250)[0]


def test_chosen_row_is_a_selection_on_validation():
    def r(val_acc, val_loss, test_acc, arm):
        return bench.Run(test_acc, val_acc, val_loss, 10, 10, 10, 5, 15, 4, False, arm=arm)

    runs = {
        "real": r(0.99, 0.1, 0.99, "real"),  # never a candidate
        "r1@steps": r(0.80, 0.5, 0.70, "r1@steps"),
        "r1f@steps": r(0.80, 0.4, 0.60, "r1f@steps"),  # tie on accuracy: lower validation loss wins
        "r1@epochs": r(0.95, 0.1, 0.50, "r1@epochs"),  # another budget: not a candidate of @steps
    }
    chosen = bench.chosen_on_validation(runs, "steps")
    assert chosen.arm == "r1f@steps" and chosen.test_acc == 0.60
    assert bench.chosen_on_validation(runs, "epochs") is None  # one candidate: nothing to choose


# -- the verdict -----------------------------------------------------------------------------------------
def test_verdict_is_one_holm_family_over_both_budgets_without_the_chosen_rows():
    def runs(values, arm):
        return [bench.Run(v, v, 0.0, 1, 1, 1, 1, 15, 1, False, arm=arm) for v in values]

    real = [0.50, 0.52, 0.54]
    results = {10: {"finetuned": {
        "real": runs(real, "real"),
        "r1@steps": runs([0.40, 0.41, 0.42], "r1@steps"),  # -10, -11, -12: p = 0.0027
        "r1f@steps": runs([0.55, 0.47, 0.58], "r1f@steps"),  # +5, -5, +4: p = 0.72
        "r1@epochs": runs([0.60, 0.61, 0.65], "r1@epochs"),  # +10, +9, +11: t = 17.3, p = 0.0033
        "cas": runs([0.2, 0.2, 0.2], "cas"),  # not a real + G arm
        bench.CHOSEN["steps"]: runs([0.55, 0.47, 0.58], "r1f@steps"),  # a copy of r1f@steps: not a member
    }}}  # fmt: skip
    assert [key for _, _, key, _ in bench.family(results)] == ["r1@steps", "r1f@steps", "r1@epochs"]
    text = bench.verdict(results)
    assert "family of 3 cells, both budgets together" in text
    assert "at equal steps, real + G was significantly better than real only in 0 of 2 cells, significantly " \
           "worse in 1, and not distinguishable in 1" in text  # fmt: skip
    assert "at equal real epochs, real + G was significantly better than real only in 1 of 1 cells" in text
    table = {line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| fine-tuned")}
    assert len(table) == 3 and bench.label(bench.CHOSEN["steps"]) not in table
    assert "| -12.0 |" in table[bench.label("r1@steps")]  # the worst seed is shown
    assert table[bench.label("r1@epochs")].endswith("| 0.003 | 0.008 * |")  # Holm: max(3 x 0.0027, 2 x 0.0033)
    assert table[bench.label("r1@steps")].endswith("| 0.003 | 0.008 * |")
    assert not table[bench.label("r1f@steps")].endswith("* |")


# -- the tiny run end to end -----------------------------------------------------------------------------
def test_tiny_end_to_end_numbers_come_from_the_runs(tiny_run, fashion_root):
    results, selections, _ = tiny_run
    profile = bench.PROFILES["tiny"]
    (n,) = profile.shots
    assert set(results[n]) == set(profile.inits)
    dm = bench.target_data(n, 0, profile, profile.batch_size, False, str(fashion_root))
    dm.setup("test")
    test = dm.test_set.__getitems__(range(profile.test_limit))
    for init, runs in results[n].items():
        assert list(runs) == [a.key for a in profile.arms()] + list(bench.CHOSEN.values())
        for key, (run,) in runs.items():
            if key not in bench.ARM_BY_KEY:
                continue
            plan = bench.schedule(bench.ARM_BY_KEY[key], n, profile)
            assert (run.max_steps, run.val_every, run.real_batch) == (plan.max_steps, plan.val_every, plan.real_batch)
            assert [p[0] for p in run.history] == list(range(plan.val_every, run.steps + 1, plan.val_every))
            assert run.stopped_early or run.steps == plan.max_steps, (init, key)
            best = max(run.history, key=lambda p: p[1])  # max() keeps the first of ties, as ModelCheckpoint does
            assert (run.best_step, run.val_acc) == best[:2], (init, key)
            if run.stopped_early:  # stopped right after `patience` checks without a rise
                assert run.history.index(best) == len(run.history) - 1 - profile.patience, (init, key)
            assert (run.acceptance is not None) == bench.ARM_BY_KEY[key].filtered, (init, key)
            assert evaluate(run.model, *test, "cpu", chunk=250)[0] == run.test_acc, (init, key)
        for budget, key in bench.CHOSEN.items():  # a selection among the budget's real + G runs, on validation
            candidates = {k: r[0] for k, r in runs.items() if k.endswith(f"@{budget}") and k in bench.ARM_BY_KEY}
            chosen = runs[key][0]
            assert chosen.arm in candidates and chosen.test_acc == candidates[chosen.arm].test_acc
            assert (chosen.val_acc, -chosen.val_loss) == max((r.val_acc, -r.val_loss) for r in candidates.values())
    # fine-tuned and scratch start differently
    assert not torch.equal(
        results[n]["finetuned"]["real"][0].model.backbone.conv1.weight,
        results[n]["scratch"]["real"][0].model.backbone.conv1.weight,
    )
    (selection,) = selections[n]
    assert len(selection.snapshots) == 2 * profile.gan_steps // profile.snapshot_every  # raw and EMA each time
    assert selection.chosen.fid == min(s.fid for s in selection.snapshots)
    assert selection.generator_steps == profile.gan_steps


def test_tiny_run_records_provenance(tiny_run, source, gan_source):
    _, _, out = tiny_run
    inputs = {"source classifier": source, "source DCGAN": gan_source}
    record = assert_provenance(out / "gan_augmented.md", "gan_augmented.py", inputs)
    assert record["command"].startswith("python benchmarks/gan_augmented.py --tiny --pretrained")
    assert set(record["inputs"]) == set(inputs)
    assert record["config"]["profile"] == "tiny" and "seeds" not in record["config"]
    assert record["config"]["threads"] == 1 and record["torch_threads"] == 1


def test_tiny_markdown_and_figure_show_every_arm_and_run(tiny_run):
    results, _, out = tiny_run
    text = (out / "gan_augmented.md").read_text()
    (n,) = results
    for init, runs in results[n].items():
        for key, arm_runs in runs.items():
            cells = f"| {bench.INITS[init]} | {bench.label(key)} | {mean_std([r.test_acc for r in arm_runs])} |"
            assert cells in text, cells
            (run,) = arm_runs
            every = f"| {bench.INITS[init]} | {n} | {bench.label(key)} | {100 * run.test_acc:.1f} ({run.best_step}/{run.steps}) |"
            assert every in text, every
    needles = [f"τ = {bench.THRESHOLD}", "CAS gap", "2.03 %", "Ravuri & Vinyals", "val FID", "Holm-corrected",
               "**Equal steps** holds", "**Equal real epochs** holds", "stopped early", "5 + 5", "profile `tiny`",
               "EarlyStopping on val/acc", "min wall"]  # fmt: skip
    for needle in needles:
        assert needle in text, needle
    assert (out / "gan_augmented.png").stat().st_size > 10_000


def test_cas_sees_no_real_image_and_every_step_holds_b_images(source, fashion_root, monkeypatch):
    """With a generator of recognisable (constant) images: real only sees none of them; ratio 1 fills half of
    every step of B images with them (at both budgets); CAS sees only them."""
    from lit_finetune import GANAugmentedClassifier

    seen: list[tuple[str, torch.Tensor]] = []
    shared = GANAugmentedClassifier._shared_step

    def recorder(self, batch, metrics):
        if self.training and metrics is None:  # a training step (its metrics are updated once per epoch)
            arm = "cas" if self.hparams.synthetic_only else f"{self.hparams.synthetic_ratio:g}"
            seen.append((arm + ("f" if self.teacher is not None else ""), is_constant(batch[0])))
        return shared(self, batch, metrics)

    monkeypatch.setattr(GANAugmentedClassifier, "_shared_step", recorder)
    profile = bench.PROFILES["tiny"]
    dm = bench.target_data(4, 0, profile, profile.batch_size, True, str(fashion_root))
    test = dm.val_set.__getitems__(range(20))
    arms = [bench.ARM_BY_KEY[k] for k in ("real", "r1@steps", "r1f@epochs", "cas")]
    cell = bench.run_cell(4, 0, dm, ConstantGenerator(), profile, source, test, "cpu", arms, log=lambda _: None)
    assert set(cell) == set(profile.inits)
    by_arm: dict[str, list[torch.Tensor]] = {}
    for arm, marks in seen:
        by_arm.setdefault(arm, []).append(marks)
    B = profile.batch_size  # N=4: 20 real images; real only 10 per step, ratio 1: 5 real + 5 synthetic
    assert all(len(m) == B and not m.any() for m in by_arm["0"])
    assert all(len(m) == B and int(m.sum()) == B // 2 for m in by_arm["1"])  # 5 real + 5 synthetic
    assert all(len(m) == B and m.all() for m in by_arm["cas"])  # CAS: no real training image at all
    assert all(int((~m).sum()) == B // 2 and int(m.sum()) <= B // 2 for m in by_arm["1f"])  # filtered: at most r b
    steps = {key: sum(r.steps for r in (runs[key] for runs in cell.values())) for key in ("real", "r1@steps", "cas")}
    assert len(by_arm["0"]) == steps["real"] and len(by_arm["1"]) == steps["r1@steps"]
    for runs in cell.values():
        assert 0 <= runs["r1f@epochs"].acceptance <= 1 and 0 <= runs["r1f@epochs"].filled <= 1


def test_a_second_piece_merges_with_the_first(tiny_run, source, gan_source, fashion_root):
    """``--seeds 1`` beside the tiny run (seed 0); ``--merge`` gives both seeds per cell, in seed order."""
    import provenance

    results, _, out = tiny_run
    tmp = out.parent
    bench.main(tiny_argv(source, gan_source, fashion_root, tmp / "piece1", "--seeds", "1"))
    pieces = [out / "gan_augmented.json", tmp / "piece1" / "gan_augmented.json"]
    merged, selections = bench.main(["--merge", *map(str, pieces), "--results", str(tmp / "merged")])
    text = (tmp / "merged" / "gan_augmented.md").read_text()
    record = provenance.read(text)
    assert provenance.missing(text) == [] and [p["file"] for p in record["pieces"]] == list(map(str, pieces))
    assert "Merged from 2 pieces" in text and "per seed [0, 1]" in text
    assert record["inputs"] == record["pieces"][0]["inputs"] == record["pieces"][1]["inputs"]  # sha256 at the top
    second = json.loads(pieces[1].read_text())["data"]["results"]
    (n,) = results
    assert [len(s) for s in selections.values()] == [2]
    for init, runs in merged[n].items():
        for key, arm_runs in runs.items():
            assert [r.test_acc for r in arm_runs] == [results[n][init][key][0].test_acc,
                                                       second[str(n)][init][key][0]["test_acc"]]  # fmt: skip
            assert arm_runs[1].history == [tuple(p) for p in second[str(n)][init][key][0]["history"]]
            cells = f"| {bench.INITS[init]} | {bench.label(key)} | {mean_std([r.test_acc for r in arm_runs])} |"
            assert cells in text, cells
    assert "family of 8 cells" in text  # 2 inits x (r1, r1f) x 2 budgets; the chosen rows are not counted
    with pytest.raises(provenance.PieceMismatch, match="more than one piece"):
        bench.main(["--merge", str(pieces[0]), str(pieces[0]), "--results", str(tmp / "twice")])
