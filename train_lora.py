#!/usr/bin/env python3
"""Train a Stable Diffusion LoRA from a JSON config; stdout carries JSON-lines events and nothing else.

The documented command; the engine's own entry point is `python -m lora_core train` (lora_core/cli.py),
which takes the same options, prints the same events and exits with the same codes.
"""

import sys

from lora_core.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python train_lora.py"))
