"""``lit-finetune-export``: a classifier checkpoint to an exported file, float or int8.

    lit-finetune-export runs/classifier/finetune_target/checkpoints/best.ckpt model.pt2
    lit-finetune-export best.ckpt model_int8.ts --int8 --config configs/classifier/finetune_target.yaml
    lit-finetune-export best.ckpt model_int8.ts --int8 --config my.yaml -- --data.init_args.root /data

``--int8`` calibrates on the training split (unaugmented) of the datamodule that ``--config`` (a
``lit-finetune`` config) describes; arguments after ``--`` go to that config's parser. The file is then
used by ``load_exported`` or by ``lit-finetune test|predict`` with ``--model lit_finetune.compress.ExportedClassifier
--model.path FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lit_finetune.compress.export import export_model, load_exported
from lit_finetune.compress.quantize import quantize_int8


def calibration_loader(config: str, overrides: Sequence[str] = (), batch_size: int = 64) -> DataLoader:
    """Unaugmented batches of the training split of the datamodule a ``lit-finetune`` config describes.

    Only the config's ``data`` section is read and built (no Trainer, model or seed: building a
    ``LightningCLI`` would also apply the config's ``deterministic`` and ``seed_everything`` process-wide).
    """
    import yaml
    from jsonargparse import ArgumentParser

    import lit_finetune.data  # noqa: F401  (the datamodules a config may name)
    from lit_finetune.data.base import ImageDataModule
    from lit_finetune.data.tensor_dataset import TensorImageDataset, collate_batched

    section = (yaml.safe_load(Path(config).read_text()) or {}).get("data")
    if not isinstance(section, dict):
        raise SystemExit(f"lit-finetune-export: {config} has no data section to take calibration images from.")
    parser = ArgumentParser(prog="lit-finetune-export (data)")
    parser.add_subclass_arguments(ImageDataModule, "data")
    datamodule = parser.instantiate_classes(parser.parse_args(["--data", json.dumps(section), *overrides])).data
    datamodule.setup("fit")
    train = datamodule.train_set
    plain = TensorImageDataset(train.images, train.labels, augment=False)
    return DataLoader(plain, batch_size=batch_size, collate_fn=collate_batched)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="lit-finetune-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_path", help="a classifier checkpoint (.ckpt from lit-finetune fit) or a zoo: name")
    parser.add_argument("output", help="the file to write: .pt2 (torch.export, float) or .ts (TorchScript, float or int8)")
    parser.add_argument("--int8", action="store_true", help="static int8 quantisation for the CPU (needs --config)")
    parser.add_argument("--config", help="a lit-finetune config whose data section gives the calibration images")
    parser.add_argument("--backend", default="x86", help="int8 kernels: x86 (default), fbgemm, onednn, qnnpack (ARM)")
    parser.add_argument("--calibration-batches", type=int, default=None, help="at most this many batches of 64")
    args = parser.parse_args(argv)

    from lit_finetune.modules.classifier import ImageClassifier
    from lit_finetune.modules.loading import load_module_checkpoint

    module = load_module_checkpoint(args.ckpt_path, role="checkpoint (ckpt_path)")
    if not isinstance(module, ImageClassifier):
        parser.error(f"{args.ckpt_path} holds a {type(module).__name__}; lit-finetune-export exports classifiers.")
    model: torch.nn.Module = module
    if args.int8:
        if not args.config:
            parser.error("--int8 calibrates on training images: pass --config, the config the model was fitted with.")
        model = quantize_int8(module, calibration_loader(args.config, overrides), args.backend, args.calibration_batches)
    path = export_model(model, args.output)
    exported = load_exported(path)
    print(f"lit-finetune-export: wrote {path} ({exported.meta['dtype']}, {path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
