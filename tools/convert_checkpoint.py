#!/usr/bin/env python3
"""Megatron AdaMoE checkpoints <-> Hugging Face (``export-hf``, ``import-hf``); see
megatron_adamoe/hf/cli.py, or run with --help. Also installed as ``adamoe-convert``."""

import sys

from megatron_adamoe.hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
