"""Build the nunchaku._C CUDA extension in place for a device run (setup.py is the lead's).

Compiles csrc/ with torch.utils.cpp_extension.load for sm_90a only (the H100's target; the
Ampere/Ada kernels are built for it too, and run there in emulation), then copies the shared
library next to nunchaku/ so that `import nunchaku._C` works from the repository root.
Environment: MAX_JOBS (parallel nvcc jobs, default 16), NUNCHAKU_BUILD_DIR (default build/_C),
NUNCHAKU_NVCC_DEFINES (extra space-separated -D flags, e.g. the ablation switches of
csrc/w4a4/sm90/gemm_mainloop.cuh; use a separate NUNCHAKU_BUILD_DIR for each set),
NUNCHAKU_CSRC_DIR (another copy of csrc/ to build instead, e.g. an older kernel for an A/B run),
NUNCHAKU_NO_INSTALL=1 (leave the library in the build directory, do not copy it next to nunchaku/).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    os.environ.setdefault("MAX_JOBS", "16")
    # Only the sm_90a target: wgmma/setmaxnreg do not assemble for plain sm_90.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    from torch.utils.cpp_extension import load

    csrc = (ROOT / os.environ.get("NUNCHAKU_CSRC_DIR", "csrc")).resolve()
    sources = sorted(str(p) for p in csrc.rglob("*") if p.suffix in (".cu", ".cpp"))
    if not sources:
        print(f"no .cu/.cpp sources under {csrc}")
        return 1
    build_dir = Path(os.environ.get("NUNCHAKU_BUILD_DIR", ROOT / "build" / "_C"))
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    mod = load(
        name="_C",
        sources=sources,
        extra_include_paths=[str(csrc)],
        # No -std flag: torch's cpp_extension picks the standard matching its headers.
        extra_cflags=["-O3", "-DNDEBUG"],
        extra_cuda_cflags=[
            "-O3",
            "-DNDEBUG",
            "-gencode=arch=compute_90a,code=sm_90a",
            "--resource-usage",
            "-Xptxas=-warn-spills",
            "-lineinfo",
            *os.environ.get("NUNCHAKU_NVCC_DEFINES", "").split(),
        ],
        build_directory=str(build_dir),
        verbose=True,
    )
    if os.environ.get("NUNCHAKU_NO_INSTALL") == "1":
        print(f"built {mod.__file__} in {time.time() - t0:.1f} s")
        return 0
    target = ROOT / "nunchaku" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copy2(mod.__file__, target)
    print(f"built {mod.__file__} in {time.time() - t0:.1f} s -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
