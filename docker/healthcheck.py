#!/usr/bin/env python3
"""Docker HEALTHCHECK: the web page answers on its port; a training or other command is healthy while it runs.

The entrypoint records the mode ("web PORT", "train" or "exec") in LORA_STUDIO_MODE_FILE. Exit 0 healthy,
1 unhealthy. Standard library only, so it costs a fraction of a second every interval.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

MODE_FILE = Path(os.environ.get("LORA_STUDIO_MODE_FILE", "/tmp/lora-studio-mode"))


def mode() -> tuple[str, str]:
    try:
        words = MODE_FILE.read_text(encoding="utf-8").split()
    except OSError:
        words = []
    kind = words[0] if words else "web"
    port = words[1] if len(words) > 1 else os.environ.get("PORT", "7860")
    return kind, port


def web_answers(port: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as response:
            return response.status < 500
    except urllib.error.HTTPError as error:  # 401/403 behind a login still means the server is up
        return error.code < 500
    except (OSError, ValueError):
        return False


def main() -> int:
    kind, port = mode()
    if kind != "web":
        return 0  # the container ends when the command does; while it runs it is healthy
    return 0 if web_answers(port) else 1


if __name__ == "__main__":
    sys.exit(main())
