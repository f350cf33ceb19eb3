"""CPU numerics profiles: which code paths torch and MKL take, pinned before torch is imported.

The same recipe on two CPU generations gave four different `model.safetensors` on one Intel
machine (issue 25), only because ATen's kernels and MKL's GEMM dispatch on the instruction set
the CPU reports (AVX2, AVX-512, AMX) and on its cache sizes and core count. A profile fixes all of
that before the first torch op, in every process the chain starts (the `omp` entry point pins its
own environment; torchrun, DeepSpeed, torchft and Ray workers inherit it or get it explicitly):

    portable    ATen kernels at AVX2 (ATEN_CPU_CAPABILITY=avx2), MKL's Conditional Numerical
                Reproducibility branch AVX2 (MKL_CBWR=AVX2: fixed cache sizes, deterministic
                reductions, static scheduling), MKL_DYNAMIC=FALSE, oneDNN at most AVX2
                (ONEDNN_MAX_CPU_ISA), a fixed thread count (OMP/MKL_NUM_THREADS, torch threads).
                Intel documents the AVX2 branch as giving the same results on every *Intel* CPU
                with AVX2 (oneMKL developer guide, "Getting Started with Conditional Numerical
                Reproducibility"); on other vendors MKL runs its AUTO branch instead (measured on an
                AMD EPYC: MKL_VERBOSE reports CNR:AUTO). `mkl_cnr` in the record says which ran.
    compatible  as portable, but MKL's COMPATIBLE branch (SSE2 without rcpps/rsqrtps): the one MKL
                branch that is the same on Intel and AMD; ~2.4x slower GEMMs (bench/throughput.py).
    native      nothing pinned: today's fastest paths, bitwise only on the same CPU model; the
                record says so, and `omp recreate` compares with a tolerance across machines.

No torch import at module level: `enter()` must run before torch is loaded.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
import tempfile
from functools import lru_cache

from pipeline.core.errors import PipelineError

PROFILES = ("portable", "compatible", "native")
PROFILE_VAR = "PIPELINE_NUMERICS"   # the profile in force, for child processes and the record
ISA_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_DYNAMIC", "ONEDNN_MAX_CPU_ISA")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class NumericsError(PipelineError):
    """The numerics a profile pins cannot be put in force in this process."""


def pinned_env(profile: str, threads: int) -> dict[str, str]:
    """The environment `profile` pins for a process running `threads` intra-op threads."""
    if profile not in PROFILES:
        raise NumericsError(f"platform.numerics: {profile!r} is not one of {', '.join(PROFILES)}")
    if profile == "native":
        return {PROFILE_VAR: "native"}
    return {PROFILE_VAR: profile,
            "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_CBWR": "AVX2" if profile == "portable" else "COMPATIBLE",
            "MKL_DYNAMIC": "FALSE",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _norm(var: str, value: str) -> str:
    v = value.strip()
    return v.upper().replace(" ", "") if var in ("MKL_CBWR", "MKL_DYNAMIC", "ONEDNN_MAX_CPU_ISA") else \
        v.lower() if var == "ATEN_CPU_CAPABILITY" else v


def conflicts(want: dict[str, str], env=None) -> list[str]:
    env = os.environ if env is None else env
    return [f"{k}={env[k]} (the profile pins {v})" for k, v in want.items()
            if k in env and _norm(k, env[k]) != _norm(k, v)]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def enter(profile: str, threads: int, where: str = "recipe") -> dict[str, str]:
    """Put `profile` in force for this process and the processes it starts.

    Before torch is imported: the pins go into os.environ (a conflicting value already there is an
    error naming it). If torch is already loaded (a test process, a notebook), its environment must
    already hold the pins: torch and MKL read them once, at load. Returns the pinned variables.
    """
    want = pinned_env(profile, threads)
    # a process started by one of ours inherits the pins; its thread count is its own (a torchrun
    # worker runs fewer threads than its launcher), so only a first entry checks the thread variables
    inherited = os.environ.get(PROFILE_VAR) == profile
    bad = conflicts({k: v for k, v in want.items() if not (inherited and k in THREAD_VARS)})
    if bad:
        raise NumericsError(f"{where}: platform.numerics {profile} conflicts with the environment: "
                            f"{'; '.join(bad)}. Unset them, or set platform.numerics: native to run with "
                            "whatever the environment says (bitwise only on this CPU model)")
    if profile != "native" and platform.machine() in ("x86_64", "AMD64"):
        flags = cpu_flags()
        if flags and not {"avx2", "fma"} <= flags:
            raise NumericsError(f"{where}: platform.numerics {profile} needs a CPU with AVX2 and FMA; this one "
                                "has neither: use platform.numerics: native (results then match only this CPU kind)")
    if "torch" in sys.modules and profile != "native":
        missing = [k for k in ISA_VARS if k not in os.environ]
        if missing:
            raise NumericsError(f"{where}: platform.numerics {profile}: torch was imported before the profile "
                                f"was applied ({', '.join(missing)} unset at load); start the process through "
                                "`omp`, or export the variables pipeline.core.numerics.pinned_env() lists first")
    os.environ.update(want)
    if "torch" in sys.modules:
        set_threads(profile, threads)
    return want


def set_threads(profile: str, threads: int) -> None:
    import torch

    if profile != "native" and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_for(recipe, stage: str | None = None) -> int | None:
    """Intra-op threads of one process of `stage`: the one formula of the tree.

    pretrain workers: pretrain.threads, else platform.threads split over the world size (native:
    the cores split over it, as before profiles existed). Other stages: platform.threads (native:
    None, torch's own default)."""
    plat = recipe.platform
    if stage == "pretrain":
        cfg = recipe.pretrain
        ws = cfg.distributed.world_size
        if cfg.threads:
            return cfg.threads
        return max(1, (cpu_cores() if plat.numerics == "native" else plat.threads) // ws)
    return None if plat.numerics == "native" else plat.threads


def enter_recipe(recipe, stage: str | None = None, where: str | None = None) -> dict[str, str]:
    """`enter` with the recipe's profile and the stage's thread count."""
    threads = threads_for(recipe, stage)
    return enter(recipe.platform.numerics, threads or cpu_cores(), where or f"{getattr(recipe, '_path', '<recipe>')}")


def current_profile() -> str:
    return os.environ.get(PROFILE_VAR, "native")


def child_env(threads: int, base: dict | None = None) -> dict[str, str]:
    """The environment for a worker process that runs `threads` threads under this process's profile."""
    env = dict(os.environ if base is None else base)
    prof = current_profile()
    env.update(pinned_env(prof, threads) if prof != "native" else {"OMP_NUM_THREADS": str(threads)})
    return env


@lru_cache(maxsize=1)
def mkl_branch() -> str | None:
    """The CNR branch MKL reports for one SGEMM in this process (OFF, AUTO, AVX2, COMPATIBLE, ...),
    read from MKL's own verbose line; None where torch has no MKL."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile() as f:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                torch.mm(torch.ones(8, 8), torch.ones(8, 8))
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        text = f.read().decode("utf-8", "replace")
    m = re.search(r"CNR:(\S+)", text)
    return m.group(1) if m else "unknown"


def _config_version(pattern: str) -> str | None:
    import torch

    m = re.search(pattern, torch.__config__.show())
    return m.group(1).strip() if m else None


def in_force() -> dict:
    """What decides the bits of torch math in this process: machine-independent under portable
    (so it can sit in hashed provenance), the CPU's own choices under native."""
    import torch

    rec = {"profile": current_profile(),
           # the thread variables are left out: `threads` is what torch runs (a test process and an
           # `omp` process may start with other values and set the same count)
           "pins": {k: os.environ[k] for k in ISA_VARS if k in os.environ},
           "torch": torch.__version__,
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(),
           "mkl": _config_version(r"Math Kernel Library Version ([0-9.]+)"),
           "onednn": _config_version(r"MKL-DNN v([0-9.]+)"),
           "mkl_cnr": mkl_branch()}
    if torch.cuda.is_available():
        rec["cuda"] = cuda_info()
    return rec


def cuda_info() -> dict:
    """GPU model and library versions: what a CUDA result depends on (README: what is promised)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        info["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
    except Exception:  # noqa: BLE001 - informational only
        info["driver"] = None
    if info["driver"] is None:
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    try:
        info["cublas"] = torch._C._cuda_getCompiledVersion()   # the CUDA toolkit torch was built with
    except Exception:  # noqa: BLE001
        pass
    return info


def machine() -> dict:
    """The CPU this ran on, for information only: kept apart from every hashed output (timings rule)."""
    model, vendor = None, None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("vendor_id") and vendor is None:
                    vendor = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = cpu_flags()
    return {"cpu_model": model or platform.processor() or None, "vendor": vendor, "machine": platform.machine(),
            "isa": sorted(f for f in flags if f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                                     "amx_tile", "amx_bf16", "amx_int8")),
            "cores": os.cpu_count()}


def compare(recorded: dict | None, here: dict) -> tuple[str, list[str]]:
    """(expectation, differing fields) of a recorded numerics record against this process's.

    expectation: "bitwise" (same profile and pins, capability, MKL branch and versions),
    "bitwise-same-cpu" (native with all of those equal: bitwise on the same CPU model only),
    "tolerance" (anything that decides the bits differs)."""
    if not recorded:
        return "tolerance", ["the lineage records no numerics (made before profiles existed)"]
    diffs = []
    for key in ("profile", "torch", "torch_cpu_capability", "threads", "mkl", "onednn", "mkl_cnr"):
        if recorded.get(key) != here.get(key):
            diffs.append(f"{key}: recorded {recorded.get(key)!r}, here {here.get(key)!r}")
    if (recorded.get("pins") or {}) != (here.get("pins") or {}):
        diffs.append(f"pins: recorded {recorded.get('pins')}, here {here.get('pins')}")
    if diffs:
        return "tolerance", diffs
    # native pins nothing: the same ISA and MKL branch on another CPU model may still round differently
    return ("bitwise-same-cpu" if recorded.get("profile") == "native" else "bitwise"), diffs
