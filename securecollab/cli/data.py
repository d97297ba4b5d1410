"""`securecollab make-npz`: a MedMNIST-shaped archive made from the embedded digits, for `--dataset npz`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from securecollab.cli.options import Seed
from securecollab.cli.output import console

app = typer.Typer()


@app.command("make-npz")
def make_npz(
    out: Annotated[Path, typer.Argument(help="The .npz file to write.")] = Path("results/digits28.npz"),
    size: Annotated[int, typer.Option(min=8, max=256, help="Image side in pixels (MedMNIST: 28).")] = 28,
    channels: Annotated[int, typer.Option(min=1, max=3, help="1 (gray, as OrganAMNIST) or 3 (RGB, as PathMNIST).")] = 1,
    seed: Seed = 0,
):
    """Write the digits resized to SIZE x SIZE in MedMNIST's archive format (uint8 images, (n, 1) labels, its own
    train/test split): MedMNIST's shape for `--dataset npz --dataset-path OUT` where the real archives cannot be
    downloaded."""
    from securecollab.data import load_npz, write_medmnist_shaped
    try:
        path = write_medmnist_shaped(out, size=size, channels=channels, seed=seed)
    except ValueError as e:  # --channels 2
        raise typer.BadParameter(str(e)) from None
    ds = load_npz(path)
    console.print(f"wrote {path}: {len(ds.x_train)} train and {len(ds.x_test)} test images of shape "
                  f"{ds.input_shape}, {ds.num_classes} classes")
