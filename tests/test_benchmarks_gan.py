"""benchmarks/gan_finetune.py at a tiny size: two arms, one seed, a few steps, a tiny extractor and source.

The arms run through the shipped configs and ``cli_main`` exactly as in the benchmark; only the sizes
are overridden (nets, images per class, batch, test batches).
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO
from conftest import save_lightning_checkpoint as _save

sys.path.insert(0, str(REPO / "benchmarks"))
import gan_finetune as bench  # noqa: E402
import stats  # noqa: E402

TINY = dict(latent_dim=16, generator_width=8, discriminator_width=8)
STEPS = 3


def tiny_args(fashion_root) -> list[str]:
    """The benchmark's arm arguments, shrunk: tiny nets, 4 images per class, 2 test batches."""
    return [
        "--model.init_args.latent_dim", "16", "--model.init_args.generator_width", "8",
        "--model.init_args.discriminator_width", "8", "--data.init_args.root", str(fashion_root),
        "--data.init_args.samples_per_class", "4", "--data.init_args.batch_size", "10",
        "--trainer.limit_test_batches", "2",
    ]  # fmt: skip




@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fashion_root):
    from lit_finetune import DCGAN, ImageClassifier

    tmp = tmp_path_factory.mktemp("gan_bench")
    torch.manual_seed(0)
    # an untrained extractor: FID mechanics need features, not good ones
    extractor = _save(ImageClassifier(num_classes=10), tmp / "extractor.ckpt")
    source = _save(DCGAN(**TINY, num_classes=5, conditional=True), tmp / "source.ckpt")
    extra = tiny_args(fashion_root)
    arms = [bench.ARMS[0], bench.ARMS[-1]]  # scratch (no DiffAugment), FreezeD + DiffAugment
    results = bench.run_arms(arms, [0], source, extractor, STEPS, tmp / "work", extra, log=lambda s: None)
    return arms, results, source, tmp


def test_arms_cover_the_protocol():
    assert [a.name for a in bench.ARMS] == [
        "scratch", "scratch + DiffAugment", "TransferGAN", "TransferGAN + DiffAugment",
        "FreezeD", "FreezeD + DiffAugment",
    ]  # fmt: skip
    assert [a.pretrained for a in bench.ARMS] == [False, False, True, True, True, True]
    assert len({a.key for a in bench.ARMS}) == len(bench.ARMS)
    assert len(bench.PROFILES["quick"]["seeds"]) >= 5 and len(bench.PROFILES["full"]["seeds"]) >= 5


def test_regulariser_arms_come_from_their_configs():
    assert [a.name for a in bench.REGULARISER_ARMS] == ["CDC + DiffAugment", "EWC + DiffAugment"]
    assert all((REPO / "configs/dcgan" / a.config).is_file() and a.pretrained for a in bench.REGULARISER_ARMS)
    assert [a.name for a in bench.FEWSHOT_ARMS] == [*bench.FEWSHOT_BASELINES, "CDC + DiffAugment", "EWC + DiffAugment"]
    assert bench.FEWSHOT_IMAGES == (10, 100)
    loss_only, patch_only = bench.CDC_ABLATION_ARMS  # CDC's parts alone: the config with one part switched off
    assert loss_only.overrides == ("--model.init_args.cdc_patch_block", "null") and loss_only.cdc
    assert patch_only.overrides == ("--model.init_args.cdc_weight", "0") and patch_only.cdc


def _fake_result(fid: float, intra: float, **kwargs) -> bench.ArmResult:
    return bench.ArmResult(
        fid=fid, kid_mean=0.01, kid_std=0.001, label_agreement=0.9, class_counts=[0] * 5 + [2] * 5,
        generator_steps=3, discriminator_steps=3, block0_equals_source=False, fit_seconds=1.0, test_seconds=1.0,
        intra_cluster_distance=intra, clusters_occupied=0.5, intra_cluster_distance_real=0.3,
        clusters_occupied_real=1.0, **kwargs,
    )  # fmt: skip


def test_fewshot_verdicts_pair_by_seed_with_holm_over_the_family():
    base = {"TransferGAN + DiffAugment": [30.0, 40.0, 35.0], "FreezeD + DiffAugment": [31.0, 41.0, 33.0]}
    regs = {"CDC + DiffAugment": [29.0, 38.0, 34.5], "EWC + DiffAugment": [30.0, 40.0, 35.0]}
    arms = {**base, **regs}
    results = {
        n: {arm: [_fake_result(f + n / 100, 0.1 * i) for i, f in enumerate(fids)] for arm, fids in arms.items()}
        for n in (10, 100)
    }
    tests = bench.fewshot_tests(results, "fid")
    assert [(n, arm, b) for n, arm, b, *_ in tests] == [
        (n, arm, b) for n in (10, 100) for arm in regs for b in base
    ]  # fmt: skip
    n, arm, b, test, p = tests[0]
    assert test.diffs == pytest.approx((-1.0, -2.0, -0.5))  # CDC minus TransferGAN, seed by seed
    raw = [t.p for *_, t, _ in tests]
    assert [p for *_, p in tests] == pytest.approx(bench.holm(raw))  # one family of 8
    text = bench.fewshot_markdown(results, [0, 1, 2], "Setup.")
    lines = text.splitlines()
    assert sum(line.startswith("| CDC + DiffAugment | ") for line in lines) == 2 * 2  # metrics and class counts, both N
    assert "| 10 | CDC + DiffAugment | TransferGAN + DiffAugment | -1.2 ± 0.8 | -1.0, -2.0, -0.5 |" in text
    assert "| 100 | EWC + DiffAugment | FreezeD + DiffAugment | +0.0 ± 1.7 | -1.0, -1.0, +2.0 |" in text
    assert text.count("| *real target test images* |") == 2 and "**10 target images** (2 per class)" in text


def test_main_table_pairs_fid_by_seed_with_holm_over_nine_fixed_comparisons():
    fids = {"scratch": [50.0, 60.0, 55.0], "scratch + DiffAugment": [48.0, 52.0, 56.0],
            "TransferGAN": [30.0, 33.0, 36.0], "TransferGAN + DiffAugment": [25.0, 31.0, 28.0],
            "FreezeD": [31.0, 35.0, 34.0], "FreezeD + DiffAugment": [27.0, 30.0, 33.0]}  # fmt: skip
    assert set(fids) == {a.name for a in bench.ARMS}
    results = {arm: [_fake_result(f, 0.1) for f in values] for arm, values in fids.items()}
    assert len(bench.MAIN_COMPARISONS) == 9 and len(set(bench.MAIN_COMPARISONS)) == 9
    assert all(a in fids and b in fids for a, b in bench.MAIN_COMPARISONS)
    text = bench.markdown(results, [0, 1, 2], None, "Setup.")
    assert "Holm-adjusted over all 9 rows of this table" in text
    assert "| comparison (FID) | mean diff | sd | worst seed | per seed | p (Holm) |" in text
    tests = [bench.paired_t_test(fids[a], fids[b]) for a, b in bench.MAIN_COMPARISONS]
    for (a, b), t, p in zip(bench.MAIN_COMPARISONS, tests, bench.holm([t.p for t in tests])):
        assert f"| {a} − {b} | {t.mean:+.1f} | {t.std:.1f} | {max(t.diffs):+.1f} | " in text
        assert stats.format_p(p) in text.split(f"| {a} − {b} |")[1].splitlines()[0]
    assert "| TransferGAN − scratch | -22.0 | 4.4 | -19.0 | -20.0, -27.0, -19.0 |" in text
    assert "| FreezeD + DiffAugment − FreezeD | -3.3 | 2.1 | -1.0 | -4.0, -5.0, -1.0 |" in text


def test_every_arm_has_metrics_and_equal_steps(tiny_run):
    arms, results, _, _ = tiny_run
    assert list(results) == [a.name for a in arms]
    for runs in results.values():
        (run,) = runs
        assert torch.isfinite(torch.tensor([run.fid, run.kid_mean, run.kid_std])).all() and run.fid > 0
        assert 0 <= run.label_agreement <= 1
        assert sum(run.class_counts) == 20  # 2 test batches of 10: one generated image per real one
        assert (run.generator_steps, run.discriminator_steps) == (STEPS, STEPS)
        assert run.samples.shape == (5 * bench.GRID_COLUMNS, 1, 28, 28)
    assert [results[a.name][0].diffaugment_on for a in arms] == [a.diffaugment for a in arms] == [False, True]


def test_freezed_keeps_the_source_block_and_scratch_does_not_load(tiny_run):
    _, results, _, _ = tiny_run
    assert results["FreezeD + DiffAugment"][0].block0_equals_source is True
    assert results["scratch"][0].block0_equals_source is False  # random init: scratch did not load the source


def test_markdown_has_every_cell_and_the_figure_is_written(tiny_run):
    arms, results, _, tmp = tiny_run
    floors = [bench.Floor("halves", 10, 10, 1.5, 0.002, 0.001)]
    text = bench.markdown(results, [0], [0, 0, 0, 0, 0, 1000, 1000, 1000, 1000, 1000], "Setup.", floors)
    rows = [line for line in text.splitlines() if line.startswith("|") and "---" not in line]
    header_cells = {len(line.split("|")) for line in rows if line.startswith("| arm")}
    assert len(header_cells) == 2  # the metrics table and the class-count table
    assert "| halves | 10 vs 10 | 1.50 | 2.00 ± 1.00 |" in text and "biased upward at finite sample size" in text
    run = results[arms[0].name][0]
    assert f"| {1e3 * run.kid_mean:.1f} ± 0.0 | {1e3 * run.kid_std:.1f} |" in text  # KID and its subset std
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(cells), f"empty cell in {line!r}"
    for arm in arms:
        assert sum(line.startswith(f"| {arm.name} |") for line in rows) == 2
    assert "equals the source's after training in 1/1 FreezeD runs and 0/1 other runs" in text
    bench.figure(results, tmp / "fig.png", "tiny")
    assert (tmp / "fig.png").stat().st_size > 10_000


def test_a_rerun_with_the_same_threads_and_seed_gives_the_same_fid(tiny_run, fashion_root):
    """The run of the fixture, again (DiffAugment on, so augmentation randomness is covered): identical metrics."""
    arms, results, source, tmp = tiny_run
    extra = tiny_args(fashion_root)
    arm = arms[-1]
    again = bench.run_arm(arm, 0, source, tmp / "extractor.ckpt", STEPS, tmp / "rerun", extra)
    first = results[arm.name][0]
    assert torch.get_num_threads() == 1  # OMP_NUM_THREADS=1, as the benchmark's default --threads
    assert (again.fid, again.kid_mean, again.kid_std, again.fid_raw_generator) == (
        first.fid, first.kid_mean, first.kid_std, first.fid_raw_generator
    )  # fmt: skip


def test_real_floor_pairs_disjoint_real_sets_at_the_given_size(tiny_run, fashion_root):
    _, _, _, tmp = tiny_run
    same_size, halves = bench.real_floor(tmp / "extractor.ckpt", num_test=40, root=str(fashion_root))
    assert (same_size.num_a, same_size.num_b) == (40, 40)
    assert halves.num_a + halves.num_b == 40 and abs(halves.num_a - halves.num_b) <= len(bench.TARGET_CLASSES)
    for floor in (same_size, halves):
        assert floor.fid > 0 and torch.isfinite(torch.tensor([floor.kid_mean, floor.kid_std])).all()
    again = bench.real_floor(tmp / "extractor.ckpt", num_test=40, root=str(fashion_root))
    assert [f.fid for f in again] == [same_size.fid, halves.fid]  # seeded draws
def test_smoke_profile_pieces_record_provenance_and_merge(tmp_path):
    """Two pieces of ``--profile smoke`` (seed 0, seed 1) write their provenance, both inputs hashed; ``--merge``
    joins them into one table over both seeds."""
    import json

    import provenance
    from conftest import assert_provenance
    from lit_finetune import DCGAN, ImageClassifier

    torch.manual_seed(0)
    extractor = _save(ImageClassifier(num_classes=10), tmp_path / "extractor.ckpt")
    source = _save(DCGAN(latent_dim=64, generator_width=32, discriminator_width=32, num_classes=5, conditional=True),
                   tmp_path / "source.ckpt")  # fmt: skip  (the shipped configs' sizes)
    pieces = []
    for seed in (0, 1):
        out = tmp_path / f"piece{seed}"
        argv = ["--profile", "smoke", "--extractor", extractor, "--source", source, "--seeds", str(seed),
                "--steps", "2", "--workdir", str(tmp_path / "work"), "--results", str(out)]  # fmt: skip
        bench.main(argv)
        inputs = {"feature extractor": extractor, "source DCGAN": source}
        record = assert_provenance(out / "gan_finetune.md", "gan_finetune.py", inputs)
        assert f"--seeds {seed} --steps 2" in record["command"] and record["config"] == {"profile": "smoke", "steps": 2}
        pieces.append(out / "gan_finetune.json")

    bench.main(["--merge", *map(str, pieces), "--results", str(tmp_path / "merged")])
    text = (tmp_path / "merged" / "gan_finetune.md").read_text()
    record = provenance.read(text)
    assert provenance.missing(text) == [] and [p["file"] for p in record["pieces"]] == list(map(str, pieces))
    assert "Merged from 2 pieces" in text and (tmp_path / "merged" / "gan_finetune.png").stat().st_size > 1000
    merged = json.loads((tmp_path / "merged" / "gan_finetune.json").read_text())["data"]
    one = [json.loads(p.read_text())["data"]["results"] for p in pieces]
    assert merged["seeds"] == [0, 1] and set(merged["results"]) == {a.name for a in bench.ARMS}
    for arm, runs in merged["results"].items():
        assert [r["fid"] for r in runs] == [one[0][arm][0]["fid"], one[1][arm][0]["fid"]]


def test_fewshot_pieces_run_every_arm_record_diversity_and_merge(tmp_path):
    """``--fewshot`` at N = 10, two pieces of one seed each (smoke profile: a few steps, 200 test images), then
    ``--merge``: the regularisers ran (their terms logged), diversity measured, one table over both seeds."""
    import json

    import provenance
    from conftest import assert_provenance
    from lit_finetune import DCGAN, ImageClassifier

    torch.manual_seed(0)
    extractor = _save(ImageClassifier(num_classes=10), tmp_path / "extractor.ckpt")
    source = _save(DCGAN(latent_dim=64, generator_width=32, discriminator_width=32, num_classes=5, conditional=True),
                   tmp_path / "source.ckpt")  # fmt: skip
    pieces = []
    for seed in (0, 1):
        out = tmp_path / f"piece{seed}"
        argv = ["--profile", "smoke", "--fewshot", "--images", "10", "--no-raw-generator", "--extractor", extractor,
                "--source", source, "--seeds", str(seed), "--steps", "2", "--workdir", str(tmp_path / "work"),
                "--results", str(out)]  # fmt: skip
        bench.main(argv)
        inputs = {"feature extractor": extractor, "source DCGAN": source}
        assert_provenance(out / "gan_fewshot.md", "gan_finetune.py", inputs)
        pieces.append(out / "gan_fewshot.json")
    scales = json.loads(pieces[0].read_text())["data"]["scales"]  # the regularisers' size where plain fine-tuning ends
    assert scales["ewc_sum_f_dtheta2"] > 0 and scales["cdc_loss_weight_1000"] >= 0 and scales["seed"] == 100
    data = json.loads(pieces[0].read_text())["data"]["results"]["10"]
    assert list(data) == [a.name for a in bench.FEWSHOT_ARMS]
    for arm, (run,) in data.items():
        assert run["images"] == 10 and run["fid_raw_generator"] is None
        assert 0 <= run["intra_cluster_distance"] <= 2 and 0 < run["clusters_occupied"] <= 1
        assert run["intra_cluster_distance_real"] > 0 and run["clusters_occupied_real"] > 0
        assert (run["regulariser"] is not None) == (arm in ("CDC + DiffAugment", "EWC + DiffAugment"))

    bench.main(["--fewshot", "--merge", *map(str, pieces), "--results", str(tmp_path / "merged")])
    text = (tmp_path / "merged" / "gan_fewshot.md").read_text()
    assert provenance.missing(text) == [] and "Merged from 2 pieces" in text
    assert (tmp_path / "merged" / "gan_fewshot.png").stat().st_size > 10_000
    merged = json.loads((tmp_path / "merged" / "gan_fewshot.json").read_text())["data"]
    assert merged["seeds"] == [0, 1]
    one = [json.loads(p.read_text())["data"]["results"]["10"] for p in pieces]
    for arm, runs in merged["results"]["10"].items():
        assert [r["fid"] for r in runs] == [one[0][arm][0]["fid"], one[1][arm][0]["fid"]]
    assert "| 10 | CDC + DiffAugment | TransferGAN + DiffAugment |" in text
