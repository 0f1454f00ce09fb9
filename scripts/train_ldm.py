#!/usr/bin/env python
"""Entry point: ``accelerate launch scripts/train_ldm.py --config ...`` (see :mod:`ldm_vae.training.train_ldm`)."""

import sys

from ldm_vae.training.train_ldm import cli

if __name__ == "__main__":
    sys.exit(cli())
