"""csrc/ compiles for sm_80 and sm_90a (the two ends of the default arch list): a compile error
fails CI even on a machine without a GPU.

Object files only (no link, nothing runs): nvcc for the .cu files, the host compiler for the
.cpp, with the include paths torch's build would use. Needs nvcc and a CUDA build of torch (a
CPU-only torch wheel lacks the c10/cuda configuration headers); skips, saying which is missing,
otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cpp"))


def _toolchain():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: cannot compile csrc/ (no CUDA toolkit on this machine)")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: its headers lack the CUDA parts csrc/ includes")
    cuda_home = Path(nvcc).resolve().parents[1]
    torch_inc = Path(torch.__file__).parent / "include"
    includes = [torch_inc, torch_inc / "torch" / "csrc" / "api" / "include", cuda_home / "include",
                Path(sysconfig.get_paths()["include"]), ROOT / "csrc"]
    return nvcc, [f"-I{p}" for p in includes]


def _compile(args) -> tuple[str, int, str]:
    source, cmd = args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return source, proc.returncode, proc.stdout + proc.stderr


def test_csrc_compiles_for_sm80_and_sm90a(tmp_path):
    nvcc, includes = _toolchain()
    assert SOURCES, "csrc/ has no sources"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    jobs = []
    for i, source in enumerate(SOURCES):
        out = str(tmp_path / f"{i}.o")
        if source.endswith(".cu"):
            cmd = [nvcc, "-c", "-std=c++20", "-O3", "-DNDEBUG", "-gencode=arch=compute_80,code=sm_80",
                   "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", abi, *includes, source,
                   "-o", out]
        else:
            cmd = ["c++", "-c", "-std=c++20", "-O3", "-DNDEBUG", "-fPIC", abi, *includes, source, "-o", out]
        jobs.append((source, cmd))
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [(s, log) for s, rc, log in pool.map(_compile, jobs) if rc != 0]
    assert not failures, "\n\n".join(f"{s} failed to compile:\n{log[-3000:]}" for s, log in failures)
