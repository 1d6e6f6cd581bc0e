"""VAE transfer on the embedded default: scratch vs full transfer vs frozen encoder vs frozen decoder, in nats.

1. Pretrain the source VAE on Fashion-MNIST classes 0-4 (``configs/vae/pretrain.yaml``), unless ``--source``.
2. For each N in {10, 100, 1000} target images per class (classes 5-9), each seed and each arm, fit
   with the same number of optimizer steps, validating the ELBO every ``val_every`` steps on
   ``min(N, 100)`` validation images per class (never more than the training set), and test both the
   final model and the checkpoint with the best validation ELBO (the config's ``best.ckpt``) on the target
   test split: ELBO, the importance-weighted bound on ``-log p(x)`` (``test/nll_iwae``), bits per dimension
   and the reconstruction error (``test/recon_mse``). Both are reported side by side: with few images the
   final model measures how fast an arm overfits, the best-on-validation one what transfer is worth.
3. Write ``benchmarks/results/vae_transfer.md`` (a table, mean ± std over seeds; then the paired differences of the
   best-on-validation bound, each transferred arm − scratch and frozen encoder − full transfer at every N, paired
   by seed, Holm's correction over all of them) and
   ``vae_transfer.png`` (the bound and the reconstruction error against N, one line per arm).

Arms (every one from the shipped configs, only the treatment changes):

* ``scratch``: ``transfer.yaml`` with ``pretrained: null`` (random encoder and decoder);
* ``full transfer``: ``transfer.yaml`` (both start from the source, both train);
* ``frozen encoder``: ``transfer_frozen_encoder.yaml`` (encoder kept at the source's weights);
* ``frozen decoder``: ``transfer_frozen_decoder.yaml`` (decoder kept at the source's weights).

Likelihood: Bernoulli on pixels binarised at half intensity (the ``VAE`` docstring); the figures are
nats per 28x28 image, bits/dim divide by ``784 ln 2``. For scale only: a one-layer VAE on binarised MNIST
scores about 85-87 nats (Burda et al. 2015); this is Fashion-MNIST binarised at a fixed threshold, so
the numbers are not directly comparable.

Recipe choices (fixed before looking at any result, never chosen on test):

* Same budget: every arm runs the same number of optimizer steps (``--trainer.max_steps``,
  ``--trainer.max_epochs -1``), batch 50, Adam(1e-3), latent 16, widths 32, no KL warm-up (the configs').
  Selection is on validation only (the highest validation ELBO); the test split chooses nothing.
* The frozen-decoder arm's plateau is built in: with the decoder and the prior fixed, its p(x) is the
  source model's, so its bound cannot fall below the source model's −log p(x) on target images (the md says so).
* Seed ``s`` seeds everything and picks the N images per class (``data.seed``); within a seed and N,
  all arms see the same images.

Profiles:

* ``quick`` (default): source 3 epochs, 300 steps per arm validated every 25, seeds 0-2, the bound with 16 importance
  samples on the first 2,000 target test images (40 batches of 50). Planned from measured times on a
  2-core AMD EPYC with 1 torch thread: ~30 ms per target step, ~80 ms per source batch of 128 (230 per
  epoch), testing 5,000 images with 64 samples ~45 s: about 1 + 36 x (10 + 5 s) = ~10-12 min. Measured:
  9.6 min (1.2 source, 7-22 s fit + 4-7 s test per arm run; N = 10 is slowest: one epoch, and a
  checkpoint, per step) before validation: now 12 validations per arm (at most 500 images, ELBO only) and a
  second test (the best checkpoint) add ~5-8 s per arm run, i.e. ~13-15 min, while ``last.ckpt`` is written
  at each validation instead of each epoch (at N = 10, 12 writes instead of 300).
* ``full``: source 20 epochs, 2,000 steps per arm validated every 100, seeds 0-4, the bound with 64 samples on the whole
  target test split (5,000 images): sized for a GPU, not run for the README table.
* ``smoke``: a few batches of everything, one seed: checks the pipeline, its numbers mean nothing.

    OMP_NUM_THREADS=1 python benchmarks/vae_transfer.py            # quick profile
    python benchmarks/vae_transfer.py --profile full              # on a GPU
    python benchmarks/vae_transfer.py --source S.ckpt             # reuse a source VAE
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gan_finetune import optimizer_steps, quiet_lightning
from transfer_vs_scratch import QUIET, machine, working_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import stats  # noqa: E402
CONFIGS = REPO / "configs" / "vae"
SIZES = (10, 100, 1000)
VAL_PER_CLASS = 100  #: validation images per class, at most; never more than the N training images per class
PROFILES = {
    "quick": {"source_epochs": 3, "steps": 300, "val_every": 25, "seeds": [0, 1, 2], "iw_samples": 16, "test_batches": 40},
    "full": {"source_epochs": 20, "steps": 2000, "val_every": 100, "seeds": [0, 1, 2, 3, 4], "iw_samples": 64, "test_batches": None},
    # the pipeline end to end in a minute; its numbers mean nothing
    "smoke": {
        "source_epochs": 1, "steps": 5, "val_every": 5, "seeds": [0], "iw_samples": 4, "test_batches": 2,
        "source_args": ["--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "1"],
    },
}  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One treatment: a shipped config and whether it starts from the source."""

    name: str
    config: str
    pretrained: bool


ARMS = [
    Arm("scratch", "transfer.yaml", False),
    Arm("full transfer", "transfer.yaml", True),
    Arm("frozen encoder", "transfer_frozen_encoder.yaml", True),
    Arm("frozen decoder", "transfer_frozen_decoder.yaml", True),
]


@dataclass
class Scores:
    """One model's test on the target test split (nats per image)."""

    elbo: float
    nll_iwae: float
    bits_per_dim: float
    recon_mse: float
    rec: float
    kl: float


@dataclass
class ArmResult:
    """What one (N, arm, seed) run measured: the final model and the best-on-validation one, both tested."""

    final: Scores
    best: Scores  #: the checkpoint with the highest validation ELBO
    best_step: int
    val_elbo_best: float
    val_elbo_final: float
    val_images: int
    steps: int
    encoder_equals_source: bool
    decoder_equals_source: bool
    fit_seconds: float
    test_seconds: float


def val_images(n: int) -> int:
    """Validation images for N training images per class: ``min(N, VAL_PER_CLASS)`` per class (5 classes)."""
    return 5 * min(n, VAL_PER_CLASS)


def _scores(metrics: dict[str, float]) -> Scores:
    return Scores(*(metrics[f"test/{k}"] for k in ("elbo", "nll_iwae", "bits_per_dim", "recon_mse", "rec", "kl")))


def pretrain_source(workdir: Path, epochs: int, extra: list[str] = ()) -> tuple[Path, float]:
    """Fit the shipped source config for ``epochs``; return ``last.ckpt`` and the final ``val/elbo``."""
    from lit_finetune.cli import cli_main

    with working_dir(workdir):
        cli = cli_main(
            ["fit", "--config", str(CONFIGS / "pretrain.yaml"), *QUIET, "--trainer.max_epochs", str(epochs), *extra]
        )
        elbo = float(cli.trainer.callback_metrics.get("val/elbo", float("nan")))
        return (Path.cwd() / "runs/vae/pretrain/checkpoints/last.ckpt").resolve(), elbo


def _equals(module: torch.nn.Module, source_state: dict[str, torch.Tensor], prefix: str) -> bool:
    return all(torch.equal(v.cpu(), source_state[f"{prefix}.{k}"]) for k, v in module.state_dict().items())


def run_arm(
    arm: Arm, n: int, seed: int, source: Path, steps: int, workdir: Path, iw_samples: int,
    test_batches: int | None, extra: list[str] = (), val_every: int = 25,
) -> ArmResult:  # fmt: skip
    """Fit ``arm`` for ``steps`` optimizer steps on ``n`` target images per class, validating every
    ``val_every`` steps; test the final model and the config's best-on-validation checkpoint (``best.ckpt``,
    highest ``val/elbo``)."""
    from lit_finetune.cli import cli_main

    args = [
        "--config", str(CONFIGS / arm.config), *QUIET,
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--data.init_args.samples_per_class", str(n), "--data.init_args.val_split", str(val_images(n)),
        "--model.init_args.pretrained", str(source) if arm.pretrained else "null",
        "--model.init_args.iw_samples", str(iw_samples),
        "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1",
        # validation every val_every optimizer steps, across epochs (at N = 10 an epoch is one step)
        "--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", str(val_every),
        *(["--trainer.limit_test_batches", str(test_batches)] if test_batches else []),
        *extra,
    ]  # fmt: skip
    with working_dir(workdir):
        start = time.perf_counter()
        cli = cli_main(["fit", *args])
        fit_seconds = time.perf_counter() - start
        model, trainer = cli.model, cli.trainer
        best = trainer.checkpoint_callback
        if best is None or best.monitor != "val/elbo" or best.mode != "max" or not best.best_model_path:
            raise RuntimeError(f"{arm.config}: its first ModelCheckpoint must keep the best val/elbo")
        source_state = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
        encoder_equals = _equals(model.encoder, source_state, "encoder")
        decoder_equals = _equals(model.decoder, source_state, "decoder")
        val_final = float(trainer.callback_metrics["val/elbo"])
        start = time.perf_counter()
        torch.manual_seed(seed)  # both tests draw the same sampling noise: their difference is the weights'
        final = _scores(trainer.test(model, datamodule=cli.datamodule, verbose=False)[0])
        torch.manual_seed(seed)
        best_metrics = trainer.test(model, datamodule=cli.datamodule, ckpt_path=best.best_model_path, verbose=False)
        test_seconds = time.perf_counter() - start
        best_step = int(torch.load(best.best_model_path, map_location="cpu", weights_only=True)["global_step"])
    return ArmResult(
        final=final, best=_scores(best_metrics[0]), best_step=best_step, val_elbo_best=float(best.best_model_score),
        val_elbo_final=val_final, val_images=val_images(n), steps=optimizer_steps(trainer.optimizers[0]),
        encoder_equals_source=encoder_equals, decoder_equals_source=decoder_equals,
        fit_seconds=fit_seconds, test_seconds=test_seconds,
    )  # fmt: skip


def run_all(
    arms: list[Arm], sizes: tuple[int, ...], seeds: list[int], source: Path, steps: int, workdir: Path,
    iw_samples: int, test_batches: int | None, extra: list[str] = (), log=print, save_to: Path | None = None,
    val_every: int = 25,
) -> dict[int, dict[str, list[ArmResult]]]:  # fmt: skip
    """Every N, arm and seed (seed-major, so a cut-off run has whole seeds): ``results[n][arm name]``."""
    results = {n: {arm.name: [] for arm in arms} for n in sizes}
    for seed in seeds:
        for n in sizes:
            for arm in arms:
                where = workdir / f"seed{seed}" / f"n{n}" / arm.name.replace(" ", "_")
                r = run_arm(arm, n, seed, source, steps, where, iw_samples, test_batches, extra, val_every)
                results[n][arm.name].append(r)
                if save_to is not None:  # after every run: a cut-off benchmark keeps what it measured
                    torch.save(
                        {k: {a: [asdict(x) for x in v] for a, v in d.items()} for k, d in results.items()}, save_to
                    )
                log(
                    f"      seed {seed} N {n:>4} {arm.name:<15} IWAE final {r.final.nll_iwae:7.2f} best-on-val "
                    f"{r.best.nll_iwae:7.2f} (step {r.best_step})  MSE {r.best.recon_mse:.4f}  steps {r.steps}  "
                    f"fit {r.fit_seconds:.0f}s test {r.test_seconds:.0f}s"
                )
    return results


# -- reporting -----------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], fmt: str) -> str:
    m, s = _mean_std(values)
    return f"{m:{fmt}} ± {s:{fmt}}"


FROZEN_DECODER_NOTE = (
    "The frozen-decoder arm's plateau is built in: with the decoder p(x|z) and the prior p(z) fixed, its model "
    "p(x) = ∫ p(x|z) p(z) dz is the source model's, whatever N; training the encoder only tightens the bound "
    "towards the source model's −log p(x) on target images, so its IWAE bound cannot fall below that."
)


#: the paired comparisons, fixed before any result: each arm against scratch, and the frozen encoder against full
#: transfer (does freezing the encoder cost anything?), at every N; ``(a, b)`` for ``a - b``
COMPARISONS = (
    ("full transfer", "scratch"), ("frozen encoder", "scratch"), ("frozen decoder", "scratch"),
    ("frozen encoder", "full transfer"),
)  # fmt: skip


def paired_lines(results: dict[int, dict[str, list[ArmResult]]]) -> list[str]:
    """The paired differences of the best-on-validation IWAE bound: :data:`COMPARISONS` at every N, one Holm
    family (a comparison whose arms did not run is left out)."""
    family = stats.comparison_family({(str(n),): arms for n, arms in results.items()}, COMPARISONS,
                                     lambda r: r.best.nll_iwae)  # fmt: skip
    if not family:
        return []
    intro = (
        "Paired differences of the IWAE bound (nats, best on validation; lower is better, so a negative difference "
        "favours the first arm), paired by seed (the same images): the family, fixed in advance, is each "
        "transferred arm − scratch and frozen encoder − full transfer, at every N."
    )
    return ["", *stats.paired_table(family, ["N / class", "comparison"], intro, lower_is_better=True)]


def markdown(results: dict[int, dict[str, list[ArmResult]]], setup: str) -> str:
    """The table (one row per N and arm; final and best-on-validation side by side), the paired differences
    with Holm's correction, the setup paragraph, the frozen-decoder note and the frozen-part check."""
    lines = [
        (
            "| N / class | arm | val images | IWAE bound on −log p(x) (nats) ↓, best on val | IWAE, final | "
            "ELBO (nats) ↑, best on val | ELBO, final | bits/dim ↓, best on val | recon MSE ↓, best on val | "
            "recon MSE, final | best step (of steps) | IWAE best on val, per seed |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, arms in results.items():
        for name, runs in arms.items():
            if not runs:
                continue
            steps = ", ".join(str(s) for s in sorted({r.steps for r in runs}))
            best_steps = ", ".join(str(r.best_step) for r in runs)
            lines.append(
                f"| {n} | {name} | {', '.join(str(v) for v in sorted({r.val_images for r in runs}))} "
                f"| {_cell([r.best.nll_iwae for r in runs], '.1f')} | {_cell([r.final.nll_iwae for r in runs], '.1f')} "
                f"| {_cell([r.best.elbo for r in runs], '.1f')} | {_cell([r.final.elbo for r in runs], '.1f')} "
                f"| {_cell([r.best.bits_per_dim for r in runs], '.3f')} "
                f"| {_cell([r.best.recon_mse for r in runs], '.4f')} | {_cell([r.final.recon_mse for r in runs], '.4f')} "
                f"| {best_steps} (of {steps}) | {', '.join(f'{r.best.nll_iwae:.1f}' for r in runs)} |"
            )
    flat = [(name, r) for arms in results.values() for name, runs in arms.items() for r in runs]
    enc = [r.encoder_equals_source for name, r in flat if name == "frozen encoder"]
    dec = [r.decoder_equals_source for name, r in flat if name == "frozen decoder"]
    scratch = [r.encoder_equals_source or r.decoder_equals_source for name, r in flat if name == "scratch"]
    check = (
        f" Check: the encoder equals the source's after training in {sum(enc)}/{len(enc)} frozen-encoder runs, the "
        f"decoder in {sum(dec)}/{len(dec)} frozen-decoder runs; a scratch part equals the source's in "
        f"{sum(scratch)}/{len(scratch)} scratch runs."
    )
    lines += paired_lines(results)
    return "\n".join(lines) + "\n\n" + setup + " " + FROZEN_DECODER_NOTE + check + "\n"


def figure(results: dict[int, dict[str, list[ArmResult]]], path: Path, title: str) -> None:
    """The IWAE bound and the reconstruction error against N (log axis), one line per arm, ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [n for n in results if any(results[n].values())]
    names = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    for ax, key, label in (
        (axes[0], "nll_iwae", "IWAE bound on −log p(x), nats/image (lower is better)"),
        (axes[1], "recon_mse", "reconstruction MSE in [−1, 1] (lower is better)"),
    ):
        for i, name in enumerate(names):
            for which, style in (("best", "-"), ("final", ":")):
                stats = [_mean_std([getattr(getattr(r, which), key) for r in results[n][name]]) for n in sizes]
                ax.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=4,
                            ls=style, color=f"C{i}", label=f"{name} ({'best on val' if which == 'best' else which})")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("target images per class (N)")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--source", type=Path, help="a source VAE checkpoint (skips step 1)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    parser.add_argument("--steps", type=int, help="override the profile's optimizer steps per arm")
    parser.add_argument("--shots", type=int, nargs="+", choices=SIZES, help="run only these N (images per class)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PIECE_JSON",
                        help="merge pieces' vae_transfer.json (same commit, profile, steps, source) into one table")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "vae_transfer")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    profile = dict(PROFILES[args.profile])
    seeds, steps = args.seeds or profile["seeds"], args.steps or profile["steps"]
    sizes = tuple(n for n in SIZES if n in (args.shots or SIZES))
    if args.merge:
        return merge_main(args.merge, args.results, run)
    iw, test_batches, val_every = profile["iw_samples"], profile["test_batches"], profile["val_every"]
    quiet_lightning()
    start = time.perf_counter()

    source, source_note = args.source, "given"
    if source is None:
        print(f"[1/3] source VAE on classes 0-4, {profile['source_epochs']} epochs", flush=True)
        source, elbo = pretrain_source(
            args.workdir / "source", profile["source_epochs"], profile.get("source_args", [])
        )
        source_note = f"{profile['source_epochs']} epoch(s) on the ~29,500 training images, source val ELBO {elbo:.1f}"
        print(f"      {source_note} -> {source}", flush=True)
    source_minutes = (time.perf_counter() - start) / 60

    print(f"[2/3] {len(ARMS)} arms x N {list(sizes)} x seeds {seeds}, {steps} steps each", flush=True)
    results = run_all(
        ARMS, sizes, seeds, source, steps, args.workdir, iw, test_batches,
        log=lambda s: print(s, flush=True), save_to=args.workdir / "results.pt", val_every=val_every,
    )  # fmt: skip

    minutes = (time.perf_counter() - start) / 60
    tested = f"the first {50 * test_batches:,} of the 5,000 target test images" if test_batches else "all 5,000"
    setup = (
        f"Profile `{args.profile}`. Fashion-MNIST: a convolutional VAE (latent 16, widths 32) pretrained on source "
        f"classes 0-4 ({source_note}); each arm then trains {steps} optimizer steps (batch 50, Adam 1e-3) on target "
        f"classes 5-9 with N images per class, seeds {seeds} (a seed also picks the images). Validation ELBO every "
        f"{val_every} steps on min(N, {VAL_PER_CLASS}) validation images per class taken from the target training "
        f"split (never more than the training set); both the final model and the checkpoint with the best "
        f"validation ELBO are tested on {tested}, side by side (nothing is chosen on test): ELBO and the importance-weighted bound with {iw} samples (Burda et al. 2015), mean ± "
        f"std over seeds. Likelihood: Bernoulli on pixels binarised at half intensity, nats per 28×28 image "
        f"(bits/dim = nats / (784 ln 2)); reconstruction MSE of the decoded posterior mean against the input in "
        f"[−1, 1]. For scale only: a one-layer VAE on binarised MNIST scores about 85-87 nats (Burda et al. 2015), "
        f"not directly comparable (another dataset, fixed-threshold binarisation, a small net and budget). "
        f"Measured on {machine()}, {torch.get_num_threads()} torch thread(s); {minutes:.1f} min in all "
        f"({source_minutes:.1f} min source)."
    )
    title = f"VAE transfer to Fashion-MNIST 5-9, {steps} steps per arm, seeds {seeds}"
    text = markdown(results, setup)
    print("\n[3/3] results\n" + text)
    config = {"profile": args.profile, "steps": steps}
    run.write(args.results / "vae_transfer.md", text, {"source VAE": source},
              data={"results": results, "seeds": seeds, "shots": sizes, "setup": setup, "title": title}, config=config)
    figure(results, args.results / "vae_transfer.png", title)
    print(f"wrote {args.results / 'vae_transfer.md'} and vae_transfer.png")


def merge_main(paths: list[Path], out: Path, run: provenance.Run) -> None:
    """``--merge``: one table from pieces (other seeds or N) of one profile; where each ran goes into the text."""
    pieces, summary = provenance.merge_pieces(paths, run=run)
    tree, seeds = provenance.merge_seed_lists([p["results"] for p in pieces], [p["seeds"] for p in pieces])
    def arm_result(r: dict) -> ArmResult:  # the JSON form back to the dataclasses (scores are nested)
        return ArmResult(**{k: Scores(**v) if k in ("final", "best") else v for k, v in r.items()})

    results = {int(n): {a: [arm_result(r) for r in runs] for a, runs in arms.items()} for n, arms in tree.items()}
    results = dict(sorted(results.items()))
    setup = provenance.merged_setup(summary, pieces)
    text = markdown(results, setup)
    run.write(out / "vae_transfer.md", text, data={"results": results, "seeds": seeds, "shots": list(results),
              "setup": setup, "title": pieces[0]["title"]}, config=summary["config"], pieces=summary["pieces"])  # fmt: skip
    figure(results, out / "vae_transfer.png", f"{pieces[0]['title']} (merged: seeds {seeds})")
    print(text + f"\nwrote {out / 'vae_transfer.md'}")


if __name__ == "__main__":
    main()
