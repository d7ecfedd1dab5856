"""The exact CPU path of the smoke profile: every numeric library on one code path and one thread, so that a run
computes the same bytes on every Linux x86-64 CPU with AVX2 (Intel or AMD, with or without AVX-512).

Most libraries choose their kernels from the environment when they load, before any code of ours runs, so a process
takes this path by being started with `ENVIRONMENT`: `python -m synthgap_helpers.exact COMMAND ...` does that (the
Makefile runs nbval and `make notebooks` so), and the runner starts its kernels so when the profile sets
`exact_cpu: true`. `use_in_process`, called by `config.load`, adds what only the process itself can switch."""

from __future__ import annotations

import os
import platform
import sys

MARKER = "SYNTHGAP_EXACT_CPU"  # set in a process started on the exact path

ENVIRONMENT = {
    MARKER: "1",
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised kernels: the AVX2 build, also where AVX-512 exists
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # whatever still reaches oneDNN (convolutions do not: `use_in_process`)
    "MKL_CBWR": "COMPATIBLE",  # MKL's reproducible branch on Intel and AMD alike (its AVX2 branch is Intel's only)
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "OMP_NUM_THREADS": "1",  # one thread: no reduction is split by the core count
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's and scipy's OpenBLAS: its AVX2 kernels on every CPU (not SkylakeX/Zen)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy's AVX-512 loops
}


def tier() -> str:
    """"exact" where the exact path exists (Linux, x86-64, AVX2: the wheels and kernels the reference was made
    with), else "bands": ARM, macOS, Windows and CPUs without AVX2 get tolerance bands."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "bands"
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    return "exact" if {"avx2", "fma"} <= set(flags) else "bands"


def use_in_process() -> None:
    """In a process started on the exact path, route convolutions around oneDNN (whose blocking follows the CPU's
    cache sizes) to torch's own kernels on MKL's reproducible branch."""
    if os.environ.get(MARKER) != "1":
        return
    import torch

    torch.backends.mkldnn.enabled = False


def main(argv: list[str]) -> int:
    """`python -m synthgap_helpers.exact COMMAND ...`: run COMMAND on the exact path; `... tier`: print the tier."""
    if argv == ["tier"]:
        print(tier())
        return 0
    if not argv:
        print("usage: python -m synthgap_helpers.exact COMMAND [ARG ...]  |  python -m synthgap_helpers.exact tier",
              file=sys.stderr)
        return 2
    os.execvpe(argv[0], argv, {**os.environ, **ENVIRONMENT})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
