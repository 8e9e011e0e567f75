"""`python -m bench.compile_summary DIR`: the table of bench/compile_cpu.sh's runs (s/step and first-compile
seconds of every phase, with the load average), one line per phase."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def lines(folder: Path) -> list[str]:
    rows = [f"{'run':<18} {'phase':<15} {'s/step':>8} {'spread':>7} {'1st window +s':>13}  load start -> end"]
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        run = json.loads(path.read_text())
        machine = run.get("machine", {})
        load = f"{machine.get('load_average')} -> {machine.get('load_average_end')}"
        for name, phase in run.get("phases", {}).items():
            if "error" in phase:
                rows.append(f"{path.stem:<18} {name:<15} FAILED: {phase['error'][:120]}")
                continue
            extra = phase.get("first_window_extra_s")
            rows.append(f"{path.stem:<18} {name:<15} {phase['s_per_step']:>8.4f} {phase['spread']:>7.1%} "
                        f"{'' if extra is None else f'{extra:.1f}':>13}  {load}")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("\n".join(lines(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
