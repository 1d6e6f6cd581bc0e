"""benchmarks/vae_transfer.py at a tiny size: one seed, N = 10, two arms, a few steps, a tiny source.

The arms run through the shipped configs and ``cli_main`` exactly as in the benchmark; only the sizes
are overridden (net widths, batch, importance samples, test batches).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import REPO
from conftest import save_lightning_checkpoint as _save

sys.path.insert(0, str(REPO / "benchmarks"))
import vae_transfer as bench

STEPS = 4
VAL_EVERY = 2  # validations after steps 2 and 4




@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fashion_root):
    from lit_finetune import VAE

    tmp = tmp_path_factory.mktemp("vae_bench")
    torch.manual_seed(0)
    source = _save(VAE(latent_dim=16, encoder_width=8, decoder_width=8), tmp / "source.ckpt")
    extra = [
        "--model.init_args.encoder_width", "8", "--model.init_args.decoder_width", "8",
        "--data.init_args.root", str(fashion_root), "--data.init_args.batch_size", "10",
    ]  # fmt: skip
    arms = [bench.ARMS[0], bench.ARMS[2]]  # scratch, frozen encoder
    results = bench.run_all(
        arms, (10,), [0], source, STEPS, tmp / "work", 4, 2, extra, log=lambda s: None, val_every=VAL_EVERY
    )
    return arms, results, tmp


def test_arms_and_profiles_cover_the_protocol():
    assert [a.name for a in bench.ARMS] == ["scratch", "full transfer", "frozen encoder", "frozen decoder"]
    assert [a.pretrained for a in bench.ARMS] == [False, True, True, True]
    assert bench.SIZES == (10, 100, 1000)
    assert len(bench.PROFILES["quick"]["seeds"]) >= 3 and len(bench.PROFILES["full"]["seeds"]) >= 3


def test_every_cell_is_finite_with_equal_steps(tiny_run):
    arms, results, _ = tiny_run
    assert list(results) == [10] and list(results[10]) == [a.name for a in arms]
    for runs in results[10].values():
        (run,) = runs
        for scores in (run.final, run.best):
            values = [scores.elbo, scores.nll_iwae, scores.bits_per_dim, scores.recon_mse, scores.rec, scores.kl]
            assert all(math.isfinite(v) for v in values)
            assert scores.nll_iwae > 0 and scores.recon_mse > 0
            assert scores.elbo == pytest.approx(-(scores.rec + scores.kl), rel=1e-4)
            assert scores.bits_per_dim == pytest.approx(scores.nll_iwae / (784 * math.log(2)), rel=1e-4)
        assert run.steps == STEPS


def test_best_checkpoint_is_chosen_on_validation_no_larger_than_training(tiny_run):
    _, results, _ = tiny_run
    for runs in results[10].values():
        (run,) = runs
        assert run.val_images == 50 == bench.val_images(10)  # = the 5 x 10 training images
        assert bench.val_images(1000) == 500
        assert run.best_step in (VAL_EVERY, STEPS)  # a validated step
        assert run.val_elbo_best >= run.val_elbo_final  # the best of the validations, the final one included
        if run.best_step == STEPS:  # the best is the final model: the same test
            assert run.best == run.final
        else:
            assert run.best != run.final


def test_frozen_encoder_keeps_the_source_and_scratch_does_not_load(tiny_run):
    _, results, _ = tiny_run
    frozen, scratch = results[10]["frozen encoder"][0], results[10]["scratch"][0]
    assert frozen.encoder_equals_source is True
    assert frozen.decoder_equals_source is False  # the decoder trained
    assert scratch.encoder_equals_source is False and scratch.decoder_equals_source is False


def test_markdown_and_figure(tiny_run):
    _, results, tmp = tiny_run
    text = bench.markdown(results, "setup.")
    assert "| 10 | scratch | 50 |" in text and "| 10 | frozen encoder | 50 |" in text
    assert "best on val" in text and "p(x) is the source model's" not in text  # (the note says it in words below)
    assert "frozen-decoder arm's plateau is built in" in text
    assert "1/1 frozen-encoder runs" in text and "0/1 scratch runs" in text
    bench.figure(results, tmp / "fig.png", "tiny")
    assert (tmp / "fig.png").stat().st_size > 1000


def _fake(nll: float) -> bench.ArmResult:
    scores = bench.Scores(elbo=-nll, nll_iwae=nll, bits_per_dim=nll / 543.4, recon_mse=0.1, rec=nll, kl=1.0)
    return bench.ArmResult(
        final=scores, best=scores, best_step=2, val_elbo_best=-nll, val_elbo_final=-nll, val_images=50, steps=4,
        encoder_equals_source=False, decoder_equals_source=False, fit_seconds=1.0, test_seconds=1.0,
    )  # fmt: skip


def test_paired_differences_pair_by_seed_with_holm_over_every_n_and_comparison():
    """Each transferred arm − scratch and frozen encoder − full transfer at every N: one Holm family of 4 per N."""
    nll = {"scratch": [210.0, 215.0, 218.0], "full transfer": [190.0, 191.0, 195.0],
           "frozen encoder": [189.0, 193.0, 194.0], "frozen decoder": [230.0, 232.0, 231.0]}  # fmt: skip
    results = {n: {arm: [_fake(v - n / 100) for v in values] for arm, values in nll.items()} for n in (10, 100)}
    text = bench.markdown(results, "setup.")
    assert "Holm-adjusted over all 8 rows of this table" in text
    assert "| N / class | comparison | mean diff | sd | worst seed | per seed | p (Holm) |" in text
    family = [(n, a, b) for n in (10, 100) for a, b in bench.COMPARISONS]
    tests = [bench.stats.paired_t_test(nll[a], nll[b]) for _, a, b in family]
    adjusted = bench.stats.holm([t.p for t in tests])
    for (n, a, b), t, p in zip(family, tests, adjusted):
        worst = max(t.diffs)  # lower is better: the seed least favourable to the first arm is the highest
        assert f"| {n} | {a} − {b} | {t.mean:+.1f} | {t.std:.1f} | {worst:+.1f} | " in text
        assert text.count(f"| {n} | {a} − {b} |") == 1 and bench.stats.format_p(p) in text
    assert "| 10 | full transfer − scratch | -22.3 | 2.1 | -20.0 | -20.0, -24.0, -23.0 |" in text
    # a one-seed run (the tiny run): the row is shown, without a test
    one = {10: {arm: runs[:1] for arm, runs in results[10].items()}}
    assert "| 10 | full transfer − scratch | -20.0 | 0.0 | -20.0 | -20.0 | n/a (< 2 seeds) |" in bench.markdown(one, "s.")


def test_smoke_profile_pieces_record_provenance_and_merge(tmp_path):
    """Two pieces of ``--profile smoke --shots 10`` (seed 0, seed 1) write their provenance; ``--merge`` joins them."""
    import json

    import provenance
    from conftest import assert_provenance
    from lit_finetune import VAE

    torch.manual_seed(0)
    source = _save(VAE(latent_dim=16), tmp_path / "source.ckpt")  # the shipped configs' sizes
    pieces = []
    for seed in (0, 1):
        out = tmp_path / f"piece{seed}"
        argv = ["--profile", "smoke", "--source", source, "--shots", "10", "--steps", "5", "--seeds", str(seed),
                "--workdir", str(tmp_path / "work"), "--results", str(out)]  # fmt: skip
        bench.main(argv)
        record = assert_provenance(out / "vae_transfer.md", "vae_transfer.py", {"source VAE": source})
        assert record["command"].endswith(f"--seeds {seed} --workdir {tmp_path / 'work'} --results {out}")
        assert record["config"] == {"profile": "smoke", "steps": 5}
        data = json.loads((out / "vae_transfer.json").read_text())["data"]
        assert data["shots"] == [10] and list(data["results"]) == ["10"] and data["seeds"] == [seed]
        pieces.append(out / "vae_transfer.json")

    bench.main(["--merge", *map(str, pieces), "--results", str(tmp_path / "merged")])
    text = (tmp_path / "merged" / "vae_transfer.md").read_text()
    record = provenance.read(text)
    assert provenance.missing(text) == [] and [p["file"] for p in record["pieces"]] == list(map(str, pieces))
    assert "Merged from 2 pieces" in text
    merged = json.loads((tmp_path / "merged" / "vae_transfer.json").read_text())["data"]
    one = [json.loads(p.read_text())["data"]["results"]["10"] for p in pieces]
    assert merged["seeds"] == [0, 1]
    for arm, runs in merged["results"]["10"].items():
        assert runs == [one[0][arm][0], one[1][arm][0]]
        assert f"| 10 | {arm} |" in text and ", ".join(f"{r['best']['nll_iwae']:.1f}" for r in runs) + " |" in text
