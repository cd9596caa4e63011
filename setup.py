"""Packaging. The CUDA extension fastcomer._C (csrc/) is built without torch: nvcc compiles
the kernels, the host compiler the pybind11 bindings, nvcc links them with the static CUDA
runtime; ninja runs the steps when it is available.

FASTCOMER_CUDA=0 never builds it, 1 must build it (or the install fails), auto (default)
builds it when nvcc is found (CUDA_HOME/bin/nvcc, else nvcc on PATH) and otherwise
installs the pure-Python package. FASTCOMER_CUDA_ARCHS (default "80;90") picks the GPU
architectures; PTX of the newest is embedded for later GPUs.
"""
import ast
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_SOURCES = ["csrc/cross_attention_step.cu", "csrc/bindings.cpp"]


def package_version():
    """fastcomer/_version.py's __version__, read without importing fastcomer (which imports torch)."""
    tree = ast.parse((ROOT / "fastcomer" / "_version.py").read_text())
    return next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"])


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_mode():
    mode = os.environ.get("FASTCOMER_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"FASTCOMER_CUDA must be 0, 1 or auto, got {mode!r}")
    return mode


class CUDAExtension(Extension):
    """An extension with .cu sources, compiled by BuildExt with nvcc."""


class BuildExt(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CUDAExtension):
            return super().build_extension(ext)
        try:
            self.build_cuda(ext)
        except (OSError, subprocess.CalledProcessError) as err:
            if cuda_mode() == "1":
                raise
            self.warn(f"building the CUDA extension failed ({err}); fastcomer installs without it "
                      "(set FASTCOMER_CUDA=1 to make this an error, 0 to skip the attempt)")

    def build_cuda(self, ext):
        import pybind11

        nvcc = find_nvcc()
        archs = [a.strip() for a in os.environ.get("FASTCOMER_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        arch_names = ";".join(f"sm_{a}" for a in archs)
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
        cxx = os.environ.get("CXX", "c++")
        temp = Path(self.build_temp).resolve() / "cuda"
        temp.mkdir(parents=True, exist_ok=True)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        steps = []  # (output, inputs, command)
        for source in ext.sources:
            source = ROOT / source
            obj = temp / (source.name + ".o")
            if source.suffix == ".cu":
                command = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--threads=2", *gencode,
                           f'-DFASTCOMER_CUDA_ARCHS="{arch_names}"', *includes, "-c", str(source), "-o", str(obj)]
            else:
                command = [cxx, "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", *includes, "-c", str(source), "-o", str(obj)]
            steps.append((obj, [source, *sorted((ROOT / "csrc").glob("*.h")), *sorted((ROOT / "csrc").glob("*.cuh"))], command))
        objects = [obj for obj, _, _ in steps]
        steps.append((target, objects, [nvcc, "-shared", "-cudart=static", *[str(o) for o in objects], "-o", str(target)]))
        ninja = shutil.which("ninja")
        if ninja:
            self.run_ninja(ninja, temp, steps)
        else:
            for _, _, command in steps:
                print(" ".join(shlex.quote(c) for c in command))
                subprocess.run(command, check=True)

    @staticmethod
    def run_ninja(ninja, temp, steps):
        lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd", "  description = $desc", ""]
        for output, inputs, command in steps:
            escaped = " ".join(shlex.quote(c) for c in command).replace("$", "$$")
            lines += [f"build {output}: run {' '.join(str(i) for i in inputs)}", f"  cmd = {escaped}",
                      f"  desc = {Path(output).name}", ""]
        (temp / "build.ninja").write_text("\n".join(lines))
        subprocess.run([ninja, "-C", str(temp)], check=True)


def cuda_extensions():
    mode = cuda_mode()
    if mode == "0":
        return []
    if find_nvcc() is None:
        if mode == "1":
            sys.exit("FASTCOMER_CUDA=1 but nvcc was found neither in $CUDA_HOME/bin nor on PATH")
        return []
    return [CUDAExtension("fastcomer._C", CUDA_SOURCES)]


setup(
    name="fastcomer",
    version=package_version(),
    description="Fused GPU kernels and a fast decoding engine for CoMER (handwritten maths recognition)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastcomer", "fastcomer.*"]),
    package_data={"fastcomer": ["dictionary.txt", "py.typed"]},
    ext_modules=cuda_extensions(),
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        # pytest-benchmark: the smoke run of the benchmark suite; matplotlib: the test of `fastcomer plot`;
        # hypothesis: the property-based search tests;
        # pillow: the tests of `fastcomer recognize`; onnx, onnxruntime, onnxscript: the ONNX export tests;
        # starlette ... python-multipart: the tests of `fastcomer serve`
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pybind11>=2.10", "matplotlib", "pillow", "onnx", "onnxruntime", "onnxscript",
                 "starlette", "uvicorn", "prometheus_client", "python-multipart",
                 "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # the suite under benchmarks/ runs under pytest, timed by pytest-benchmark (histogram: --benchmark-histogram)
        "bench": ["pytest", "pytest-benchmark[histogram]", "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "plot": ["matplotlib"],
        "images": ["pillow"],  # fastcomer.recognize / `fastcomer recognize` on image files
        "onnx": ["onnx", "onnxscript", "onnxruntime"],  # fastcomer.export's ONNX graphs, `fastcomer export-onnx`
        "evaluate": ["pillow", "tqdm"],  # `fastcomer evaluate`: image files, and its progress bar
        # `fastcomer serve` (fastcomer.serving.app): the ASGI stack, metrics, multipart bodies, images
        "serve": ["starlette>=0.40", "uvicorn>=0.30", "prometheus_client", "python-multipart", "pillow"],
        # the documentation site: `python -m mkdocs build --strict` (mkdocs.yml, docs/)
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    entry_points={"console_scripts": ["fastcomer = fastcomer.cli:main"]},
)
