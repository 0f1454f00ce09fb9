#!/usr/bin/env python
"""Mutation check of the autoencoder recipe: each known defect is applied to a copy of the package, and the
recipe's tests must fail for every one of them.

    python scripts/mutate_recipe.py          # about 10 s per mutation on a 2-core CPU

The mutations are the defects public VAE scripts have, or that a refactor of the trainer could bring in
(issue 12's mutation run). Prints CAUGHT or MISSED per mutation and exits 1 if any is missed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_recipe.py", "tests/test_losses.py"]
VAE, LOSSES = "ldm_vae/training/train_vae.py", "ldm_vae/losses.py"
GAN_TERM, D_LOSS = "d_weight * factor * g", "loss = self.disc_factor_at(step) * d_loss"
SCALER_STEP = '            scaler.step(getattr(optimizer, "optimizer", optimizer))'
ADAPTIVE = "d_weight = self.adaptive_weight(nll, g, last_layer)"
NLL_WITHOUT_LPIPS = (
    "d_weight = self.adaptive_weight((pixel / torch.exp(self.logvar) + self.logvar).sum() / pixel.shape[0]"
    " if reg.pixel_reduction == 'sum' else (pixel / torch.exp(self.logvar) + self.logvar).mean(), g, last_layer)"
)
# (what goes wrong, file, text, replacement)
MUTATIONS = [
    ("learned logvar left out of the optimizer", VAE, "] + self.loss_fn.trainable_parameters()", "]"),
    (
        "adaptive weight on the wrong layer",
        VAE,
        "self.model.last_layer, step",
        "self.model.decoder.conv_in.weight, step",
    ),
    (
        "discriminator optimizer ignores the config",
        VAE,
        "self.opt_d = build_optimizer(self.disc.parameters(), cfg.optim, lr_d)",
        "self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=lr_d)",
    ),
    (
        "discriminator left in eval mode",
        VAE,
        "        return [model, disc]\n",
        "        self.disc.eval()\n        return [model, disc]\n",
    ),
    (
        "posterior mean instead of a sample",
        VAE,
        "sample_posterior=True, generator=generator)",
        "sample_posterior=False, generator=generator)",
    ),
    ("generator-side disc_factor removed", LOSSES, GAN_TERM, "d_weight * g"),
    ("generator-side disc_factor applied twice", LOSSES, GAN_TERM, "d_weight * factor * factor * g"),
    ("discriminator-side disc_factor removed", LOSSES, D_LOSS, "loss = d_loss"),
    (
        "LPIPS averaged over pixels in KL mode",
        LOSSES,
        "rec = pixel + cfg.perceptual_weight * perceptual",
        "rec = pixel + cfg.perceptual_weight * perceptual / pixel[0].numel()",
    ),
    ("LPIPS left out of the adaptive weight's nll", LOSSES, ADAPTIVE, NLL_WITHOUT_LPIPS),
    (
        "generator gradients reach the discriminator",
        VAE,
        "        self.disc.requires_grad_(False)\n",
        "        pass\n",
    ),
    (
        "fp16 scale updated after each optimizer (as Accelerate's wrapper does)",
        VAE,
        SCALER_STEP + "\n        scaler.update()",
        SCALER_STEP + "\n            scaler.update()",
    ),
]


def main() -> int:
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        for part in ("ldm_vae", "tests", "scripts"):
            shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", copy)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        for name, file, old, new in MUTATIONS:
            path = copy / file
            source = path.read_text()
            if source.count(old) != 1:
                print(f"{name}: the text to mutate is not in {file} exactly once; update this script")
                return 2
            path.write_text(source.replace(old, new))
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                    cwd=copy,
                    env=env,
                    capture_output=True,
                    text=True,
                )
            finally:
                path.write_text(source)
            failed = [
                line.split("::")[-1] for line in result.stdout.splitlines() if line.startswith("FAILED")
            ]
            caught = result.returncode != 0
            missed += not caught
            print(
                f"{'CAUGHT' if caught else 'MISSED'}  {name}"
                + (f"  ({failed[0].split()[0]})" if failed else "")
            )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
