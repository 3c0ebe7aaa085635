"""Devices by name: which one `auto` means here, how much memory it has, and whether a requested one exists.

torch is imported inside the functions, so commands that never compute (validate, nodes) never import it.
"""

from __future__ import annotations

import os
import re
import sys

from nodegraph.sizes import OptionError

# Without any of these (NVIDIA's driver and devices, ROCm's, WSL's GPU) torch finds no GPU on Linux either.
_GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def device_kind(device: str) -> str:
    return "cpu" if device == "cpu" else "gpu"


def resolve_device(device: str) -> str:
    """`auto`: the first CUDA GPU, else Apple's MPS, else the CPU; `cuda` means `cuda:0`.

    Only `auto` asks torch (seconds to import), and not on Linux with no GPU driver at all: there it is the
    CPU, so that `nodegraph validate` never needs torch.
    """
    if device != "auto":
        return "cuda:0" if device == "cuda" else device
    if sys.platform.startswith("linux") and not any(map(os.path.exists, _GPU_DRIVER_FILES)):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def device_memory(device: str) -> int:
    """Total memory of a device in bytes (RAM for the CPU)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    if device == "mps":
        import torch

        return int(torch.mps.recommended_max_memory())
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_present(requested: str, option: str, flag: str) -> None:
    if requested in ("auto", "cpu"):
        return
    import torch

    if requested == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise OptionError(f"{option} 'mps': Apple's MPS is not available on this machine; use {flag} cpu, or auto")
        return
    if not torch.cuda.is_available():
        why = ("this PyTorch was built without CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        raise OptionError(f"{option} {requested!r}: {why}; use {flag} cpu, or auto to take a GPU when there is one")
    count = torch.cuda.device_count()
    if int(requested.partition(":")[2] or 0) >= count:
        raise OptionError(f"{option} {requested!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")


def check_name(device: str, option: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise OptionError(f"unknown {option} {device!r}: use auto, cpu, cuda, cuda:N or mps")
