"""The speed benchmark compares like with like: both arms train the same networks on the same data.

A speed ratio means nothing if the hand-written loop does less work than the Trainer arm (skips a
step, feeds other batches or other noise, trains fewer parameters). These tests run both arms of
each module (``ImageClassifier``, ``DCGAN``, ``VAE``) for a few steps and require the same starting weights,
the same first-batch loss(es) as a hand computation, the same number of optimizer steps on every
parameter, changed weights, and identical losses and final weights in the two arms; then the
script runs end to end (``--quick``, in-process). Speed targets are not asserted here (they depend
on the machine).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lit_finetune.modules.base import NoiseStream
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
STEPS, WARMUP = 2, 2  # 4 optimizer steps per arm: a few seconds in all
CPU_RATIO = "Trainer / hand-written, from CPU time (`time.process_time`)"
ROWS = (
    CPU_RATIO,
    "Trainer / hand-written, from CPU time, range over repeats",
    "Hand-written loop (steps/s)",
    "Trainer.fit (steps/s)",
    "Trainer / hand-written, wall time",
    "Data path (batches/s)",
    "Data path / model step",
)
GAN_ROWS = ROWS[:5]
AGREEMENT_ROWS = ("Arms agree: largest per-step loss difference", "Arms agree: largest final weight difference")


def load_speed() -> ModuleType:
    """``benchmarks/speed.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("speed_benchmark", REPO / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed() -> ModuleType:
    return load_speed()


@pytest.fixture(scope="module")
def setup(speed, fashion_root):
    """Tiny benchmark arguments and the datamodule both arms share."""
    from lit_finetune.data import FashionMNISTDataModule

    args = speed.parse_args(
        ["--steps", str(STEPS), "--warmup", str(WARMUP), "--repeats", "1", "--data-batches", "1",
         "--batch-size", "16", "--root", str(fashion_root)]
    )  # fmt: skip
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=speed.CLASSES, batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    return args, dm


@pytest.fixture(scope="module")
def gan_setup(speed, fashion_root):
    """Tiny DCGAN arguments (widths 4, noise 8, batch 16) and the datamodule both arms share."""
    args = speed.parse_args(
        ["--models", "dcgan", "--gan-steps", str(STEPS), "--warmup", str(WARMUP), "--repeats", "1",
         "--gan-batch-size", "16", "--gan-width", "4", "--gan-latent-dim", "8", "--root", str(fashion_root)]
    )  # fmt: skip
    dm = speed.gan_datamodule(args)
    dm.setup("fit")
    return args, dm


@pytest.fixture(scope="module")
def gan_arms(speed, gan_setup):
    """One run of each DCGAN arm, as one repeat of the benchmark runs them."""
    args, dm = gan_setup
    threads = torch.get_num_threads()
    try:
        return speed.time_gan_trainer(dm, args), speed.time_gan_plain(dm, args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae_setup(speed, fashion_root):
    """Tiny VAE arguments (widths 4, latent 4, batch 16, KL warm-up over 2 steps) and the shared datamodule.

    With 4 steps per arm beta goes 0, 0.5, 1, 1: the arms agree only if both warm the KL up alike.
    """
    args = speed.parse_args(
        ["--models", "vae", "--vae-steps", str(STEPS), "--warmup", str(WARMUP), "--repeats", "1",
         "--vae-batch-size", "16", "--vae-width", "4", "--vae-latent-dim", "4", "--vae-kl-warmup", "2",
         "--root", str(fashion_root)]
    )  # fmt: skip
    dm = speed.vae_datamodule(args)
    dm.setup("fit")
    return args, dm


@pytest.fixture(scope="module")
def vae_arms(speed, vae_setup):
    """One run of each VAE arm, as one repeat of the benchmark runs them."""
    args, dm = vae_setup
    threads = torch.get_num_threads()
    try:
        return speed.time_vae_trainer(dm, args), speed.time_vae_plain(dm, args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def arms(speed, setup):
    """One run of each arm, as one repeat of the benchmark runs them."""
    args, dm = setup
    threads = torch.get_num_threads()
    try:
        return speed.time_trainer(dm, args), speed.time_plain(dm, args)
    finally:
        torch.set_num_threads(threads)


def row_value(markdown: str, label: str) -> float:
    """The measured number of the table row ``label`` (plain or scientific notation)."""
    match = re.search(rf"^\| {re.escape(label)} \| ([0-9][0-9,]*\.?[0-9]*(?:e[+-]?[0-9]+)?)", markdown, re.MULTILINE)
    assert match, f"row {label!r} missing from:\n{markdown}"
    return float(match.group(1).replace(",", ""))


def section(markdown: str, heading: str) -> str:
    """The text from ``heading`` to the next ``####`` heading."""
    assert heading in markdown, f"section {heading!r} missing from:\n{markdown}"
    return markdown.split(heading, 1)[1].split("\n#### ", 1)[0]


def test_arms_start_from_the_same_weights(speed):
    a, b = speed.fresh_model(0).state_dict(), speed.fresh_model(0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = speed.fresh_model(1).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a), "the seed does not reach the initial weights"


def test_first_loss_is_the_loss_of_the_first_batch_from_the_initial_weights(speed, setup, arms):
    args, dm = setup
    x, y = next(speed.endless(dm.train_dataloader()))
    expected = F.cross_entropy(speed.fresh_model(args.seed).train()(x), y).item()
    trainer_arm, plain_arm = arms
    assert trainer_arm.losses[0] == pytest.approx(expected, rel=1e-6)
    assert plain_arm.losses[0] == pytest.approx(expected, rel=1e-6)


def test_both_arms_take_the_same_optimizer_steps_on_every_parameter(speed, setup, arms):
    args, _ = setup
    initial = speed.fresh_model(args.seed).state_dict()
    for arm in arms:
        assert len(arm.losses) == WARMUP + STEPS
        assert len(arm.step_s) == STEPS
        params = dict(arm.model.named_parameters())
        steps = {name: int(arm.optimizer.state[p]["step"]) for name, p in params.items() if p in arm.optimizer.state}
        assert steps.keys() == params.keys(), f"parameters the optimizer never stepped: {params.keys() - steps.keys()}"
        assert set(steps.values()) == {WARMUP + STEPS}, steps
        unchanged = [name for name, p in params.items() if torch.equal(p.detach(), initial[name])]
        assert not unchanged, f"parameters that did not train: {unchanged}"


def test_both_arms_compute_the_same_losses_and_weights(speed, arms):
    trainer_arm, plain_arm = arms
    assert trainer_arm.losses == pytest.approx(plain_arm.losses, rel=1e-6)
    trained, plain = trainer_arm.model.state_dict(), plain_arm.model.state_dict()
    assert trained.keys() == plain.keys()
    for key in trained:
        torch.testing.assert_close(trained[key], plain[key], rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")
    loss_diff, weight_diff = speed.arm_difference(trainer_arm, plain_arm)
    assert loss_diff <= speed.AGREEMENT_TOLERANCE and weight_diff <= speed.AGREEMENT_TOLERANCE


def test_arm_difference_sees_a_different_computation(speed, setup, arms):
    """The agreement figure can fail: another initialisation (seed 1) differs in losses and weights."""
    args, dm = setup
    other_args = speed.parse_args([*map(str, ["--steps", STEPS, "--warmup", WARMUP, "--batch-size", args.batch_size]),
                                   "--root", args.root, "--seed", "1"])  # fmt: skip
    other = speed.time_plain(dm, other_args)
    loss_diff, weight_diff = speed.arm_difference(arms[1], other)
    assert loss_diff > speed.AGREEMENT_TOLERANCE and weight_diff > speed.AGREEMENT_TOLERANCE


def test_speed_benchmark_quick(speed, tmp_path: Path, fashion_root: Path) -> None:
    """The whole script (``--quick``), in this process: it writes its report with both modules, and both arms agree."""
    output = tmp_path / "speed.md"
    threads = torch.get_num_threads()
    try:
        speed.main(
            ["--quick", "--gan-width", "8", "--vae-width", "8", "--root", str(fashion_root), "--output", str(output)]
        )
    finally:
        torch.set_num_threads(threads)
    markdown = output.read_text()
    assert "torch " in markdown and "lightning " in markdown
    assert "--quick: a smoke test, not a measurement" in markdown
    classifier, gan = section(markdown, "#### `ImageClassifier`"), section(markdown, "#### `DCGAN`")
    vae = section(markdown, "#### `VAE`")
    for text, rows in ((classifier, ROWS), (gan, GAN_ROWS), (vae, GAN_ROWS)):
        assert "| Figure | Measured" in text and "| Target | Met |" in text
        values = {label: row_value(text, label) for label in rows}
        assert all(v > 0 for v in values.values()), values
        for label in AGREEMENT_ROWS:
            assert row_value(text, label) <= 1e-4
            assert re.search(rf"^\| {re.escape(label)} \|[^\n]*\| yes \|$", text, re.MULTILINE), label
    assert "Data path" not in gan and "Data path" not in vae  # the data path is timed once, with the classifier
    # the headline is the CPU-time ratio with its range, per module, and the first row of each table is that ratio
    first_line = markdown.splitlines()[0]
    assert first_line.startswith("**Trainer / hand-written steps/s from CPU time")
    for text in (classifier, gan, vae):
        ratio = row_value(text, CPU_RATIO)
        assert f"{ratio:.3f} ({ratio:.3f} to {ratio:.3f} over 1 repeat(s))" in first_line  # one repeat: range = value
        assert text.split("|---|---|---|---|\n", 1)[1].startswith(f"| {CPU_RATIO} |")
    overhead = section(markdown, "#### Overhead floor")  # the default run includes the one-layer ladder
    for label in ("Rungs agree with the bare loop: largest per-step loss difference",
                  "Rungs agree with the bare loop: largest final weight difference"):  # fmt: skip
        assert row_value(overhead, label) <= 1e-4
    assert "one-layer overhead floor" in first_line and "ms of them ours" in first_line


def test_models_option_runs_one_module(speed, tmp_path: Path, fashion_root: Path) -> None:
    output = tmp_path / "gan.md"
    threads = torch.get_num_threads()
    try:
        speed.main(["--quick", "--models", "dcgan", "--gan-width", "4", "--gan-latent-dim", "8",
                    "--root", str(fashion_root), "--output", str(output)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    markdown = output.read_text()
    assert "#### `DCGAN`" in markdown and "#### `ImageClassifier`" not in markdown
    assert row_value(section(markdown, "#### `DCGAN`"), CPU_RATIO) > 0


def test_every_run_written_to_a_file_is_kept_and_shown(speed, tmp_path: Path, fashion_root: Path) -> None:
    """A second run to the same output appends to the runs (JSON) and the report shows both; settings compared."""
    import provenance

    output = tmp_path / "gan.md"
    base = ["--quick", "--models", "dcgan", "--gan-width", "4", "--gan-latent-dim", "8", "--root", str(fashion_root),
            "--output", str(output)]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        speed.main(base)
        first = json.loads(output.with_suffix(".json").read_text())["data"]["runs"]
        speed.main([*base, "--seed", "1"])
    finally:
        torch.set_num_threads(threads)
    runs = json.loads(output.with_suffix(".json").read_text())["data"]["runs"]
    assert len(first) == 1 and len(runs) == 2 and runs[0] == first[0]
    markdown = output.read_text()
    table = section(markdown, "#### Every run")
    rows = [line for line in table.splitlines() if re.match(r"^\| [12] \|", line)]
    assert len(rows) == 2, table
    assert "| **no** | DCGAN |" in rows[0] and "| yes | DCGAN |" in rows[1]  # run 1 used another seed
    for row, run in zip(rows, runs):
        assert f"{run['ratios']['dcgan']['cpu_ratio']:.3f}" in row
    # the provenance block: every required field, the command line as given
    record = provenance.read(markdown)
    assert provenance.missing(markdown) == []
    assert record["command"].endswith("--seed 1") and "benchmarks/speed.py" in record["command"]
    assert record == runs[1]["provenance"]


def test_gan_arms_compute_no_d_gradients_in_the_g_step(speed, gan_setup, monkeypatch):
    """Same work: in both arms D's weight gradients are computed once per batch (the D step), never in the G step."""
    args, dm = gan_setup
    counts: dict[str, list[int]] = {}

    def counting(nets, name):
        counts[name] = calls = [0]
        for p in nets.discriminator.parameters() if name == "trainer" else nets[1].parameters():
            p.register_hook(lambda grad: calls.__setitem__(0, calls[0] + 1))
        return nets

    fresh_gan, fresh_gan_nets = speed.fresh_gan, speed.fresh_gan_nets
    monkeypatch.setattr(speed, "fresh_gan", lambda a: counting(fresh_gan(a), "trainer"))
    monkeypatch.setattr(speed, "fresh_gan_nets", lambda a: counting(fresh_gan_nets(a), "plain"))
    threads = torch.get_num_threads()
    try:
        speed.time_gan_trainer(dm, args), speed.time_gan_plain(dm, args)
    finally:
        torch.set_num_threads(threads)
    n_params = len(list(fresh_gan_nets(args)[1].parameters()))
    assert counts == {"trainer": [n_params * (WARMUP + STEPS)], "plain": [n_params * (WARMUP + STEPS)]}


# -- DCGAN ------------------------------------------------------------------------------------------
def test_gan_arms_start_from_the_same_weights(speed, gan_setup):
    """The hand-written arm's G and D are the module's, weight for weight (same seed, same build order)."""
    args, _ = gan_setup
    module = speed.fresh_gan(args)
    generator, discriminator = speed.fresh_gan_nets(args)
    for mine, theirs in ((generator, module.generator), (discriminator, module.discriminator)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 1})
    other = speed.fresh_gan_nets(other_args)
    assert not torch.equal(other[0].project.conv.weight, generator.project.conv.weight), "the seed does not reach G"


def test_gan_first_losses_are_those_of_the_first_batch_and_the_seeded_noise(speed, gan_setup, gan_arms):
    """Step 1's D loss, by hand: the first batch, noise from the module's noise stream seeded with ``--seed``, initial nets."""
    from lit_finetune.modules.dcgan import discriminator_loss

    args, dm = gan_setup
    real, _ = next(speed.endless(dm.train_dataloader()))
    generator, discriminator = speed.fresh_gan_nets(args)
    stream = NoiseStream(args.seed)
    stream.start_fit()
    with torch.no_grad():
        fake = generator(torch.randn(len(real), args.gan_latent_dim, generator=stream.next(0, "cpu")))
        expected = discriminator_loss(speed.GAN_LOSS, discriminator(real), discriminator(fake)).item()
    for arm in gan_arms:
        assert arm.losses[0] == pytest.approx(expected, rel=1e-6)


def test_gan_arms_take_one_d_and_one_g_step_per_batch_on_every_parameter(speed, gan_setup, gan_arms):
    args, _ = gan_setup
    initial = speed.fresh_gan(args)
    for arm in gan_arms:
        assert len(arm.losses) == 2 * (WARMUP + STEPS)  # D's and G's loss of every step
        assert len(arm.step_s) == STEPS
        assert len(arm.optimizers) == 2
        nets = {name: arm.model[name] for name in ("generator", "discriminator")}
        for net_name, net in nets.items():
            params = dict(net.named_parameters())
            (optimizer,) = [o for o in arm.optimizers if any(p in o.state for p in params.values())]
            steps = {name: int(optimizer.state[p]["step"]) for name, p in params.items() if p in optimizer.state}
            assert steps.keys() == params.keys(), f"{net_name}: never stepped: {params.keys() - steps.keys()}"
            assert set(steps.values()) == {WARMUP + STEPS}, steps
            before = getattr(initial, net_name).state_dict()
            unchanged = [name for name, p in params.items() if torch.equal(p.detach(), before[name])]
            assert not unchanged, f"{net_name}: parameters that did not train: {unchanged}"
        # the EMA moved off its start (G's initial weights) but lags behind G (decay 0.999)
        ema, generator = arm.model["generator_ema"].state_dict(), arm.model["generator"].state_dict()
        start = initial.generator.state_dict()
        weight = "project.conv.weight"
        assert not torch.equal(ema[weight], start[weight]) and not torch.equal(ema[weight], generator[weight])
        assert (ema[weight] - start[weight]).abs().max() < (generator[weight] - start[weight]).abs().max()


def test_gan_arms_compute_the_same_losses_and_weights(speed, gan_arms):
    """Bit for bit: the same ops in the same order on the CPU (both arms switch D's gradients off for the G step)."""
    trainer_arm, plain_arm = gan_arms
    assert all(math.isfinite(loss) for loss in trainer_arm.losses)
    assert trainer_arm.losses == plain_arm.losses
    trained, plain = trainer_arm.model.state_dict(), plain_arm.model.state_dict()
    assert trained.keys() == plain.keys()
    assert any(k.startswith("generator_ema.") for k in trained) and any(k.endswith("running_mean") for k in trained)
    for key in trained:
        assert torch.equal(trained[key], plain[key]), key
    assert speed.arm_difference(trainer_arm, plain_arm) == (0.0, 0.0)


def test_gan_arm_difference_sees_other_noise(speed, gan_setup, gan_arms, monkeypatch):
    """The agreement figure can fail: the same initial nets with noise from another seed differ in losses, weights."""
    args, dm = gan_setup
    same_nets = speed.fresh_gan_nets(args)
    monkeypatch.setattr(speed, "fresh_gan_nets", lambda _: copy.deepcopy(same_nets))
    other_noise = speed.time_gan_plain(dm, argparse.Namespace(**{**vars(args), "seed": args.seed + 1}))
    loss_diff, weight_diff = speed.arm_difference(gan_arms[1], other_noise)
    assert loss_diff > speed.AGREEMENT_TOLERANCE and weight_diff > speed.AGREEMENT_TOLERANCE


# -- VAE -------------------------------------------------------------------------------------------
def test_vae_arms_start_from_the_same_weights(speed, vae_setup):
    """The hand-written arm's encoder and decoder are the module's (same seed, same build order)."""
    args, _ = vae_setup
    module = speed.fresh_vae(args)
    encoder, decoder = speed.fresh_vae_nets(args)
    for mine, theirs in ((encoder, module.encoder), (decoder, module.decoder)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = speed.fresh_vae_nets(argparse.Namespace(**{**vars(args), "seed": args.seed + 1}))
    assert not torch.equal(other[0].head.weight, encoder.head.weight), "the seed does not reach the encoder"


def test_vae_beta_follows_the_modules_kl_warmup(speed, monkeypatch):
    """The hand-written loop's beta is ``VAE.kl_weight()`` at every step (0, a ramp, then 1)."""
    from lit_finetune import VAE

    for warmup in (0, 3):
        module = VAE(latent_dim=4, encoder_width=4, decoder_width=4, kl_warmup_steps=warmup)
        for step in range(6):
            monkeypatch.setattr(VAE, "global_step", property(lambda self, step=step: step))
            assert speed.vae_beta(step, warmup) == module.kl_weight(), (warmup, step)
    assert speed.vae_beta(0, 3) == 0.0 and speed.vae_beta(1, 3) == pytest.approx(1 / 3) and speed.vae_beta(5, 3) == 1.0


def test_vae_first_loss_is_that_of_the_first_batch_and_the_seeded_noise(speed, vae_setup, vae_arms):
    """Step 1's loss, by hand: the first batch, noise from the module's noise stream seeded with ``--seed``, initial nets,
    Bernoulli -log p(x|z) of the binarised batch plus beta (0 at step 1 of the warm-up) times the Gaussian KL."""
    args, dm = vae_setup
    x, _ = next(speed.endless(dm.train_dataloader()))
    encoder, decoder = speed.fresh_vae_nets(args)
    stream = NoiseStream(args.seed)
    stream.start_fit()
    with torch.no_grad():
        mu, logvar = encoder(x)
        z = mu + torch.randn(mu.shape, generator=stream.next(0, "cpu")) * torch.exp(logvar / 2)
        probs = torch.sigmoid(decoder(z))
        target = (x > 0).float()  # pixels above half intensity
        rec = -(target * torch.log(probs) + (1 - target) * torch.log1p(-probs)).sum(dim=(1, 2, 3))
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        expected = (rec + 0.0 * kl).mean().item()
    assert kl.mean() > 0  # the KL exists; beta is 0 only in this first warm-up step
    for arm in vae_arms:
        assert arm.losses[0] == pytest.approx(expected, rel=1e-5)


def test_vae_arms_take_one_step_per_batch_on_every_parameter(speed, vae_setup, vae_arms):
    args, _ = vae_setup
    initial = speed.fresh_vae(args)
    for arm in vae_arms:
        assert len(arm.losses) == WARMUP + STEPS
        assert len(arm.step_s) == STEPS
        params = dict(arm.model.named_parameters())
        steps = {name: int(arm.optimizer.state[p]["step"]) for name, p in params.items() if p in arm.optimizer.state}
        assert steps.keys() == params.keys(), f"parameters the optimizer never stepped: {params.keys() - steps.keys()}"
        assert set(steps.values()) == {WARMUP + STEPS}, steps
        assert all(g["lr"] == speed.VAE_LR for g in arm.optimizer.param_groups)
        before = {
            f"{net}.{k}": v for net in ("encoder", "decoder") for k, v in getattr(initial, net).state_dict().items()
        }
        unchanged = [name for name, p in params.items() if torch.equal(p.detach(), before[name])]
        assert not unchanged, f"parameters that did not train: {unchanged}"


def test_vae_arms_compute_the_same_losses_and_weights(speed, vae_arms):
    """Bit for bit: the same ops in the same order on the CPU (Adam is elementwise, so the module's named
    parameter groups, all at the same learning rate and no weight decay, update exactly as one group does)."""
    trainer_arm, plain_arm = vae_arms
    assert all(math.isfinite(loss) for loss in trainer_arm.losses)
    assert len(set(trainer_arm.losses)) == len(trainer_arm.losses)  # training moves the loss
    assert trainer_arm.losses == plain_arm.losses
    trained, plain = trainer_arm.model.state_dict(), plain_arm.model.state_dict()
    assert trained.keys() == plain.keys()
    assert any(k.startswith("decoder.") for k in trained) and any(k.endswith("running_mean") for k in trained)
    for key in trained:
        assert torch.equal(trained[key], plain[key]), key
    assert speed.arm_difference(trainer_arm, plain_arm) == (0.0, 0.0)


def test_vae_arm_difference_sees_other_noise(speed, vae_setup, vae_arms, monkeypatch):
    """The agreement figure can fail: the same initial nets with reparameterisation noise from another seed."""
    args, dm = vae_setup
    same_nets = speed.fresh_vae_nets(args)
    monkeypatch.setattr(speed, "fresh_vae_nets", lambda _: copy.deepcopy(same_nets))
    other_noise = speed.time_vae_plain(dm, argparse.Namespace(**{**vars(args), "seed": args.seed + 1}))
    loss_diff, weight_diff = speed.arm_difference(vae_arms[1], other_noise)
    assert loss_diff > speed.AGREEMENT_TOLERANCE and weight_diff > speed.AGREEMENT_TOLERANCE


# -- the overhead floor --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overhead_setup(speed, fashion_root):
    """Tiny ladder arguments (3 timed steps after 2) and the config's datamodule, smaller batches."""
    args = speed.parse_args(
        ["--models", "overhead", "--overhead-steps", "3", "--overhead-warmup", "2", "--repeats", "1",
         "--root", str(fashion_root)]
    )  # fmt: skip
    dm = speed.tiny_datamodule(args)
    dm.batch_size = 32
    dm.setup("fit")
    return args, dm


def test_overhead_rungs_compute_the_same_losses_and_weights(speed, overhead_setup):
    """Every rung trains the same layer on the same batches with the same optimizer and schedule: the ladder
    measures framework, not other work."""
    args, dm = overhead_setup
    threads = torch.get_num_threads()
    try:
        ladder = speed.Ladder()
        speed.run_ladder_repeat(ladder, dm, args, 0)
    finally:
        torch.set_num_threads(threads)
    assert ladder.agreement[0][0] <= 1e-6 and ladder.agreement[0][1] <= 1e-6, ladder.agreement
    losses = [ladder.rungs[rung][0].losses for rung in speed.RUNGS]
    assert all(len(l) == 5 for l in losses) and len({tuple(l) for l in losses}) == 1
    assert all(len(ladder.rungs[rung][0].step_s) == 3 for rung in speed.RUNGS)


def test_overhead_agreement_sees_another_schedule(speed, overhead_setup, monkeypatch):
    """The agreement figure can fail: a bare loop that skips the scheduler trains other weights."""
    args, dm = overhead_setup
    bare = speed.time_tiny_plain(dm, args)
    monkeypatch.setattr(torch.optim.lr_scheduler.OneCycleLR, "step", lambda self, *a: None)
    unscheduled = speed.time_tiny_plain(dm, args)
    assert speed.arm_difference(bare, unscheduled)[1] > speed.AGREEMENT_TOLERANCE


def test_overhead_config_rung_takes_the_shipped_configs_pieces(speed, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lit_finetune.callbacks import AppliedLRMonitor

    pieces = speed.config_trainer_pieces(tmp_path)
    kinds = {type(c) for c in pieces["callbacks"]}
    assert {ModelCheckpoint, AppliedLRMonitor} <= kinds
    assert all(c.dirpath == str(tmp_path / "checkpoints") for c in pieces["callbacks"] if isinstance(c, ModelCheckpoint))
    assert isinstance(pieces["logger"], CSVLogger) and pieces["log_every_n_steps"] == 50
    model = speed.fresh_tiny(speed.parse_args([]))
    assert [type(m) for m in model.modules()][1:3] == [torch.nn.Flatten, torch.nn.Dropout]
    assert model.hparams.label_smoothing == 0.1 and model.scheduler_interval == "step"


def test_overhead_profile_attributes_time_to_packages(speed, overhead_setup):
    args, dm = overhead_setup
    threads = torch.get_num_threads()
    try:
        text = speed.profile_overhead(dm, args)
    finally:
        torch.set_num_threads(threads)
    assert "| lit_finetune modules, callbacks, transfer (ours) |" in text  # only the config rung runs our module
    assert text.count("| Package | ms per step") == 2 and "Top 25 by internal time" in text


def test_package_of_names_ours_lightnings_and_torchs():
    speed = load_speed()
    assert speed.package_of("/x/lit_finetune/modules/classifier.py").endswith("(ours)")
    assert speed.package_of("/x/site-packages/lightning/pytorch/core/module.py") == "lightning"
    assert speed.package_of("/x/site-packages/torch/optim/adam.py") == "torch (Python)"
    assert speed.package_of("~").startswith("C functions")
