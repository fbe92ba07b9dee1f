"""Build script: the package, plus the C++/CUDA extension `fastres._C` when it can be built.

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

What gets built (a summary is printed at the end of the build):
- CPU kernels (csrc/cpu, csrc/ops.cpp) whenever torch is importable at build time and a C++
  compiler works.
- CUDA kernels (csrc/cuda) too when a GPU is visible, torch was built with CUDA and nvcc is
  found (CUDA_HOME or nvcc on PATH). Without a GPU nothing built from them could run here, so
  by default they are not built, and the summary says so; FASTRES_BUILD_CUDA=1 builds them
  anyway (CI does, to keep the CUDA sources compiling; a wheel built for GPU machines
  elsewhere). TORCH_CUDA_ARCH_LIST is respected and defaults to "8.0;9.0" when no GPU is
  visible. The CUDA headers and runtime of the pip wheels (site-packages/nvidia/cu13/
  {include,lib}) are added when present.
- Nothing when FASTRES_NO_EXT=1, when torch is missing, or when the build fails: fastres then
  installs as pure Python and runs on its reference (and Triton) backends.
FASTRES_NO_CUDA=1 builds the CPU kernels only, GPU or not.

Rebuilds. pip's editable install compiles in a fresh temporary directory each time, so every
reinstall used to recompile everything. The build directory is kept in the tree instead
(build/fastres-ext/<python, torch, CPU or CUDA>/, or FASTRES_BUILD_DIR), and a build whose
inputs (every file under csrc/, the compiler flags, the torch and Python versions) hash the
same as the last one reuses its fastres._C without compiling; otherwise ninja (when
installed) recompiles only what changed.
"""
import ctypes
import glob
import hashlib
import os
import shutil
import sys
import sysconfig
import time

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "fastres._C"
_report = []  # lines of the build summary


def _say(line):
    _report.append(line)
    print(f"fastres setup: {line}", flush=True)


def _torch_exports_blas():
    """True if libtorch_cpu exports the Fortran sgemm_/dgemm_ symbols (MKL builds do)."""
    import torch
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        handle = ctypes.CDLL(lib)
        return hasattr(handle, "sgemm_") and hasattr(handle, "dgemm_")
    except OSError:
        return False


def _nvidia_wheel_dirs():
    """(include dirs, library dirs) of the CUDA pip wheels (nvidia-*-cu13 / cu12), if installed."""
    includes, libs = [], []
    for root in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for cuda_dir in sorted(glob.glob(os.path.join(root, "nvidia", "cu1*"))):
            if os.path.isdir(os.path.join(cuda_dir, "include")):
                includes.append(os.path.join(cuda_dir, "include"))
            if os.path.isdir(os.path.join(cuda_dir, "lib")):
                libs.append(os.path.join(cuda_dir, "lib"))
    return includes, libs


def _missing_header_dir(cuda_home, wheel_includes):
    """A directory of links to the wheel headers the toolkit lacks (cusparse.h, cublas_v2.h...).

    The wheels' include dirs cannot simply go on the include path: their cuda_runtime_api.h
    belongs to the wheel's CUDA (13.2 here), and CCCL refuses a toolkit (nvcc 13.0) whose
    runtime headers have another version. So only the headers the toolkit does not have are
    linked in, and the toolkit's own headers win.
    """
    toolkit = os.path.join(cuda_home, "include")
    target = os.path.join(HERE, "build", "cuda-wheel-headers")
    os.makedirs(target, exist_ok=True)
    for include in wheel_includes:
        for name in os.listdir(include):
            link = os.path.join(target, name)
            if not os.path.exists(os.path.join(toolkit, name)) and not os.path.lexists(link):
                os.symlink(os.path.join(include, name), link)
    return target


def _toolkit_root(nvcc):
    """The CUDA toolkit nvcc belongs to. nvcc may be a wrapper script (here /usr/local/bin/nvcc
    runs /usr/local/cuda-13.0/bin/nvcc), so ask nvcc itself (its TOP), else take bin/.. ."""
    import subprocess
    try:
        dry = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.realpath(line.split("=", 1)[1].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _find_nvcc():
    from torch.utils import cpp_extension
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if cpp_extension.CUDA_HOME:
        candidates.append(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if os.path.exists(c)), None)


def _record_build(**outcome):
    """Write fastres/_build_info.json: what this build tried and whether it worked, so the
    tests (tests/backends/test_cpp_ext.py) fail loudly where a build failed, instead of the
    extension's tests skipping."""
    import json
    with open(os.path.join(HERE, "fastres", "_build_info.json"), "w") as f:
        json.dump(outcome, f)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _inputs_digest(extension, torch_version):
    """What the compiled extension depends on: every file under csrc/ (sources and headers),
    the extension's flags and macros, and the torch, Python and toolchain settings."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, HERE).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    settings = [torch_version, sys.version, extension.sources, extension.extra_compile_args,
                extension.define_macros, extension.include_dirs, extension.library_dirs,
                extension.extra_link_args, os.environ.get("TORCH_CUDA_ARCH_LIST"),
                os.environ.get("CUDA_HOME"), os.environ.get("CXX"), os.environ.get("CC")]
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def _extensions():
    """The extension list and the build_ext command class, or ([], {}) for pure Python."""
    if os.environ.get("FASTRES_NO_EXT", "") == "1":
        _say("FASTRES_NO_EXT=1: not building fastres._C (pure-Python install)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        _say(f"torch is not importable at build time ({exc}); not building fastres._C. "
             "Install torch first and use `pip install --no-build-isolation -e .`")
        return [], {}

    sources = [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "checks.cpp"),
               os.path.join("csrc", "cpu", "conv_bn_relu_cpu.cpp"),
               os.path.join("csrc", "cpu", "stream_cpu.cpp"),  # fastres.stream's kernel
               # the channels-last training stage's batch norm (fastres/backends/onednn_train.py)
               os.path.join("csrc", "cpu", "nlc_bn_train_cpu.cpp"),
               # the oneDNN eval program's Winograd F(2,3) convs (fastres/backends/onednn.py)
               os.path.join("csrc", "cpu", "winograd_cpu.cpp")]
    # As torch builds itself: -fno-math-errno/-fno-trapping-math let masked (select) loops
    # vectorize. The C++ standard is whatever torch requires (cpp_extension adds it).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    define_macros = []
    link_args = ["-fopenmp"]
    if _torch_exports_blas():
        define_macros.append(("FASTRES_BLAS_SYMBOLS", None))

    nvcc, no_cuda_reason = None, None
    if os.environ.get("FASTRES_NO_CUDA", "") == "1":
        no_cuda_reason = "FASTRES_NO_CUDA=1"
    elif torch.version.cuda is None:
        no_cuda_reason = f"torch {torch.__version__} has no CUDA"
    elif not torch.cuda.is_available() and os.environ.get("FASTRES_BUILD_CUDA", "") != "1":
        no_cuda_reason = ("no GPU is visible, so nothing built from them could run here "
                          "(FASTRES_BUILD_CUDA=1 builds them anyway)")
    else:
        nvcc = _find_nvcc()
        if nvcc is None:
            no_cuda_reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if no_cuda_reason:
        _say(f"building NO CUDA kernels: {no_cuda_reason}")

    if nvcc is None:
        ext = cpp_extension.CppExtension(
            EXT_NAME, sources, extra_compile_args={"cxx": cxx_flags},
            define_macros=define_macros, extra_link_args=link_args)
        _say("building fastres._C with CPU kernels only")
    else:
        cuda_home = _toolkit_root(nvcc)
        # torch.utils.cpp_extension resolved CUDA_HOME when imported; point it (and the nvcc it
        # runs, CUDA_HOME/bin/nvcc) at the real toolkit.
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no GPU to ask: Ampere and Hopper
        wheel_includes, lib_dirs = _nvidia_wheel_dirs()
        includes = [_missing_header_dir(cuda_home, wheel_includes)]
        sources.append(os.path.join("csrc", "cuda", "conv_bn_relu_cuda.cu"))
        define_macros.append(("FASTRES_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            EXT_NAME, sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            define_macros=define_macros, include_dirs=includes, library_dirs=lib_dirs,
            extra_link_args=link_args + [f"-Wl,-rpath,{d}" for d in lib_dirs])
        _say(f"building fastres._C with CPU and CUDA kernels (CUDA toolkit {cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    flavour = "cuda" if nvcc is not None else "cpu"
    build_dir = os.path.join(os.environ.get("FASTRES_BUILD_DIR")
                             or os.path.join(HERE, "build", "fastres-ext"),
                             f"py{sys.version_info[0]}{sys.version_info[1]}-torch"
                             f"{torch.__version__}-{flavour}")
    outcome = dict(cuda=nvcc is not None, cuda_reason=no_cuda_reason, build_dir=build_dir)

    class OptionalBuildExtension(base):
        """Builds fastres._C if it can; a failed build leaves a working pure-Python install.
        Compiles in the persistent build_dir and skips compiling where nothing changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(build_dir, "objects")

        def build_extension(self, extension):
            target = self.get_ext_fullpath(extension.name)
            cached = os.path.join(build_dir, os.path.basename(target))
            stamp = os.path.join(build_dir, "inputs.sha256")
            digest = _inputs_digest(extension, torch.__version__)
            if os.path.exists(cached) and _read(stamp) == digest:
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                # A new file renamed over the old: a process that has the old one loaded
                # keeps its mapping (a copy over it in place could crash that process).
                shutil.copy2(cached, target + ".tmp")
                os.replace(target + ".tmp", target)
                _say(f"fastres._C unchanged since its last build: reused {cached}, "
                     "compiled nothing")
                outcome["reused"] = True
                return
            started = time.time()
            super().build_extension(extension)
            os.makedirs(build_dir, exist_ok=True)
            shutil.copy2(target, cached)
            with open(stamp, "w") as f:
                f.write(digest)
            _say(f"compiled fastres._C in {time.time() - started:.0f} s")
            outcome["reused"] = False

        def run(self):
            try:
                super().run()
                _say("built fastres._C" + (" with CPU and CUDA kernels" if nvcc is not None
                                           else " with CPU kernels only, no CUDA kernels"))
                _record_build(built=True, **outcome)
            except Exception as exc:  # compiler missing or compile error: degrade, loudly
                _say(f"FAILED to build fastres._C ({type(exc).__name__}: {exc}); installing "
                     "without it (reference/Triton backends only)")
                _record_build(built=False, error=f"{type(exc).__name__}: {exc}", **outcome)

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()
try:
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
finally:
    if _report:
        print("fastres setup summary:\n  " + "\n  ".join(_report), file=sys.stderr, flush=True)
