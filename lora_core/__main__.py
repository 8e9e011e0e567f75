"""`python -m lora_core schema [PATH]`: regenerate config_schema.json from the configuration model."""

import sys

from lora_core.config import write_schema

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "schema":
        sys.exit("usage: python -m lora_core schema [PATH]")
    write_schema(sys.argv[2] if len(sys.argv) > 2 else "config_schema.json")
