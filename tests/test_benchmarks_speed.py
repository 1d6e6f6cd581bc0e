"""The speed benchmark compares like with like: both arms train the same model on the same data.

A speed ratio means nothing if the hand-written loop does less work than the Trainer arm (skips a
step, feeds other batches, trains fewer parameters). These tests run both arms for a few steps
and require the same starting weights, the same first-batch loss as a hand computation, the same
number of optimizer steps on every parameter, changed weights, and identical losses and final
weights in the two arms; then the script runs end to end (``--quick``, in-process). Speed targets are not
asserted here (they depend on the machine).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
STEPS, WARMUP = 2, 2  # 4 optimizer steps per arm: a few seconds in all
ROWS = (
    "Hand-written loop (steps/s)",
    "Trainer.fit (steps/s)",
    "Trainer / hand-written",
    "Data path (batches/s)",
    "Data path / model step",
)
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
    """The whole script (``--quick``), in this process: it writes its report, and both arms agree in it."""
    output = tmp_path / "speed.md"
    threads = torch.get_num_threads()
    try:
        speed.main(["--quick", "--root", str(fashion_root), "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    markdown = output.read_text()
    assert "| Figure | Measured" in markdown and "| Target | Met |" in markdown
    assert "torch " in markdown and "lightning " in markdown
    assert "--quick: a smoke test, not a measurement" in markdown
    values = {label: row_value(markdown, label) for label in ROWS}
    assert all(v > 0 for v in values.values()), values
    for label in AGREEMENT_ROWS:
        assert row_value(markdown, label) <= 1e-4
        assert re.search(rf"^\| {re.escape(label)} \|[^\n]*\| yes \|$", markdown, re.MULTILINE), label
