"""Stage ``env``: the device, driver and library versions, and two measured ceilings (bf16 matrix product rate,
device-to-device copy bandwidth) that the other stages' figures are compared against."""
from __future__ import annotations

import importlib
import logging
import os
import platform
import shutil
import subprocess
import sys

from benchmarks.gpu_stages import _common as C
from benchmarks.gpu_stages.peaks import lookup

_logger = logging.getLogger(__name__)

# import name -> distribution name (versions are read from the installed metadata: no import needed)
LIBRARIES = {"torch": "torch", "triton": "triton", "transformers": "transformers", "open_clip": "open_clip_torch",
             "peft": "peft", "timm": "timm", "tokenizers": "tokenizers", "huggingface_hub": "huggingface_hub"}


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name, dist in LIBRARIES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            try:
                out[name] = str(importlib.import_module(name).__version__)
            except Exception as err:  # noqa: BLE001 - a missing library is a finding, not a crash
                out[name] = f"unavailable ({type(err).__name__})"
    return out


def driver_version() -> str | None:
    """The NVIDIA driver version (NVML if importable, else nvidia-smi)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as err:  # noqa: BLE001 - fall back to the command-line tool
        _logger.info("NVML unavailable (%s); asking nvidia-smi", err)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15, check=False)
            return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            return None
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def matmul_tflops(device: str, n: int, dtype) -> float:
    """Achieved TFLOP/s of one ``n x n x n`` matrix product (do_bench median on CUDA, wall clock on CPU)."""
    import torch

    from benchmarks import _harness as H

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = H.time_ms(lambda: a @ b, device)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    C.setup_logging()
    res = C.StageResult(args.result, args.deadline)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    res.set("libraries", {**library_versions(), "torch": torch.__version__})
    res.set("host", {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                     "executable": sys.executable})
    info = {"device": device, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to torch (torch.cuda.is_available() is False)")
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1), driver=driver_version())
        peak = lookup(props.name)
        info["datasheet"] = ({"key": peak.key, "bf16_tflops": peak.bf16_tflops, "hbm_gbps": peak.hbm_gbps}
                             if peak else None)
    else:
        info.update(name=f"{cpu_name()} (dry run, no GPU)", driver=None, datasheet=None)
    res.set("device", info)

    measured: dict[str, float] = {}
    sizes = {"bf16": 8192, "fp32": 4096} if device == "cuda" else {"bf16": 128, "fp32": 128}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        value = C.guarded(res, "errors", f"matmul {label}",
                          lambda dtype=dtype, label=label: {"v": matmul_tflops(device, sizes[label], dtype)})
        if value:
            measured[f"matmul_{label}_tflops"] = round(value["v"], 2)
            res.set("measured", measured)
    if device == "cuda":
        from benchmarks import bench_pooling as BP

        value = C.guarded(res, "errors", "copy bandwidth", lambda: {"v": BP.copy_gbps()})
        if value:
            measured["copy_gbps"] = round(value["v"], 1)
    res.set("measured", measured)
    res.finish()


if __name__ == "__main__":
    main()
