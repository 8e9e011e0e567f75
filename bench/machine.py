"""What the benchmark ran on: the machine, its load and the library versions, written beside every figure."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from bench.measure import GIB

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the "% of peak" figure.
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]


def machine(device: torch.device) -> dict:
    info: dict = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
                  "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "load_average": [round(x, 2) for x in os.getloadavg()]}
    for package in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
        info["bf16_peak_tflops"] = next((peak for name, peak in BF16_PEAK_TFLOPS if name in props.name), None)
    else:
        info["cpu"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
