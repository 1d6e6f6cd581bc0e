"""``lit-finetune``: LightningCLI over every module and datamodule of the package.

lit-finetune fit  --config configs/classifier/pretrain_source.yaml
lit-finetune fit  --config configs/classifier/finetune_target.yaml --model.pretrained <ckpt>
lit-finetune test --config configs/classifier/finetune_target.yaml --ckpt_path <ckpt>
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

import lit_finetune.callbacks  # noqa: F401  (registers LayerFreezing, LRWarmup... for --trainer.callbacks)
import lit_finetune.data  # noqa: F401  (registers the datamodules for --data)
from lit_finetune.compress.export import ExportError
from lit_finetune.data.base import DatasetNotFoundError
from lit_finetune.metrics import ExtractorNotFoundError
from lit_finetune.modules.base import TransferModule
from lit_finetune.modules.loading import checked_module_class, read_hparams
from lit_finetune.transfer.pretrained import PretrainedLoadError
from lit_finetune.zoo import ZooError


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Write the resolved config where each run's files live, and push it to W&B.

    Lightning's default writes ``config.yaml`` to ``trainer.log_dir``; for W&B that directory is
    shared by every run, so a second run fails unless told to overwrite. Here W&B runs get the
    config in their own run directory and in the run's config; other loggers keep their
    versioned log directory.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for logger in wandb_loggers:
            config = self.parser.dump(self.config, skip_none=False, format="yaml")
            run_dir = Path(logger.experiment.dir)
            (run_dir / "lit_finetune_config.yaml").write_text(config)
            # push the dump, not ``self.config``: the raw namespace holds link targets (num_classes,
            # in_channels, image_size) at their unlinked defaults, e.g. num_classes=None
            logger.experiment.config.update({"cli": yaml.safe_load(config)}, allow_val_change=True)


class LitFinetuneCLI(LightningCLI):
    """LightningCLI with data-to-model links and the package's defaults.

    ``num_classes``, ``channels`` and ``image_size`` are read from the datamodule and passed to
    the model, so a config states them once (under ``data``).

    With ``--ckpt_path``, Lightning rebuilds the model from the checkpoint's hyper-parameters, over
    whatever the config and the command line said. Here the module's ``runtime_options`` (paths of
    outside networks, evaluation switches) given in the config or on the command line win, and every
    other given option the checkpoint overrode is named on stderr.
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        self._args = args  # parsed again without defaults when --ckpt_path rebuilds the model
        # LightningCLI next reads ``--ckpt_path``'s hyper-parameters and imports the class their ``_class_path``
        # names (to rebuild the model); check it first, so a checkpoint can only name a lit_finetune module
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            role = "checkpoint (--ckpt_path)"
            checked_module_class(read_hparams(Path(ckpt_path), role, required=False), f"The {role} {ckpt_path!r}")

    def instantiate_classes(self) -> None:
        # jsonargparse reports a failed instantiation as "does not validate against any of the Union
        # subtypes" followed by the whole namespace; a missing dataset or exported model is the user's to
        # fix, so show its own message (which names the path) instead
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = err
            while cause is not None and not isinstance(cause, (DatasetNotFoundError, ExportError)):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def _parse_ckpt_path(self) -> None:
        given = self._given_model_options()
        super()._parse_ckpt_path()
        if given:
            self._reconcile_with_checkpoint(given)

    def _given_model_options(self) -> dict[str, Any]:
        """The model's init arguments set in a config file or on the command line (not defaults), when
        ``--ckpt_path`` names a checkpoint file whose hyper-parameters will replace them."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return {}
        args = self._args
        parse = self.parser.parse_object if isinstance(args, (dict, Namespace)) else self.parser.parse_args
        init_args = parse(args, defaults=False).get(f"{subcommand}.model.init_args")
        return dict(vars(init_args)) if init_args else {}

    def _reconcile_with_checkpoint(self, given: dict[str, Any]) -> None:
        """Put the given ``runtime_options`` back over the checkpoint's values; name every other override."""
        model = self.config[self.config["subcommand"]].model
        module_path, _, name = str(model.class_path).rpartition(".")
        # only this package's modules are looked up: a checkpoint must not choose what gets imported
        runtime: tuple[str, ...] = ()
        if module_path.split(".")[0] == __name__.split(".")[0]:
            runtime = getattr(getattr(importlib.import_module(module_path), name, None), "runtime_options", ())
        for key, value in given.items():
            # ``pretrained`` is a record in a checkpoint, never read when it is restored
            if key == "pretrained" or key not in model.init_args or model.init_args[key] == value:
                continue
            stored = model.init_args[key]
            if key in runtime:
                model.init_args[key] = value
                _note(f"--ckpt_path: {key}={value!r} as given (the checkpoint has {stored!r})")
            else:
                _note(
                    f"--ckpt_path: {key}={stored!r} from the checkpoint overrides the given {value!r} (it shapes "
                    "the network or its training; set it when training, not when restoring)"
                )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")


@rank_zero_only
def _note(message: str) -> None:
    sys.stderr.write(f"lit-finetune: {message}\n")


def cli_main(args: list[str] | None = None, run: bool = True) -> LitFinetuneCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line."""
    return LitFinetuneCLI(
        TransferModule,
        # any LightningDataModule, not only ImageDataModule: EpisodicDataModule wraps one (meta-learning); the
        # links above need num_classes, channels and image_size, which every datamodule of the package has
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [{"class_path": "lit_finetune.checkpoint_io.AtomicCheckpointIO"}]},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main() -> None:
    """Console entry point: errors the user fixes (a missing dataset, pretrained file or feature extractor)
    without a traceback."""
    try:
        cli_main()
    except (DatasetNotFoundError, PretrainedLoadError, ExtractorNotFoundError, ZooError) as err:
        sys.stderr.write(f"lit-finetune: error: {err}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
