"""Write generated images of a trained generative module as PNG files plus one grid.

    lit-finetune-sample --ckpt_path runs/dcgan/finetune/checkpoints/last.ckpt --num 64 --out samples/
    python -m lit_finetune.sample --ckpt_path ... --num 100 --labels 0 1 2 --out samples/

Works for every module of the package with ``sample(n, labels=None)`` (``DCGAN``; the VAE too).
The checkpoint is read with ``weights_only=True``; its module class must be one of this package's
(named in the checkpoint's hyper-parameters as ``_class_path``). The pretrained source the module
was fine-tuned from is never needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from lit_finetune.modules.loading import CheckpointLoadError, load_module_checkpoint


def load_module(ckpt_path: str | Path):
    """The generative LightningModule saved in ``ckpt_path``, in eval mode on the CPU."""
    module = load_module_checkpoint(ckpt_path, role="checkpoint")
    if not hasattr(module, "sample"):
        raise CheckpointLoadError(
            f"{type(module).__name__} cannot generate images (it has no sample()); use a generative module's checkpoint."
        )
    return module


def check_labels(module, labels: list[int] | None) -> None:
    """``--labels`` must name classes of a conditional module: a ``ValueError`` saying which are wrong."""
    if not labels:
        return
    num_classes = getattr(module, "num_classes", None)
    if num_classes is None:
        given = " ".join(map(str, labels))
        raise ValueError(f"--labels {given}: {type(module).__name__} is unconditional; drop --labels.")
    wrong = " ".join(str(label) for label in labels if not 0 <= label < num_classes)
    if wrong:
        raise ValueError(f"--labels {wrong}: the generator has {num_classes} classes, labels 0 to {num_classes - 1}.")


def write_samples(
    module, num: int, out: str | Path, labels: list[int] | None = None, seed: int = 0, nrow: int = 10
) -> list[Path]:
    """Generate ``num`` images, write ``out/sample_00000.png``... and ``out/grid.png``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    check_labels(module, labels)
    label_tensor = None
    if labels:
        label_tensor = torch.tensor(labels, dtype=torch.long).repeat(-(-num // len(labels)))[:num]
    images = module.sample(num, labels=label_tensor)
    paths = []
    for i, image in enumerate(images):
        paths.append(out / f"sample_{i:05d}.png")
        save_png(image, paths[-1])
    grid = make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1))
    save_png(grid[:1] if images.shape[1] == 1 else grid, out / "grid.png", value_range=(0, 1))
    return [*paths, out / "grid.png"]


def save_png(image: torch.Tensor, path: Path, value_range: tuple[float, float] = (-1, 1)) -> None:
    """One (C, H, W) image as a PNG: 1-channel images as grayscale (mode ``L``), 3-channel as RGB.

    torchvision's ``save_image`` writes every image as RGB (``make_grid`` triples one channel),
    which makes a grayscale model's samples three times larger and look like colour images.
    """
    if image.shape[0] != 1:
        save_image(image, path, normalize=True, value_range=value_range)
        return
    low, high = value_range
    pixels = ((image[0].float().clamp(low, high) - low) / (high - low) * 255).round().to(torch.uint8)
    Image.fromarray(pixels.cpu().numpy()).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--out", default="samples")
    parser.add_argument("--labels", type=int, nargs="*", help="class labels, cycled (conditional generators)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nrow", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        module = load_module(args.ckpt_path)
        check_labels(module, args.labels)
    except (CheckpointLoadError, ValueError) as err:
        sys.stderr.write(f"lit-finetune-sample: error: {err}\n")
        sys.exit(2)
    paths = write_samples(module, args.num, args.out, args.labels, args.seed, args.nrow)
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")


if __name__ == "__main__":
    main()
