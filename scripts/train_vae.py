#!/usr/bin/env python
"""Entry point: ``accelerate launch scripts/train_vae.py --config ...`` (see :mod:`ldm_vae.training.train_vae`)."""

import sys

from ldm_vae.training.train_vae import cli

if __name__ == "__main__":
    sys.exit(cli())
