"""Build llama.cpp's `llama-perplexity`, `llama-quantize` and `llama-imatrix` from the llama.cpp
sources vendored in the `llama-cpp-python` sdist (PyPI is reachable here, GitHub is not).

The build is cached: a second call prints the binary directory and does nothing else.

    python3 benchmarks/build_llamacpp.py [--cache DIR] [--version 0.3.36] [--jobs 2]

Prints the directory holding the binaries on its last line.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

log = logging.getLogger("build_llamacpp")
TARGETS = ("llama-perplexity", "llama-quantize", "llama-imatrix")
DEFAULT_CACHE = Path.home() / ".cache" / "signround" / "llamacpp"


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch_sdist(cache: Path, version: str | None) -> Path:
    """Download the llama-cpp-python source archive (never a wheel) into the cache."""
    found = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if version:
        found = [p for p in found if p.name == f"llama_cpp_python-{version}.tar.gz"]
    if found:
        return found[-1]
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          spec, "-d", str(cache)])
    found = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit("pip download produced no llama_cpp_python sdist; is PyPI reachable?")
    return found[-1]


def extract_llamacpp(sdist: Path, cache: Path) -> Path:
    """Unpack only the vendored llama.cpp tree (vendor/llama.cpp) of the sdist."""
    dest = cache / sdist.name.removesuffix(".tar.gz")
    src = dest / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    with tarfile.open(sdist) as tar:
        # members look like "llama_cpp_python-X/vendor/llama.cpp/..." (skip .git/modules/...)
        members = [m for m in tar.getmembers()
                   if m.name.split("/", 1)[-1].startswith("vendor/llama.cpp/")]
        for m in members:
            m.name = m.name.split("/", 1)[1]
        tar.extractall(dest, members=members, filter="data")
    if not (src / "CMakeLists.txt").exists():
        raise SystemExit(f"{sdist} holds no vendor/llama.cpp tree")
    return src


def build(src: Path, jobs: int) -> Path:
    bdir = src / "build"
    bin_dir = bdir / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    if shutil.which("cmake") is None:
        raise SystemExit("cmake not found; install it (apt-get install cmake) and retry")
    _run(["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=ON"])
    _run(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs),
          "--target", *TARGETS])
    missing = [t for t in TARGETS if not (bin_dir / t).exists()]
    if missing:
        raise SystemExit(f"build finished without {missing}; see the cmake output above")
    return bin_dir


def ensure_llamacpp(cache: Path = DEFAULT_CACHE, version: str | None = None, jobs: int = 2) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    return build(extract_llamacpp(fetch_sdist(cache, version), cache), jobs)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--version", default=None, help="llama-cpp-python version (default newest)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    print(ensure_llamacpp(args.cache, args.version, args.jobs))


if __name__ == "__main__":
    main()
