"""Speed and memory benchmark: this trainer against the diffusers-style reference loop and the compute floor.

`python -m bench --help`; see bench/README.md. This package is a measuring tool, so unlike the rest of the
project outside lora_core it imports torch and diffusers directly.
"""
