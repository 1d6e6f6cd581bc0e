"""``lit-finetune``: LightningCLI over every module and datamodule of the package.

lit-finetune fit  --config configs/classifier/pretrain_source.yaml
lit-finetune fit  --config configs/classifier/finetune_target.yaml --model.pretrained <ckpt>
lit-finetune test --config configs/classifier/finetune_target.yaml --ckpt_path <ckpt>
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import lit_finetune.callbacks  # noqa: F401  (registers LayerFreezing, LRWarmup... for --trainer.callbacks)
import lit_finetune.data  # noqa: F401  (registers the datamodules for --data)
from lit_finetune.data.base import DatasetNotFoundError, ImageDataModule
from lit_finetune.metrics import ExtractorNotFoundError
from lit_finetune.modules.base import TransferModule
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
    """

    def instantiate_classes(self) -> None:
        # jsonargparse reports a failed instantiation as "does not validate against any of the Union
        # subtypes" followed by the whole namespace; a missing dataset is the user's to fix, so show
        # its own message (which names the path) instead
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = err
            while cause is not None and not isinstance(cause, DatasetNotFoundError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")


def cli_main(args: list[str] | None = None, run: bool = True) -> LitFinetuneCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line."""
    return LitFinetuneCLI(
        TransferModule,
        ImageDataModule,
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
