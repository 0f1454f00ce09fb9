#!/usr/bin/env python
"""Entry point: ``python scripts/train_preview.py --config ...`` (see :mod:`ldm_vae.training.train_preview`)."""

import sys

from ldm_vae.training.train_preview import cli

if __name__ == "__main__":
    sys.exit(cli())
