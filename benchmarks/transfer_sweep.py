"""The full classifier transfer benchmark: eleven arms x N labelled images per class x two targets.

One source model is pretrained on Fashion-MNIST classes 0-4 (``configs/classifier/pretrain_source.yaml``
through the CLI, as the main job does). From it, each arm trains a ResNet on

* **Fashion-MNIST classes 5-9** (in-domain: same camera, same kind of images, new classes), and
* **scikit-learn digits** (cross-domain: 8x8 handwritten digits upsampled to 28x28, 10 classes),

with N in {1, 5, 20, 100} labelled training images per class, for every seed, and reports the
accuracy on the full target test split (5,000 Fashion-MNIST images; the 539 held-out digits).

Arms (everything not listed is shared; see ``ARMS``):

==================  ============================================================================
scratch             random init, all layers train
linear probe        source backbone frozen for the whole run (``LayerFreezing(["backbone"], None)``);
                    only the new head trains
full fine-tune      source init, all layers train at one LR
freeze->unfreeze    head alone for the first ~10% of the steps (rounded up to whole epochs:
                    ``LayerFreezing(["backbone"], unfreeze_at_epoch=k)``), then all layers
L2-SP               full fine-tune plus ``l2sp_alpha * 1/2 ||theta - theta_0||^2`` toward the
                    source backbone (Li et al., 2018); the anchored backbone gets no weight decay
discriminative LR   full fine-tune with the backbone at 0.1x the head's LR (``backbone_lr_ratio``)
BN-only             only the norm layers' affine parameters and the head train (``peft="bn_only"``)
BitFit              only biases and the head: on a ResNet, the norm layers' shifts (``peft="bitfit"``)
adapters            zero-initialised 1x1 convolutions beside every 3x3 convolution, plus the norm
                    layers' affine parameters and the head (``peft="adapters"``, Rebuffi et al. 2018)
LoRA r=4            a rank-4 update of every convolution, plus the head (``peft="lora"``)
meta-learned        full fine-tune from another source: the same network meta-pretrained with Reptile on
source              5-way 5-shot episodes of the source classes (``configs/classifier/meta_pretrain_source.yaml``,
                    ``MetaPretrainer``); its meta-training cost is reported beside the supervised source's
==================  ============================================================================

Each arm is compared with full fine-tuning, paired by seed, in every cell: the mean and worst per-seed
difference and a two-sided paired t-test, Holm-corrected over all those comparisons (one family).
The parameter-efficient arms also report how many parameters train and the size of their delta
checkpoint (``ImageClassifier.save_delta``: what trained plus the buffers), beside the full checkpoint's.

Held fixed across arms (the protocol's "same budget"): model (``resnet_small``), optimizer
(AdamW, LR 3e-3, weight decay 1e-4 on
weights but not on norms and biases, no scheduler), ``LRWarmup(10)`` (each parameter group warms up
from its first trained step), label smoothing 0.1, batch size 50, augmentation (random 2-pixel
shifts, plus flips for Fashion-MNIST), the optimizer steps of the cell (checked after each run),
the training images, their order and augmentation, and the head's random initialisation (each
arm starts from ``seed_everything(seed)``).

How the hyper-parameters were chosen (never on test): the shared recipe is the one of
``finetune_target.yaml`` / ``scratch_target.yaml``, itself chosen on validation accuracy by
``benchmarks/finetune_recipe_val.py``. The arm-specific values were fixed before any run, from
common practice, and not tuned here: 10% of the steps head-only (fastai's ``fine_tune`` trains the
head alone for a short first phase), ``l2sp_alpha=0.01`` (the usual example value), a 10x
lower backbone LR (the usual "new head at 10x the LR" rule).

Checkpoint selection, on validation only: each run is evaluated at ``evals`` evenly spaced steps;
the state with the best validation accuracy (ties: lower validation loss) is tested. The
validation set is no larger than the training set: N images per class (fewer where the class
runs out, i.e. digits at N=100: 122 training images in the smallest class leave 22 for
validation). Few-shot means few labels in total. For the N in ``generous_shots`` the same
training runs are also selected on 100 validation images per class (the main configs' setting),
of which the small validation set is a subset: same training images, same runs, so the
difference isolates what the larger validation set buys.

    OMP_NUM_THREADS=1 python benchmarks/transfer_sweep.py                     # quick: ~20 min of 1 CPU core
    python benchmarks/transfer_sweep.py --profile full                        # GPU: more steps and seeds
    python benchmarks/transfer_sweep.py --pretrained path/to/source.ckpt      # skip the pretraining
    python benchmarks/transfer_sweep.py --meta-pretrained path/to/meta.ckpt   # skip the meta-pretraining
    python benchmarks/transfer_sweep.py --arms bn_only lora --seeds 0 --shots 20  # a piece: some arms + full FT
"""

from __future__ import annotations

import argparse
import sys
import dataclasses
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from transfer_vs_scratch import CONFIGS, QUIET, machine, run_cli, working_dir  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
GENEROUS_VAL = 100  #: validation images per class of the main configs (finetune_target.yaml: 500 for 5 classes)
BATCH_SIZE = 50
LR, WEIGHT_DECAY, LABEL_SMOOTHING, WARMUP_STEPS = 3e-3, 1e-4, 0.1, 10
HEAD_ONLY_FRACTION = 0.1  #: freeze->unfreeze: share of the steps the head trains alone (rounded up to epochs)


@dataclass(frozen=True)
class Arm:
    """One treatment: how the model starts and which of the library's transfer pieces it uses."""

    label: str
    pretrained: bool = True
    freeze: str = "none"  # "none" | "probe" (backbone frozen throughout) | "unfreeze" (head-only first)
    l2sp_alpha: float = 0.0
    backbone_lr_ratio: float = 1.0
    peft: str | None = None  # parameter-efficient: bn_only | bitfit | adapters | lora (lit_finetune.transfer.peft)
    source: str = "supervised"  # which pretrained source: "supervised" (pretrain_source.yaml) | "meta" (Reptile)


ARMS: dict[str, Arm] = {
    "scratch": Arm("scratch", pretrained=False),
    "probe": Arm("linear probe", freeze="probe"),
    "finetune": Arm("full fine-tune"),
    "unfreeze": Arm("freeze→unfreeze", freeze="unfreeze"),
    "l2sp": Arm("L2-SP", l2sp_alpha=0.01),
    "dlr": Arm("discriminative LR", backbone_lr_ratio=0.1),
    "bn_only": Arm("BN-only", peft="bn_only"),
    "bitfit": Arm("BitFit", peft="bitfit"),
    "adapters": Arm("adapters", peft="adapters"),
    "lora": Arm("LoRA r=4", peft="lora"),
    "meta": Arm("meta-learned source", source="meta"),
}
PEFT_RANK = 4  #: LoRA's rank in the "lora" arm (alpha = rank: scale 1)


@dataclass(frozen=True)
class Profile:
    """How much to run: seeds, shots, optimizer steps per shot, validation points per run."""

    seeds: tuple[int, ...]
    shots: tuple[int, ...]
    steps: dict[int, int]  # N -> optimizer steps of every arm in that cell
    evals: int  # validation points per run (evenly spaced steps, the last one included)
    generous_shots: tuple[int, ...]  # N at which selection on 100 val images/class is also measured
    pretrain_epochs: int
    accelerator: str = "cpu"
    threads: int | None = 1  # torch threads (None: torch's default)
    meta_pretrain_epochs: int = 4  # epochs of meta_pretrain_source.yaml (its wall time ~ the supervised source's)


PROFILES = {
    # Planned from measured step times on a 2-core CPU, 1 thread: ~0.1 s per batch of 50, ~0.04 s
    # per batch of 25, ~0.8 s per 1,000 evaluated images; pretraining 3 epochs ~3-4 min.
    # 80 steps at N=20 is the main job's budget (40 epochs of 2 batches).
    "quick": Profile(
        seeds=(0, 1, 2), shots=(1, 5, 20, 100), steps={1: 40, 5: 60, 20: 80, 100: 100}, evals=8,
        generous_shots=(20,), pretrain_epochs=3,
    ),
    "full": Profile(
        seeds=(0, 1, 2, 3, 4), shots=(1, 5, 20, 100), steps={1: 200, 5: 300, 20: 400, 100: 600}, evals=20,
        generous_shots=(5, 20, 100), pretrain_epochs=10, accelerator="auto", threads=None, meta_pretrain_epochs=12,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    label: str
    num_classes: int
    make: Callable[..., Any]  # keyword arguments of ImageDataModule -> datamodule


def targets(fashion_root: str | None = None) -> dict[str, Target]:
    from lit_finetune.data import DigitsDataModule, FashionMNISTDataModule

    root = {"root": fashion_root} if fashion_root else {}
    fashion = partial(FashionMNISTDataModule, classes=[5, 6, 7, 8, 9], **root)
    return {
        "fashion": Target("Fashion-MNIST 5-9 (in-domain)", 5, fashion),
        "digits": Target("sklearn digits (cross-domain)", 10, DigitsDataModule),
    }


@dataclass
class Run:
    """What one (target, N, seed, arm) run measured."""

    steps: int  # trainer.global_step at the end
    batches: int  # training batches seen
    test_acc: dict[str, float]  # selection rule ("small" / "generous") -> test accuracy of the chosen state
    chosen_step: dict[str, int]
    backbone_change: float  # max |theta - theta_source| over the backbone's state at the end (inf: scratch)
    l2sp_anchor_error: float | None  # max |anchor - theta_source| (None: no L2-SP)


@dataclass
class Cell:
    """Shared facts of a (target, N) cell, and its runs: arm -> list over seeds."""

    steps: int
    steps_per_epoch: int
    unfreeze_epoch: int
    val_small: int  # validation images per class used for selection
    val_generous: int | None
    runs: dict[str, list[Run]] = field(default_factory=dict)


# -- measuring ---------------------------------------------------------------------------------
def evaluate(model, images, labels, device, chunk: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode; restores the previous mode."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.inference_mode():
        for x, y in zip(images.split(chunk), labels.split(chunk)):
            logits = model(x.to(device))
            y = y.to(device)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    return correct / len(labels), loss / len(labels)


class SelectOnValidation(Callback):
    """At the given steps, score each validation set and keep a copy of each set's best state so far."""

    def __init__(self, eval_steps: set[int], val_sets: dict[str, tuple[Any, Any]]) -> None:
        self.eval_steps, self.val_sets = eval_steps, val_sets
        self.best: dict[str, tuple[float, float, int]] = {}  # name -> (acc, -loss, step)
        self.states: dict[int, dict[str, Any]] = {}  # step -> CPU copy of the state dict
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        step = trainer.global_step
        if step not in self.eval_steps:
            return
        for name, (x, y) in self.val_sets.items():
            acc, loss = evaluate(pl_module, x, y, pl_module.device)
            if name not in self.best or (acc, -loss) > self.best[name][:2]:
                self.best[name] = (acc, -loss, step)
                if step not in self.states:
                    self.states[step] = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        keep = {best[2] for best in self.best.values()}
        self.states = {s: v for s, v in self.states.items() if s in keep}


def eval_steps(total: int, points: int) -> set[int]:
    """``points`` evenly spaced steps in ``1..total``, ending at ``total``."""
    return {max(1, round(total * i / points)) for i in range(1, points + 1)}


def source_backbone(path: str) -> dict[str, Any]:
    from lit_finetune.transfer.pretrained import read_state_dict

    return {k.removeprefix("backbone."): v for k, v in read_state_dict(path).items() if k.startswith("backbone.")}


def max_change(module, reference: dict[str, Any]) -> float:
    """Largest absolute difference between ``module``'s state and ``reference`` (inf if keys differ)."""
    state = module.state_dict()
    if set(state) != set(reference):
        return math.inf
    diffs = (float((v.detach().cpu().double() - reference[k].double()).abs().max()) for k, v in state.items())
    return max(diffs, default=0.0)


def anchor_error(model, reference: dict[str, Any]) -> float | None:
    """Largest |L2-SP anchor - source weight| (the anchors follow the backbone's parameter order)."""
    if getattr(model, "l2sp", None) is None:
        return None
    names = [n for n, _ in model.backbone.named_parameters()]
    anchors = (getattr(model.l2sp, f"anchor_{i}").cpu() for i in range(len(names)))
    return max(float((anchor - reference[n]).abs().max()) for anchor, n in zip(anchors, names))


def class_balanced_subset(labels, per_class: int, seed: int):
    """Seeded indices of ``per_class`` items of each label."""
    import torch

    generator = torch.Generator().manual_seed(10_007 * seed + per_class)
    picks = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(picks).sort().values


def min_class_pool(target: Target) -> int:
    """Training images in the smallest class of the target's train split (before any validation split)."""
    dm = target.make(val_split=0, samples_per_class=None)
    dm.setup("fit")
    return int(dm.train_set.labels.bincount().min())


def train_arm(
    arm: Arm, target: Target, dm, seed: int, cell: Cell, pretrained: str, val_sets: dict, test: tuple, profile: Profile,
    reference: dict[str, Any],
) -> Run:
    """Fit one arm in one cell for one seed; return its test accuracy under each selection rule."""
    import lightning as L
    import torch

    from lit_finetune import ImageClassifier
    from lit_finetune.callbacks import LayerFreezing, LRWarmup

    L.seed_everything(seed, verbose=False)
    model = ImageClassifier(
        num_classes=target.num_classes,
        pretrained=pretrained if arm.pretrained else None,
        l2sp_alpha=arm.l2sp_alpha,
        backbone_lr_ratio=arm.backbone_lr_ratio,
        peft=arm.peft,
        peft_rank=PEFT_RANK,
        label_smoothing=LABEL_SMOOTHING,
        optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY),
    )
    select = SelectOnValidation(eval_steps(cell.steps, profile.evals), val_sets)
    callbacks: list[Callback] = [select]
    if arm.freeze == "probe":
        callbacks.append(LayerFreezing(["backbone"], unfreeze_at_epoch=None))
    elif arm.freeze == "unfreeze":
        callbacks.append(LayerFreezing(["backbone"], unfreeze_at_epoch=cell.unfreeze_epoch))
    callbacks.append(LRWarmup(WARMUP_STEPS))
    cpu = profile.accelerator == "cpu" or not torch.cuda.is_available()
    trainer = L.Trainer(
        accelerator="cpu" if cpu else profile.accelerator, devices=1, max_steps=cell.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
        deterministic=True if cpu else "warn",  # some CUDA backward kernels have no deterministic version
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    device = torch.device("cpu" if cpu else "cuda")
    model.to(device)
    backbone_change = max_change(model.backbone, reference) if arm.pretrained else math.inf
    anchor = anchor_error(model, reference)
    test_acc: dict[str, float] = {}
    chosen: dict[str, int] = {}
    by_step: dict[int, float] = {}
    for name, (_, _, step) in select.best.items():
        if step not in by_step:
            model.load_state_dict(select.states[step])
            by_step[step] = evaluate(model, *test, device)[0]
        test_acc[name], chosen[name] = by_step[step], step
    return Run(trainer.global_step, select.batches, test_acc, chosen, backbone_change, anchor)


def selected_arms(names: Sequence[str] | None) -> list[str] | None:
    """The arms a piece runs, in ``ARMS`` order, with full fine-tuning (every paired comparison's base);
    ``None`` (all arms) for no selection."""
    if not names:
        return None
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    return [a for a in ARMS if a in names or a == "finetune"]


def run_sweep(
    profile: Profile,
    pretrained: str,
    arms: Sequence[str] | None = None,
    target_names: Sequence[str] = ("fashion", "digits"),
    fashion_root: str | None = None,
    test_limit: int | None = None,
    log: Callable[[str], None] = print,
    meta_pretrained: str | None = None,
) -> dict[str, dict[int, Cell]]:
    """The sweep's core: every target x N x seed x arm; returns ``{target: {N: Cell}}``.

    ``arms`` default: every arm whose source is given (the meta-learned source's arm needs ``meta_pretrained``).

    ``test_limit`` evaluates only the first images of the test split (for quick tests; the
    benchmark itself always uses the full split).
    """
    sources = {"supervised": pretrained, **({"meta": meta_pretrained} if meta_pretrained else {})}
    if arms is None:
        arms = [name for name, arm in ARMS.items() if arm.source in sources]
    missing = [name for name in arms if ARMS[name].source not in sources]
    if missing:
        raise ValueError(f"arms {missing} need the {ARMS[missing[0]].source!r} source: pass meta_pretrained=")
    references = {name: source_backbone(path) for name, path in sources.items()}
    results: dict[str, dict[int, Cell]] = {}
    for tname in target_names:
        target = targets(fashion_root)[tname]
        pool = min_class_pool(target)
        results[tname] = {}
        test = None
        for n in profile.shots:
            if n >= pool:
                raise ValueError(f"{target.label}: N={n} leaves no validation images (smallest class has {pool}).")
            val_small = min(n, pool - n)
            generous = GENEROUS_VAL if n in profile.generous_shots and n + GENEROUS_VAL <= pool else None
            steps = profile.steps[n]
            spe = math.ceil(n * target.num_classes / BATCH_SIZE)
            cell = Cell(steps, spe, max(1, math.ceil(HEAD_ONLY_FRACTION * steps / spe)), val_small, generous)
            results[tname][n] = cell
            for seed in profile.seeds:
                # Validation comes out of each class first; the small set is a seeded subset of it, so
                # the training images are the same whether or not the generous set is measured.
                per_class_val = max(val_small, generous or 0)
                dm = target.make(
                    samples_per_class=n, val_split=per_class_val * target.num_classes, batch_size=BATCH_SIZE, seed=seed
                )
                dm.setup("fit")
                if test is None:
                    dm.setup("test")
                    k = len(dm.test_set) if test_limit is None else min(test_limit, len(dm.test_set))
                    test = dm.test_set.__getitems__(range(k))
                val_x, val_y = dm.val_set.__getitems__(range(len(dm.val_set)))
                small = class_balanced_subset(val_y, val_small, seed)
                val_sets = {"small": (val_x[small], val_y[small])}
                if generous:
                    val_sets["generous"] = (val_x, val_y)
                started = time.perf_counter()
                for aname in arms:
                    arm = ARMS[aname]
                    run = train_arm(arm, target, dm, seed, cell, sources[arm.source], val_sets, test, profile,
                                    references[arm.source])  # fmt: skip
                    cell.runs.setdefault(aname, []).append(run)
                    if run.steps != steps or run.batches != steps:
                        raise RuntimeError(f"{aname} ran {run.steps} steps / {run.batches} batches, not {steps}")
                accs = "  ".join(f"{a} {100 * cell.runs[a][-1].test_acc['small']:.1f}" for a in arms)
                log(f"  {tname} N={n} seed {seed} ({time.perf_counter() - started:.0f} s): {accs}")
    return results


# -- reporting ---------------------------------------------------------------------------------
Results = dict[str, dict[int, Cell]]


def sample_std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: Sequence[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} ± {100 * sample_std(values):.1f}"


def accs(cell: Cell, arm: str, rule: str = "small") -> list[float]:
    """Test accuracies of ``arm`` over the seeds, checkpoint chosen by ``rule``."""
    return [r.test_acc[rule] for r in cell.runs[arm]]


def diffs(cell: Cell, arm_a: str, arm_b: str, rule_a: str = "small", rule_b: str = "small") -> list[float]:
    """Per-seed differences (paired: same seed, same training images)."""
    return [a - b for a, b in zip(accs(cell, arm_a, rule_a), accs(cell, arm_b, rule_b))]


def all_runs(results: Results, arm: str) -> list[Run]:
    return [r for cells in results.values() for c in cells.values() for r in c.runs.get(arm, [])]


def row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(results: Results, profile_name: str, profile: Profile, where: str, minutes: str, source: str) -> str:
    """The results file: main table, validation-size table, setup notes, per-seed values."""
    labels = {k: t.label for k, t in targets().items()}
    shots = sorted({n for cells in results.values() for n in cells})
    arms = list(next(iter(next(iter(results.values())).values())).runs)
    lines = [
        "Target test accuracy (%), mean ± std over seeds; each run's checkpoint chosen on a validation set "
        "no larger than its training set.",
        "",
        row(["target", "arm", *(f"N={n}/class" for n in shots)]),
        "|---|---|" + "---|" * len(shots),
    ]
    for tname, cells in results.items():
        for aname in arms:
            values = (mean_std(accs(c, aname)) for c in cells.values())
            lines.append(row([labels[tname], ARMS[aname].label, *values]))
        if "finetune" in arms and "scratch" in arms:
            gain = (mean_std(diffs(c, "finetune", "scratch")) for c in cells.values())
            lines.append(row([labels[tname], "*fine-tune − scratch (points)*", *gain]))
        if "meta" in arms and "finetune" in arms:  # the same fine-tune recipe: only the source differs
            gain = (mean_std(diffs(c, "meta", "finetune")) for c in cells.values())
            lines.append(row([labels[tname], "*meta-learned − supervised source (points)*", *gain]))
    generous = [(t, n, c) for t, cells in results.items() for n, c in cells.items() if c.val_generous]
    if generous:
        lines += [
            "",
            f"Validation size: the same runs, checkpoint chosen on N vs on {GENEROUS_VAL} validation images per "
            "class (the main configs' setting); test accuracy (%), difference in points (mean ± std of per-seed "
            "differences).",
            "",
            f"| target | N | arm | val = N/class | val = {GENEROUS_VAL}/class | difference |",
            "|---|---|---|---|---|---|",
        ]
        for tname, n, cell in generous:
            for aname in arms:
                small, big = mean_std(accs(cell, aname)), mean_std(accs(cell, aname, "generous"))
                gap = mean_std(diffs(cell, aname, aname, "generous", "small"))
                lines.append(row([labels[tname], str(n), ARMS[aname].label, small, big, gap]))
    lines += paired_lines(results, arms, labels)
    lines += peft_lines(results, arms)
    per_cell = "; ".join(
        f"{labels[t].split(' (')[0]} N={n}: {c.steps} steps ({c.steps_per_epoch} batch(es)/epoch, "
        f"head-only {c.unfreeze_epoch * c.steps_per_epoch} for freeze→unfreeze), val {c.val_small}/class"
        for t, cells in results.items()
        for n, c in cells.items()
    )
    seeds = len(next(iter(next(iter(results.values())).values())).runs[arms[0]])
    probe_ok = all(r.backbone_change == 0 for r in all_runs(results, "probe"))
    anchor_ok = all(r.l2sp_anchor_error == 0 for r in all_runs(results, "l2sp"))
    lines += [
        "",
        f"Profile `{profile_name}`: seeds {list(profile.seeds)[:seeds]}, batch {BATCH_SIZE}, AdamW LR {LR:g}, "
        f"weight decay {WEIGHT_DECAY:g} (the library's rule: none on norms, biases and L2-SP-anchored weights), "
        f"warm-up {WARMUP_STEPS} steps, label smoothing {LABEL_SMOOTHING}, "
        "`resnet_small`; every arm of a cell ran the same optimizer steps on the same batches (checked). "
        f"Per cell: {per_cell}. Validation at {profile.evals} evenly spaced steps per run; the best-on-validation "
        f"state was tested on the full target test split. L2-SP α {ARMS['l2sp'].l2sp_alpha}; discriminative LR: "
        f"backbone at {ARMS['dlr'].backbone_lr_ratio}x the head's LR. "
        + (f"Linear probe backbone bit-identical to the source after training: {'yes' if probe_ok else 'NO'}; "
           if "probe" in arms else "")
        + (f"L2-SP anchor equal to the source weights: {'yes' if anchor_ok else 'NO'}. " if "l2sp" in arms else "")
        + f"Source{'s' if 'meta-learned' in source else ''}: Fashion-MNIST classes 0-4, "
        f"{source}. "
        f"Measured on {where}; {minutes}.",
        "",
        "<details><summary>per seed (test accuracy %, small validation set)</summary>",
        "",
        "| target | N | arm | per seed |",
        "|---|---|---|---|",
    ]
    for tname, cells in results.items():
        for n, cell in cells.items():
            for aname in arms:
                values = ", ".join(f"{100 * a:.1f}" for a in accs(cell, aname))
                lines.append(row([labels[tname], str(n), ARMS[aname].label, values]))
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def paired_lines(results: Results, arms: Sequence[str], labels: dict[str, str], base: str = "finetune") -> list[str]:
    """Each arm minus ``base`` per cell, paired by seed, with Holm-adjusted p over the whole family."""
    import stats

    if base not in arms:
        return []
    family = [(t, n, a) for t, cells in results.items() for n in cells for a in arms if a != base]
    tests = [stats.paired_t_test(accs(results[t][n], a), accs(results[t][n], base)) for t, n, a in family]
    adjusted = stats.holm([test.p for test in tests])
    lines = [
        "",
        f"Each arm − {ARMS[base].label}, paired by seed (points): mean ± std of the per-seed differences, the "
        f"worst seed, and the two-sided paired t-test's p, Holm-adjusted over all {len(family)} comparisons "
        "of this table (significant at 0.05: **bold**).",
        "",
        "| target | N | arm | difference | worst seed | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for (t, n, a), test, p in zip(family, tests, adjusted):
        mark = "**" if p <= 0.05 else ""
        lines.append(row([labels[t], str(n), ARMS[a].label, f"{100 * test.mean:+.1f} ± {100 * test.std:.1f}",
                          f"{100 * test.worst:+.1f}", f"{mark}{p:.3f}{mark}"]))  # fmt: skip
    return lines


def peft_sizes(arm: Arm, num_classes: int) -> tuple[int, int, int, int]:
    """(trainable parameters, all parameters, delta checkpoint bytes, full state-dict bytes) of ``arm``'s model."""
    import tempfile

    import torch

    from lit_finetune import ImageClassifier

    model = ImageClassifier(num_classes=num_classes, peft=arm.peft, peft_rank=PEFT_RANK, pretrained="unused-source")
    with tempfile.TemporaryDirectory() as tmp:
        delta = model.save_delta(Path(tmp) / "delta.pt").stat().st_size
        torch.save(model.state_dict(), Path(tmp) / "full.pt")
        full = (Path(tmp) / "full.pt").stat().st_size
    return model.trainable_parameters, sum(p.numel() for p in model.parameters()), delta, full


def peft_lines(results: Results, arms: Sequence[str]) -> list[str]:
    """Trainable parameters and delta checkpoint size of the parameter-efficient arms (and full fine-tuning)."""
    shown = [a for a in arms if ARMS[a].peft or a == "finetune"]
    if not any(ARMS[a].peft for a in shown):
        return []
    lines = ["", "What trains, and what must be stored per target (Fashion-MNIST target, 5 classes):", "",
             "| arm | trainable parameters | share | delta checkpoint | full state dict |", "|---|---|---|---|---|"]
    for a in shown:
        trainable, total, delta, full = peft_sizes(ARMS[a], 5)
        delta_text = f"{delta / 1024:.0f} KiB" if ARMS[a].peft else "—"
        lines.append(row([ARMS[a].label, f"{trainable:,}", f"{100 * trainable / total:.1f} %", delta_text,
                          f"{full / 1024:.0f} KiB"]))  # fmt: skip
    return lines


def plot(results: dict[str, dict[int, Cell]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {k: t.label for k, t in targets().items()}
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (tname, cells) in zip(axes[0], results.items()):
        shots = list(cells)
        arms = list(next(iter(cells.values())).runs)
        for i, aname in enumerate(arms):
            jitter = [n * 1.035 ** (i - (len(arms) - 1) / 2) for n in shots]  # side by side on the log axis
            means = [100 * statistics.mean(accs(cells[n], aname)) for n in shots]
            stds = [100 * sample_std(accs(cells[n], aname)) for n in shots]
            ax.errorbar(jitter, means, yerr=stds, marker="o", capsize=3, label=ARMS[aname].label)
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(n) for n in shots])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images per class (N)")
        ax.set_ylabel("target test accuracy (%)")
        ax.set_title(labels[tname], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pretrain(workdir: Path, epochs: int, accelerator: str, fashion_root: str | None = None) -> str:
    """Pretrain the source model through the CLI (``pretrain_source.yaml``); return its best checkpoint."""
    with working_dir(workdir / "source"):
        run_cli(
            ["fit", "--config", str(CONFIGS / "pretrain_source.yaml"), *QUIET,
             "--trainer.max_epochs", str(epochs), "--trainer.accelerator", accelerator,
             "--model.init_args.lr_scheduler.init_args.T_max", str(epochs),
             *(["--data.init_args.root", fashion_root] if fashion_root else [])]
        )  # fmt: skip
        return str((Path.cwd() / "runs/classifier/pretrain_source/checkpoints/best.ckpt").resolve())


def pretrain_meta(workdir: Path, epochs: int, accelerator: str, fashion_root: str | None = None) -> str:
    """Meta-pretrain the source through the CLI (``meta_pretrain_source.yaml``, Reptile); return its best checkpoint.
    The linear decay of the meta step size spans the run: ``total_iters`` = its outer steps."""
    import yaml

    data = yaml.safe_load((CONFIGS / "meta_pretrain_source.yaml").read_text())["data"]["init_args"]
    outer_steps = epochs * math.ceil(data["episodes_per_epoch"] / data["meta_batch_size"])
    with working_dir(workdir / "meta_source"):
        run_cli(
            ["fit", "--config", str(CONFIGS / "meta_pretrain_source.yaml"), *QUIET,
             "--trainer.max_epochs", str(epochs), "--trainer.accelerator", accelerator,
             "--model.init_args.lr_scheduler.init_args.total_iters", str(outer_steps),
             *(["--data.init_args.dataset.init_args.root", fashion_root] if fashion_root else [])]
        )  # fmt: skip
        return str((Path.cwd() / "runs/classifier/meta_pretrain_source/checkpoints/best.ckpt").resolve())


def source_cost(checkpoint: str) -> str:
    """What training a source cost, from its run's files: a lit-finetune checkpoint beside ``last.ckpt``.

    Supervised (``pretrain_source.yaml``): optimizer steps x batch size = training images through the network.
    Meta-learned: episodes, images drawn for them, and outer steps (``MetaPretrainer`` keeps the count)."""
    import torch

    from lit_finetune.modules.meta import META_COST_KEY

    last = torch.load(Path(checkpoint).with_name("last.ckpt"), map_location="cpu", weights_only=True)
    cost, hparams = last.get(META_COST_KEY), last.get("hyper_parameters", {})
    if cost is not None:
        return (
            f"{hparams.get('algorithm', '?')}, {last['global_step']} outer steps, {int(cost['episodes']):,} episodes, "
            f"{int(cost['images']):,} images drawn, {hparams.get('inner_steps')} inner steps per episode"
        )
    import yaml

    batch = yaml.safe_load((CONFIGS / "pretrain_source.yaml").read_text())["data"]["init_args"]["batch_size"]
    return f"{last['global_step']} optimizer steps of {batch} images, about {last['global_step'] * batch:,} images"


def cells_from_json(data: dict[str, Any]) -> Results:
    """The ``{target: {N: Cell}}`` of a piece's JSON data (JSON turned N into strings)."""
    return {
        tname: {
            int(n): Cell(**{**cell, "runs": {a: [Run(**r) for r in runs] for a, runs in cell["runs"].items()}})
            for n, cell in cells.items()
        }
        for tname, cells in data["results"].items()
    }


def merge_results(pieces: Sequence[dict[str, Any]]) -> tuple[Results, list[int]]:
    """One ``Results`` from pieces that ran other seeds or other N; runs ordered by seed
    (:func:`provenance.merge_seed_lists`); pieces that share a cell must agree on its facts (steps, validation)."""
    facts: dict[tuple[str, int], Cell] = {}
    for piece in pieces:
        for tname, cells in cells_from_json(piece).items():
            for n, cell in cells.items():
                key, shared = (tname, n), dataclasses.replace(cell, runs={})
                if facts.setdefault(key, shared) != shared:
                    message = f"{tname} N={n}: pieces disagree on the cell: {facts[key]}, {shared}"
                    raise provenance.PieceMismatch(message)
    runs = [{t: {n: c["runs"] for n, c in cells.items()} for t, cells in p["results"].items()} for p in pieces]
    tree, seeds = provenance.merge_seed_lists(runs, [p["seeds"] for p in pieces])
    results: Results = {}
    for (tname, n), shared in sorted(facts.items(), key=lambda item: item[0][1]):
        cell_runs = {arm: [Run(**r) for r in arm_runs] for arm, arm_runs in tree[tname][str(n)].items()}
        results.setdefault(tname, {})[n] = dataclasses.replace(shared, runs=cell_runs)
    return results, seeds


def merge_main(args: argparse.Namespace, run: provenance.Run) -> Path:
    """``--merge``: one table from piece JSON files (same commit, profile, source), written to ``--results``."""
    pieces, summary = provenance.merge_pieces(args.merge, run=run)  # same commit, profile, source checkpoint
    # merge_pieces checked that every piece read the same source checkpoints (sha256); a piece that reused them
    # (--pretrained / --meta-pretrained) describes them as "given", the piece that trained them says how
    trained = sorted({p["source"] for p in pieces if not p["source"].startswith("given")})
    if len(trained) > 1:
        raise provenance.PieceMismatch(f"pieces describe their source differently: {trained}")
    source = trained[0] if trained else pieces[0]["source"]
    results, seeds = merge_results(pieces)
    name = summary["config"]["profile"]
    shots = tuple(sorted({n for cells in results.values() for n in cells}))
    profile = dataclasses.replace(PROFILES[name], seeds=tuple(seeds), shots=shots)
    where = "; ".join(
        f"piece {i} ({', '.join(map(str, p['seeds']))} x N {', '.join(map(str, sorted({n for c in p['results'].values() for n in map(int, c)})))}): "
        f"{p['where']}"
        for i, p in enumerate(pieces, 1)
    )
    minutes = f"{sum(p['duration_s'] for p in summary['pieces']) / 60:.1f} min over {len(pieces)} pieces (see Provenance)"
    text = markdown(results, name, profile, where, minutes, source)
    path = args.results / "transfer_sweep.md"
    run.write(path, text, data={"results": results, "seeds": seeds, "source": source, "where": where},
              config=summary["config"], pieces=summary["pieces"])  # fmt: skip
    plot(results, args.results / "transfer_sweep.png")
    print("\n" + text + f"\nwrote {path} and transfer_sweep.png")
    return path


def main(argv: list[str] | None = None) -> None:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--pretrained", help="source checkpoint to use instead of pretraining one")
    parser.add_argument("--meta-pretrained", help="meta-learned source checkpoint to use instead of meta-pretraining one")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds (a piece of the profile)")
    parser.add_argument("--shots", type=int, nargs="+", help="run only these N of the profile (a piece)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS),
                        help="run only these arms (a piece), with full fine-tuning always (the paired base)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PIECE_JSON",
                        help="merge pieces' transfer_sweep.json (same commit and profile) into one table; runs nothing")
    parser.add_argument("--fashion-root", help="folder with the Fashion-MNIST IDX files (default: Debian's copy)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "transfer_sweep")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.merge:
        merge_main(args, run)
        return
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = dataclasses.replace(profile, seeds=tuple(args.seeds))
    if args.shots:
        if not set(args.shots) <= set(profile.shots):
            parser.error(f"--shots must be among the profile's {list(profile.shots)}")
        profile = dataclasses.replace(profile, shots=tuple(n for n in profile.shots if n in args.shots))
    arms = selected_arms(args.arms)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (sets its own log level on import; quiet it afterwards)
    import torch

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    if args.pretrained:
        pretrained, source = args.pretrained, f"given checkpoint `{Path(args.pretrained).name}`"
    else:
        print(f"pretraining on Fashion-MNIST classes 0-4 ({profile.pretrain_epochs} epochs)", flush=True)
        pretrained = pretrain(args.workdir, profile.pretrain_epochs, profile.accelerator, args.fashion_root)
        took = (time.perf_counter() - start) / 60
        source = f"{profile.pretrain_epochs} epochs of `pretrain_source.yaml` ({took:.1f} min)"
        print(f"  -> {pretrained} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
        source = source.replace(" min)", f" min; {source_cost(pretrained)})")
    if arms is not None and "meta" not in arms:
        meta_pretrained = None  # no arm needs it
    elif args.meta_pretrained:
        meta_pretrained = args.meta_pretrained
        source += f"; meta-learned source: given checkpoint `{Path(args.meta_pretrained).name}`"
    else:
        epochs, meta_start = profile.meta_pretrain_epochs, time.perf_counter()
        print(f"meta-pretraining (Reptile) on Fashion-MNIST classes 0-4 ({epochs} epochs)", flush=True)
        meta_pretrained = pretrain_meta(args.workdir, epochs, profile.accelerator, args.fashion_root)
        took = (time.perf_counter() - meta_start) / 60
        source += (f"; meta-learned source: {epochs} epochs of `meta_pretrain_source.yaml` ({took:.1f} min; "
                   f"{source_cost(meta_pretrained)})")  # fmt: skip
        print(f"  -> {meta_pretrained} ({took:.1f} min)", flush=True)
    results = run_sweep(profile, pretrained, arms, fashion_root=args.fashion_root, meta_pretrained=meta_pretrained)
    minutes = (
        f"{(time.perf_counter() - start) / 60:.1f} min in all (this process's own CPU time "
        f"{(time.process_time() - cpu_start) / 60:.1f} min; 1-minute load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end: other processes shared the machine)"
    )
    where = machine()
    if profile.accelerator != "cpu" and torch.cuda.is_available():
        where = where.replace("CPU only", f"GPU {torch.cuda.get_device_name()}")
    elif profile.threads:
        where = where.replace("CPU only", f"CPU only, {profile.threads} torch thread(s)")
    text = markdown(results, args.profile, profile, where, minutes, source)
    config = {"profile": args.profile, **provenance.settings(PROFILES[args.profile], "seeds", "shots")}
    if arms is not None:  # pieces of other arm sets do not merge into one table
        config["arms"] = arms
    run.write(args.results / "transfer_sweep.md", text,
              {"source checkpoint": pretrained, "meta-learned source checkpoint": meta_pretrained},
              data={"results": results, "seeds": list(profile.seeds), "source": source, "where": where}, config=config)
    plot(results, args.results / "transfer_sweep.png")
    print("\n" + text + f"\nwrote {args.results / 'transfer_sweep.md'} and transfer_sweep.png")


if __name__ == "__main__":
    main()
