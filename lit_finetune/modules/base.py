"""What every LightningModule of the package shares: pretrained loading at fit start, one optimizer
per network over named groups, data checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lit_finetune.log_steps import train_step_values_read
from lit_finetune.transfer.lr_factors import install_lr_scale
from lit_finetune.transfer.param_groups import check_groups_cover
from lit_finetune.transfer.pretrained import LoadReport


def _warn_if_source_unread(module: TransferModule, args: Any) -> None:
    """Forward pre-hook of a module built with ``pretrained`` (a function, not a lambda: DDP spawn pickles it)."""
    module.warn_if_source_unread()


#: checkpoint (and delta) key of the class names of the data a module was trained on (see ``setup``)
CLASS_NAMES_KEY = "class_names"
#: checkpoint key of the global random number generator states (see ``on_save_checkpoint``)
RNG_KEY = "lit_finetune_rng_states"
#: checkpoint key of a module's :class:`NoiseStream` (its seed and how many batches it has drawn)
NOISE_STREAM_KEY = "lit_finetune_noise_stream"
#: the ``torch.compile`` modes a module's ``compile_mode`` takes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: the modes that replay CUDA graphs on a CUDA device
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class NoiseStream:
    """The random numbers a module draws in training (GAN noise, augmentation, a VAE's sampling).

    Each batch gets its own ``torch.Generator`` seeded from ``(seed, global rank, batches drawn)``, so
    every DDP rank draws its own noise (the global RNG, seeded alike by ``seed_everything``, would give
    every rank the same) while the weights stay in sync, and a resumed fit draws what an uninterrupted
    one would: the checkpoint keeps the seed and the count.

    Args:
        seed: the stream's seed; ``None`` draws one from the global RNG when a fit starts (so
            ``seed_everything`` sets it and a seed sweep draws other noise per seed).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        #: ``{"seed": int, "batches": int}`` once started
        self.state: dict[str, int] | None = None
        self._origin = ""  # "fit", "checkpoint" (resumed), "loaded" (load_from_checkpoint) or "outside_fit"

    def start_fit(self) -> None:
        """Start the stream for a fit; a restored (resumed) one and a second fit of the same module continue."""
        # draws made outside a fit (e.g. a notebook looking at samples first) do not shift the fit's stream
        if self._origin not in ("fit", "checkpoint"):
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            self.state = {"seed": int(seed), "batches": 0}
        self._origin = "fit"

    def next(self, rank: int, device: torch.device | str) -> torch.Generator:
        """This batch's generator on ``device``: different on every rank and batch, the same after a resume."""
        if self.state is None:  # used outside a fit (research code)
            self.state = {"seed": 0 if self.seed is None else int(self.seed), "batches": 0}
            self._origin = "outside_fit"
        generator = torch.Generator(device=device)
        generator.manual_seed(hash((self.state["seed"], rank, self.state["batches"])) % (2**63))
        self.state["batches"] += 1
        return generator

    def state_dict(self) -> dict[str, int] | None:
        return dict(self.state) if self.state is not None else None

    def load_state_dict(self, state: dict[str, int] | None, resume: bool = True) -> None:
        """Restore a checkpoint's stream; ``resume=False`` (a module from ``load_from_checkpoint``): draws made
        outside a fit continue it, but a new fit starts its own (from its seed, not the checkpoint's count)."""
        self.state = dict(state) if state is not None else None
        self._origin = ("checkpoint" if resume else "loaded") if state is not None else ""


@dataclass
class Network:
    """One trained network of a module: its named parameter groups and how to optimise them.

    Each network gets its own optimizer (a GAN's generator and discriminator) and, optionally,
    its own scheduler. ``groups`` follow :mod:`lit_finetune.transfer.param_groups`.
    """

    name: str
    groups: list[dict[str, Any]]
    optimizer: OptimizerCallable
    lr_scheduler: LRSchedulerCallable | None = None
    scheduler_interval: str = "epoch"
    scheduler_monitor: str = "val/loss"


def build_optimizer(network: Network) -> dict[str, Any]:
    """The optimizer (LR factors installed) and scheduler config of one network."""
    if network.scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {network.scheduler_interval!r}")
    optimizer = install_lr_scale(network.optimizer(network.groups))
    config: dict[str, Any] = {"optimizer": optimizer}
    if network.lr_scheduler is not None:
        config["lr_scheduler"] = {
            "scheduler": network.lr_scheduler(optimizer),
            "interval": network.scheduler_interval,
            "monitor": network.scheduler_monitor,
            "name": network.name,
        }
    return config


class TransferModule(L.LightningModule):
    """Base class: one optimizer (and scheduler) per network, built from config over named groups.

    Subclasses define what they optimise (``training_step``) and how their parameters split
    into named groups: :meth:`param_groups` for a module with one network, or :meth:`networks`
    for several (a GAN's G and D, each with its own optimizer and scheduler). Optimizers are
    ``OptimizerCallable`` (a class or ``functools.partial``) so LightningCLI configs set them
    without the CLI's automatic optimizer, which would cover frozen parameters with one group.
    Under manual optimisation Lightning steps no scheduler: the base steps epoch-interval ones at
    the end of each epoch, and a module calls :meth:`step_schedulers` ``("step")`` in its
    ``training_step`` right after its updates (where Lightning steps them under automatic
    optimisation: before any callback's ``on_train_batch_end``, so a mid-epoch checkpoint holds
    the schedulers of the step it saves).

    Pretrained weights (``pretrained=``) are read once, when the first fit / validate / test /
    predict starts without a checkpoint to restore (``on_fit_start`` and siblings), or on
    :meth:`load_pretrained_weights`; never in ``__init__``: a checkpoint already holds them,
    together with whatever the module derived from them (L2-SP anchors, input normalisation), so
    restoring, testing or resuming it never needs the source file.

    Args:
        num_classes: classes in the data (linked from the datamodule by the CLI); ``None`` for
            modules that use no labels.
        in_channels: image channels (linked from the datamodule).
        image_size: image side in pixels (linked from the datamodule).
        optimizer: e.g. ``torch.optim.AdamW`` or ``functools.partial(torch.optim.SGD, lr=0.1)``.
        lr_scheduler: optional, e.g. ``functools.partial(CosineAnnealingLR, T_max=20)``.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        scheduler_monitor: metric for ``ReduceLROnPlateau``.
        pretrained: where the weights come from (read by :meth:`read_pretrained`).
        compile_mode: ``torch.compile`` the module's networks (:attr:`compiled_networks`) with this mode
            (``"default"``; ``"reduce-overhead"`` adds CUDA graphs on a GPU, for static shapes); ``None``
            runs them eagerly. See :meth:`compile_networks`.
    """

    #: the submodules ``compile_mode`` compiles (the heavy networks; losses, augmentation and logging stay eager)
    compiled_networks: tuple[str, ...] = ()

    #: constructor arguments that change neither the networks nor what the checkpoint holds (paths of
    #: outside networks, evaluation switches): with ``lit-finetune ... --ckpt_path``, the value given in
    #: the config or on the command line wins over the checkpoint's hyper-parameters
    runtime_options: tuple[str, ...] = ()

    def __init__(
        self,
        num_classes: int | None,
        in_channels: int = 1,
        image_size: int = 28,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        pretrained: str | None = None,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be None or one of {COMPILE_MODES}, got {compile_mode!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.pretrained = pretrained
        self.compile_mode = compile_mode
        #: what the last pretrained load did (``None`` until weights were read)
        self.load_report: LoadReport | None = None
        #: the names of the classes, by label: the datamodule's (copied in ``setup`` and kept in checkpoints, so a
        #: model loaded without its data still names them, e.g. "Sandal") or, until data was seen, "0".."k-1"
        self.class_names: list[str] = [str(i) for i in range(num_classes or 0)]
        #: whether :attr:`class_names` came from a datamodule (and so can be compared with another model's)
        self.class_names_from_data = False
        self._weights_resolved = pretrained is None
        self._unread_source_warned = False
        if pretrained is not None:  # outside a Trainer, using the networks before the source is read is a trap
            self.register_forward_pre_hook(_warn_if_source_unread)
        #: the per-rank training noise of a module that draws any (see :meth:`noise_generator`)
        self.noise_stream: NoiseStream | None = None
        # manual optimisation: (scheduler, monitored metric) of each scheduler; Lightning drops `monitor` there
        self._scheduler_monitors: list[tuple[Any, str]] = []
        self._validated = False  # a validation (not the sanity check) has run in this process
        #: training-step values not logged yet (see :meth:`log_train_step`) and whether they go out at batch end
        self._train_logs: list[tuple[Callable[[], Mapping[str, Any]], dict[str, Any]]] = []
        self._train_log_at_batch_end = False

    # -- what subclasses provide ----------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Named parameter groups (``name``, ``params``, ``lr_scale``) covering every trainable parameter."""
        raise NotImplementedError

    def networks(self) -> list[Network]:
        """The networks to optimise; by default one, from :meth:`param_groups` and the module's optimizer."""
        return [
            Network(
                "model",
                self.param_groups(),
                self.optimizer_factory,
                self.scheduler_factory,
                self.scheduler_interval,
                self.scheduler_monitor,
            )  # fmt: skip
        ]

    def read_pretrained(self, source: str) -> LoadReport:
        """Load ``source`` into the module (and derive what depends on it); return the report."""
        raise NotImplementedError(f"{type(self).__name__} does not load pretrained weights")

    # -- pretrained weights -----------------------------------------------------------------------
    def load_pretrained_weights(self) -> LoadReport | None:
        """Read ``pretrained`` now (once); later calls and restored checkpoints do nothing."""
        if not self._weights_resolved:
            self._weights_resolved = True  # set first: reading may run the networks (e.g. EWC's Fisher)
            try:
                self.load_report = self.read_pretrained(self.pretrained)
            except BaseException:
                self._weights_resolved = False
                raise
        return self.load_report

    def warn_if_source_unread(self) -> None:
        """Warn once when the networks are used outside a Trainer before ``pretrained`` was read.

        The source is read when a fit, validate, test or predict starts (so a checkpoint restored by the
        Trainer is never overwritten by it); ``model(x)`` or ``sample()`` right after the constructor would
        silently use the random initialisation. Called before ``forward`` and by the sampling methods.
        """
        if self._weights_resolved or self._unread_source_warned or self._trainer is not None:
            return
        self._unread_source_warned = True
        rank_zero_warn(
            f"{type(self).__name__} is used before its pretrained weights ({self.pretrained!r}) were read, so it "
            "computes with its random initialisation: they are read when a Trainer's fit, validate, test or predict "
            "starts. Call model.load_pretrained_weights() first to use them outside a Trainer."
        )

    #: checkpoint key of :attr:`noise_stream`
    noise_stream_key: str = NOISE_STREAM_KEY

    def noise_generator(self) -> torch.Generator:
        """This training batch's random generator from :attr:`noise_stream` (call it once per batch)."""
        if self.noise_stream is None:
            raise RuntimeError(
                f"{type(self).__name__} draws training noise but has no noise stream: set "
                "self.noise_stream = NoiseStream() in __init__ (it is started at fit start and checkpointed)."
            )
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return self.noise_stream.next(rank, self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the checkpoint's weights win: the pretrained source is never read for a restored module
        self._weights_resolved = True
        # The random state continues only a resumed fit (`fit(ckpt_path=...)`); a new fit of a module from
        # `load_from_checkpoint` (no trainer attached yet) keeps the seed it was given, so a seed sweep is one.
        resuming = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        self._rng_to_restore = checkpoint.get(RNG_KEY) if resuming else None
        if self.noise_stream is not None:
            self.noise_stream.load_state_dict(checkpoint.get(self.noise_stream_key), resume=resuming)
        self.restore_class_names(checkpoint)

    # -- compiled networks -------------------------------------------------------------------------
    def compile_networks(self) -> None:
        """Compile each of :attr:`compiled_networks` in place with ``torch.compile(mode=compile_mode)`` (once).

        In place (``nn.Module.compile``), not by wrapping (``torch.compile(net)``): the wrapper would put
        ``_orig_mod.`` in front of every state-dict key, so checkpoints, pretrained loading, the EMA copy
        and ``LayerFreezing``'s module names would all see other names. Compiled this way the parameters,
        buffers and names stay those of the eager network; only its calls run the compiled code
        (compiled on the first call, again when a call differs in what the graph depends on, e.g. a
        module frozen or put in eval mode). Lightning calls this from ``configure_model`` at the start
        of every fit, validate, test and predict; call it yourself to use the networks outside a Trainer.
        """
        if self.compile_mode is None:
            return
        for name in self.compiled_networks:
            net = self.get_submodule(name)
            if getattr(net, "_compiled_call_impl", None) is None:
                net.compile(mode=self.compile_mode)

    def configure_model(self) -> None:
        self.compile_networks()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # CUDA graphs reuse their output memory at the next replay; a new step begins here, so the outputs of the
        # last one (e.g. its losses, kept for logging) are no longer read (torch.compiler's documented marker)
        if self.compile_mode in CUDA_GRAPH_MODES and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    # -- training-step values, logged where they are read ----------------------------------------
    def log_train_step(self, values: Callable[[], Mapping[str, Any]], batch_idx: int, **log_kwargs: Any) -> None:
        """``self.log_dict(values(), **log_kwargs)`` from ``training_step``, on the steps whose values are read.

        Lightning writes step values to the loggers only every ``log_every_n_steps`` steps, yet each
        ``self.log`` key costs it about 0.3 ms on a CPU (a tenth of a one-layer classifier's step,
        ``benchmarks/speed.py --models overhead``). So the values (``values`` is called only then) are
        logged on the steps :func:`~lit_finetune.log_steps.train_step_values_read` names: those written,
        an epoch's last batch, the last of ``max_steps``, every step of ``fast_dev_run`` and, for a
        ``prog_bar`` value, every step while a progress bar draws it. The loggers record the same values
        at the same steps as logging every step would; ``trainer.callback_metrics`` holds the last logged
        step's values in between (for a callback that reads ``train/*`` at every step, set
        ``log_every_n_steps=1``).

        A callback that stops the fit after ``training_step`` (e.g. ``Timer``) makes Lightning write that
        step too: its values are logged from ``on_train_batch_end`` then, and, should the fit go on
        (``min_steps`` / ``min_epochs``), from there on, so that those entries, which Lightning reads after
        ``training_step``'s, are never the older ones.
        """
        if not self._train_log_at_batch_end and self._train_values_read(batch_idx, log_kwargs):
            self.log_dict(dict(values()), **log_kwargs)
        else:
            self._train_logs.append((values, log_kwargs))

    def _train_values_read(self, batch_idx: int, log_kwargs: Mapping[str, Any]) -> bool:
        return train_step_values_read(self._trainer, batch_idx, self.global_step, bool(log_kwargs.get("prog_bar")))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pending, self._train_logs = self._train_logs, []
        if pending and (self._train_log_at_batch_end or self.trainer.should_stop):
            self._train_log_at_batch_end = True
            for values, log_kwargs in pending:
                if self._train_values_read(batch_idx, log_kwargs):
                    self.log_dict(dict(values()), **log_kwargs)

    def on_train_start(self) -> None:
        self._train_logs, self._train_log_at_batch_end = [], False
        # restored here, after the sanity-check validation, right before the first resumed batch
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])

    def class_names_record(self) -> dict[str, list[str]]:
        """``{"class_names": [...]}`` for a checkpoint when they came from data, else ``{}``."""
        return {CLASS_NAMES_KEY: list(self.class_names)} if self.class_names_from_data else {}

    def restore_class_names(self, checkpoint: Mapping[str, Any]) -> None:
        """Take the class names a checkpoint (or delta) records; older ones record none."""
        self._adopt_class_names(checkpoint.get(CLASS_NAMES_KEY))

    def _adopt_class_names(self, names: Sequence[str] | None) -> None:
        """Take data's class names, one per label (names of another count, e.g. an unlabelled folder's, are not)."""
        if names and len(names) == len(self.class_names):
            self.class_names, self.class_names_from_data = [str(n) for n in names], True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # LightningCLI rebuilds the model of `--ckpt_path` from the checkpoint's hyper-parameters and
        # their `_class_path`; checkpoints written from plain Python lack it and would build this base class.
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")
        # Lightning does not checkpoint the global RNG: without it, dropout (or any sampling in a
        # training step) draws other numbers after a resume. Tensors only, so weights_only loading works.
        checkpoint[RNG_KEY] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint[RNG_KEY]["cuda"] = torch.cuda.get_rng_state_all()
        if self.noise_stream is not None and self.noise_stream.state is not None:
            checkpoint[self.noise_stream_key] = self.noise_stream.state_dict()
        checkpoint.update(self.class_names_record())

    # Lightning restores ``ckpt_path`` (calling on_load_checkpoint) after ``setup`` and before these
    # hooks, so reading here is what skips the source whenever a checkpoint is restored. Callbacks'
    # ``on_fit_start`` runs before the module's: a callback that needs the loaded weights reads them
    # from ``on_train_start`` on.
    def on_fit_start(self) -> None:
        self.load_pretrained_weights()
        if self.noise_stream is not None:
            self.noise_stream.start_fit()

    def on_validation_start(self) -> None:
        self.load_pretrained_weights()

    def on_test_start(self) -> None:
        self.load_pretrained_weights()

    def on_predict_start(self) -> None:
        self.load_pretrained_weights()

    # -- shared ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        networks = self.networks()
        check_groups_cover(self, [group for network in networks for group in network.groups])
        configs = [build_optimizer(network) for network in networks]
        if not self.automatic_optimization:
            # Lightning ignores (and warns about) `monitor` under manual optimisation: step_schedulers keeps it
            schedulers = [config["lr_scheduler"] for config in configs if "lr_scheduler" in config]
            self._scheduler_monitors = [(config["scheduler"], config.pop("monitor")) for config in schedulers]
        if len(configs) == 1:
            return configs[0] if "lr_scheduler" in configs[0] else configs[0]["optimizer"]
        return configs

    def step_schedulers(self, interval: str) -> None:
        """Step every scheduler configured for ``interval`` (manual optimisation; Lightning does it otherwise)."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitor = config.monitor or next(
                    (name for scheduler, name in self._scheduler_monitors if scheduler is config.scheduler), None
                )
                metric = self.trainer.callback_metrics.get(monitor) if monitor else None
                if metric is None:
                    if not self._validated:  # nothing validated yet, e.g. before the first validation epoch
                        continue
                    raise ValueError(
                        f"ReduceLROnPlateau of {config.name or 'a scheduler'!r} monitors {monitor!r}, which this run "
                        f"does not log (logged: {sorted(self.trainer.callback_metrics)}). Set the module's "
                        "scheduler_monitor to one of them."
                    )
                config.scheduler.step(metric)
            else:
                config.scheduler.step()

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            self.step_schedulers("epoch")

    def check_input(self, x: torch.Tensor) -> None:
        """Fail early, with the fix, when a batch has another channel count than the model."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects images (B, {self.in_channels}, H, W) but got {tuple(x.shape)}. "
                f"Set the datamodule's channels={self.in_channels} or the model's "
                f"in_channels={x.shape[1] if x.ndim == 4 else '?'}."
            )

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        self._adopt_class_names(getattr(dm, "class_names", None))
        channels = getattr(dm, "channels", self.in_channels)
        if channels != self.in_channels:
            raise ValueError(
                f"Channel mismatch: {type(dm).__name__} yields {channels}-channel images, {type(self).__name__} "
                f"was built for in_channels={self.in_channels}. Set one to match the other "
                "(the CLI links them: pass --data.channels only)."
            )
        classes = getattr(dm, "num_classes", self.num_classes)
        if self.num_classes is not None and classes != self.num_classes:
            raise ValueError(
                f"num_classes mismatch: {type(dm).__name__} has {classes} classes, {type(self).__name__} was built "
                f"with num_classes={self.num_classes}. Build the model with num_classes={classes} "
                "(the CLI links it from the datamodule)."
            )
