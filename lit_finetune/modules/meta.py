"""Episodic meta-pretraining of an :class:`ImageClassifier`'s network: Reptile or first-order MAML."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from lit_finetune.modules.classifier import ImageClassifier
from lit_finetune.transfer.meta import adapt, batch_statistics, query_step, reptile_direction, trainable_weights

#: checkpoint key of what meta-training has cost so far (episodes, images, seconds); outside the state dict,
#: so the checkpoint loads into an ImageClassifier with a clean report
META_COST_KEY = "lit_finetune_meta_cost"
ALGORITHMS = ("reptile", "fomaml")


class MetaPretrainer(ImageClassifier):
    """An :class:`ImageClassifier` trained on N-way K-shot episodes (:class:`~lit_finetune.data.EpisodicDataModule`)
    so that its weights adapt to a new few-shot task in a few SGD steps.

    Each training batch is ``E`` episodes. For each, the network is adapted on the support images by
    ``inner_steps`` steps of plain SGD (``inner_lr``, full support batch) on a functional copy
    (:func:`~lit_finetune.transfer.meta.adapt`); then the outer direction is averaged over the episodes
    (and over processes under DDP), put into the parameters' ``.grad`` and handed to the module's
    optimizer (built over the named groups like every module's: LR factors, warm-up, schedulers,
    ``AppliedLRMonitor`` all apply):

    * ``algorithm="reptile"`` (Nichol et al. 2018): direction ``theta - phi`` (meta weights minus adapted
      weights). With ``torch.optim.SGD(lr=eps)`` one outer step is exactly
      ``theta <- theta + eps * mean_episodes(phi - theta)``; the query images are only scored.
    * ``algorithm="fomaml"`` (Finn et al. 2017, first order): direction = the query loss's gradient at the
      adapted weights (the inner loop's Jacobian dropped); usually with Adam.

    The checkpoint is an ordinary source: the same network and state-dict keys as an ``ImageClassifier``
    (``backbone.*``, ``head.*``, input statistics), so ``ImageClassifier(pretrained=<ckpt>)`` loads it like a
    supervised source (new head unless ``load_head``). Its head has ``num_classes = ways`` outputs. With
    ``zero_head`` (default) every episode starts from a zero head (the "zeroing trick", Kao et al. 2022):
    episode labels are a random permutation of the classes, so a learnt head init would only learn to be
    neutral; the head is then left out of the outer update and saved as zeros. The first inner step then
    moves only the head (zero head: no gradient reaches the backbone), so ``inner_steps >= 2`` is required.

    BatchNorm: batch statistics in every episode forward, at training and validation (transductive, as the
    MAML / Reptile reference code); the running statistics follow the meta weights (updated by the first
    inner-step forward of each training episode only), so the checkpoint works in eval mode. See
    :mod:`lit_finetune.transfer.meta`.

    Logged: ``train/loss``, ``train/acc`` (query images after adaptation), ``val/loss``, ``val/acc`` (the same
    on validation episodes, with ``eval_inner_steps``), ``test/...``; the cost so far
    (``meta/episodes``, ``meta/images``: support and query images drawn by all processes) also travels in
    checkpoints.

    Precision: 32-bit and bf16 (the outer direction is not a loss gradient, so fp16's loss scaling does
    not apply: ``16-mixed`` is refused).

    Args:
        num_classes: ways of an episode (linked from the episodic datamodule).
        algorithm: ``"reptile"`` or ``"fomaml"``.
        inner_steps: SGD steps on the support set per training episode.
        inner_lr: the inner SGD step size.
        eval_inner_steps: inner steps for validation and test episodes (default ``inner_steps``).
        zero_head: start every episode from a zero head (see above).
        **classifier_args: :class:`ImageClassifier`'s (``backbone``, ``pretrained`` to start from a source,
            ``label_smoothing``, ``optimizer`` = the outer optimizer, ``lr_scheduler``...). ``l2sp_alpha``
            must stay 0.
    """

    def __init__(
        self,
        num_classes: int,
        algorithm: str = "reptile",
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        eval_inner_steps: int | None = None,
        zero_head: bool = True,
        **classifier_args: Any,
    ) -> None:
        for key in ("_class_path", "_instantiator"):  # Lightning's records in a checkpoint's hyper-parameters
            classifier_args.pop(key, None)
        if classifier_args.get("l2sp_alpha", 0.0):
            raise ValueError("MetaPretrainer does not take l2sp_alpha (no anchor in meta-training); leave it at 0.")
        super().__init__(num_classes, **classifier_args)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 1) or inner_lr <= 0:
            raise ValueError(
                f"need inner_steps >= 1, eval_inner_steps >= 1 and inner_lr > 0; got {inner_steps}, "
                f"{eval_inner_steps}, {inner_lr}"
            )
        if zero_head and min(inner_steps, eval_inner_steps or inner_steps) < 2:
            raise ValueError(
                "zero_head=True needs inner_steps (and eval_inner_steps) >= 2: the first step from a zero head moves "
                "only the head, so with one step the backbone would never adapt. Raise them or set zero_head=False."
            )
        self.automatic_optimization = False
        if zero_head:
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()
        #: what meta-training has cost so far; restored from checkpoints, so a resumed run keeps counting
        self.cost: dict[str, float] = {"episodes": 0, "images": 0, "train_seconds": 0.0}

    # -- one episode ----------------------------------------------------------------------------------
    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def episode_start(self) -> dict[str, torch.Tensor]:
        """The weights every episode starts from: the meta weights, with a zero head under ``zero_head``."""
        start = trainable_weights(self)
        if self.hparams.zero_head:
            start = {n: torch.zeros_like(w) if n.startswith("head.") else w for n, w in start.items()}
        return start

    def run_episode(
        self, episode: tuple[torch.Tensor, ...], steps: int, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """Adapt on the support set, score the query set: ``(query loss, query logits, outer direction)``
        (the direction only when ``training``)."""
        sx, sy, qx, qy = episode
        self.check_input(sx)
        start = self.episode_start()
        fomaml = training and self.hparams.algorithm == "fomaml"
        with batch_statistics(self):
            adapted = adapt(self, sx, sy, start, steps, self.hparams.inner_lr, self.loss_fn, update_running_stats=training)
            loss, logits, grads = query_step(self, adapted, qx, qy, self.loss_fn, grad=fomaml)
        direction = None
        if training:
            direction = grads if fomaml else reptile_direction(start, adapted)
            if self.hparams.zero_head:  # every episode starts from zeros: the head is no meta parameter
                direction = {n: d for n, d in direction.items() if not n.startswith("head.")}
        return loss, logits, direction

    # -- steps ----------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"MetaPretrainer does not support precision={precision!r}: its outer direction is no loss gradient, "
                "so fp16 loss scaling cannot apply. Use 32 or bf16-mixed."
            )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        started = time.perf_counter()
        optimizer = self.optimizers()
        params = dict(self.named_parameters())
        total: dict[str, torch.Tensor] = {}
        losses = []
        episodes = batch[0].shape[0]
        for e in range(episodes):
            episode = tuple(t[e] for t in batch)
            loss, logits, direction = self.run_episode(episode, self.hparams.inner_steps, training=True)
            losses.append(loss)
            self.train_metrics.update(logits, episode[3])
            for name, d in (direction or {}).items():
                total[name] = total[name] + d if name in total else d.clone()
        strategy = self.trainer.strategy
        for name, p in params.items():
            if name in total:
                # mean over the episodes of this process, then over processes (DDP: each rank drew its own)
                p.grad = strategy.reduce(total[name] / episodes, reduce_op="mean").to(p.dtype)
            else:
                p.grad = None  # the zero head, frozen parameters: no update, no weight decay
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step_schedulers("step")

        # every process drew as many episodes as this one (DDP), and the update averaged them all
        drawn = episodes * self.trainer.world_size
        self.cost["episodes"] += drawn
        self.cost["images"] += drawn * (batch[0].shape[1] + batch[2].shape[1])  # support + query images drawn
        self.cost["train_seconds"] += time.perf_counter() - started
        self.log("train/loss", torch.stack(losses).mean(), prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        self.log("meta/episodes", float(self.cost["episodes"]), reduce_fx="max")
        self.log("meta/images", float(self.cost["images"]), reduce_fx="max")

    def _evaluate(self, batch: tuple[torch.Tensor, ...], metrics, stage: str) -> None:
        steps = self.hparams.eval_inner_steps or self.hparams.inner_steps
        # Lightning evaluates under inference mode; the inner loop needs autograd, and tensors made in
        # inference mode cannot be saved for backward: clone the batch outside it
        with torch.inference_mode(False), torch.enable_grad():
            batch = tuple(t.clone() for t in batch)
            losses = []
            for e in range(batch[0].shape[0]):
                episode = tuple(t[e] for t in batch)
                loss, logits, _ = self.run_episode(episode, steps, training=False)
                losses.append(loss)
                metrics.update(logits, episode[3])
        self.log(f"{stage}/loss", torch.stack(losses).mean(), prog_bar=stage == "val", sync_dist=True)
        self.log_dict(metrics, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        pass  # episode labels are slots of random classes: no per-class accuracy or confusion matrix

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        raise RuntimeError(
            "MetaPretrainer does not predict: fine-tune its checkpoint first (ImageClassifier(pretrained=<ckpt>)), "
            "then predict with that."
        )

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[META_COST_KEY] = dict(self.cost)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if META_COST_KEY in checkpoint:
            self.cost = dict(checkpoint[META_COST_KEY])
