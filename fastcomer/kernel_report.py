"""Static GPU report: what the compiler makes of every kernel fastcomer launches, without a GPU.

Each kernel variant (every op of `fastcomer.ops.registry.OPS`: its `variants.kernel_variants(shapes,
arch)`) is compiled for sm_90 or sm_80 with Triton's compiler and a `GPUTarget` (its bundled
ptxas runs on the CPU); the CUDA extension (csrc/cross_attention_step.cu) with nvcc. From the cubin, via the
`cuobjdump` Triton ships: registers, stack (local memory: spills) and static shared memory
(`-res-usage`), and the instruction mix (`-sass`): tensor-core instructions (HMMA: mma.sync,
HGMMA: Hopper's wgmma), FFMA, and spill stores/loads (STL/LDL, bytes per thread). From those,
the theoretical occupancy (resident warps per SM from the register, shared-memory, warp and
CTA limits of the architecture) and, from the variant's FLOPs and unique global bytes, a
roofline time ESTIMATE against published peaks (`PEAKS`): max(FLOPs / compute peak,
bytes / memory bandwidth), the compute peak being the tensor-core one of the operand type its
SASS's tensor-core instructions take (TF32 when any takes TF32: a half model's kernel may dot
in float32), else the FP32 FMA peak. An estimate,
never a measurement: it ignores occupancy, latency, launch overhead and cache reuse.

Each variant is a `fastcomer.ops.registry.KernelVariant`: a launch its launcher made (run on
meta tensors, recorded by `fastcomer.ops.triton_launch`), the launches per op call, FLOPs and
bytes per launch. It is compiled with what Triton derives from that launch's arguments on a
GPU: pointer and integer divisibility by 16, integers equal to 1 as constants, the launcher's
constexprs, num_warps and num_stages (Triton's default where the launcher sets none).
"""
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .ops.registry import OPS, KernelVariant, Op

__all__ = ["ARCHS", "PEAKS", "KernelStats", "compile_variant", "occupancy_warps", "sass_stats", "report",
           "format_report", "cuda_extension_stats"]

ARCHS = {"sm_90": 90, "sm_80": 80}

# Published dense peaks (no sparsity), per second: NVIDIA H100 SXM5 datasheet (FP32 67 TFLOPS,
# TF32 494.7, BF16/FP16 989.4 TFLOPS, HBM3 3.35 TB/s) and A100 SXM4 80GB datasheet (FP32 19.5,
# TF32 156, BF16/FP16 312 TFLOPS, HBM2e 2.039 TB/s).
PEAKS = {
    90: {"device": "H100 SXM", "fp32": 67e12, "tf32": 494.7e12, "half": 989.4e12, "bandwidth": 3.35e12},
    80: {"device": "A100 SXM4 80GB", "fp32": 19.5e12, "tf32": 156e12, "half": 312e12, "bandwidth": 2.039e12},
}

# Per-SM limits (CUDA occupancy calculator): register file, warps, CTAs, shared memory for CTAs
# (each CTA also reserves 1 KB), register allocation unit per warp.
SM_LIMITS = {
    90: {"registers": 65536, "warps": 64, "ctas": 32, "shared": 228 * 1024, "reg_unit": 256},
    80: {"registers": 65536, "warps": 64, "ctas": 32, "shared": 164 * 1024, "reg_unit": 256},
}
CTA_RESERVED_SHARED = 1024



@dataclasses.dataclass
class KernelStats:
    """What the compiler produced for one variant, and its costs per launch."""

    op: str
    name: str
    dtype: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    warps: int
    stages: Optional[int]
    warps_per_sm: int
    tensor_core_instructions: int
    ffma_instructions: int
    ctas: int
    launches: int
    flops: float
    bytes: float
    estimate_us: float
    bound: str


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither in Triton's bundled tools nor on PATH")
    return found


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], check=True, capture_output=True,
                              text=True).stdout


_RES_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")
_SPILL = re.compile(r"\b(STL|LDL)\b(?:\.[A-Z0-9]+)*")


def res_usage(cubin: bytes) -> Dict[str, tuple]:
    """Function name -> (registers, stack bytes, static shared bytes), from cuobjdump -res-usage."""
    return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in _RES_USAGE.finditer(_cuobjdump("-res-usage", cubin))}


def sass_stats(sass: str) -> Dict[str, int]:
    """Instruction counts of a SASS listing: tensor-core (HMMA, HGMMA; those taking TF32
    operands apart), FFMA, and the bytes per thread of the spill stores and loads (STL/LDL;
    .64/.128 suffixes give their width)."""
    body = [line.split("*/", 1)[-1] for line in sass.splitlines() if "/*" in line]
    text = "\n".join(body)
    count = lambda op: len(re.findall(rf"\b{op}\b", text))
    spill = {"STL": 0, "LDL": 0}
    for m in _SPILL.finditer(text):
        width = re.search(r"\.(64|128)\b", m[0])
        spill[m[1]] += int(width[1]) // 8 if width else 4
    return {"tensor_core": count("HMMA") + count("HGMMA"),
            "tf32_tensor_core": len(re.findall(r"\bH(?:G)?MMA\.\S*\.TF32\b", text)), "ffma": count("FFMA"),
            "spill_store_bytes": spill["STL"], "spill_load_bytes": spill["LDL"]}


def occupancy_warps(arch: int, registers: int, shared_bytes: int, warps: int) -> int:
    """Theoretical resident warps per SM for CTAs of `warps` warps using `registers` per thread
    and `shared_bytes` of shared memory (the CUDA occupancy calculator's limits)."""
    lim = SM_LIMITS[arch]
    unit = lim["reg_unit"]
    regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    by_regs = (lim["registers"] // regs_per_warp) // warps
    by_shared = lim["shared"] // (shared_bytes + CTA_RESERVED_SHARED)
    ctas = min(by_regs, by_shared, lim["warps"] // warps, lim["ctas"])
    return ctas * warps


def _estimate(arch: int, sass: Dict[str, int], flops: float, bytes_: float):
    peaks = PEAKS[arch]
    if sass["tensor_core"]:  # float32 operands reach tensor cores only as TF32
        compute = peaks["tf32"] if sass["tf32_tensor_core"] else peaks["half"]
    else:
        compute = peaks["fp32"]
    compute_s, memory_s = flops / compute, bytes_ / peaks["bandwidth"]
    return max(compute_s, memory_s) * 1e6, "compute" if compute_s >= memory_s else "memory"


def compile_variant(variant: KernelVariant, arch: int):
    """Compile one variant for compute capability `arch` (80, 90) with Triton's compiler, as its
    launch compiles on a GPU: the signature, constexprs, divisibility attributes and options
    (num_warps, num_stages) Triton derives from the recorded launch's arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = variant.launch.specialised(arch)
    source = ASTSource(fn=variant.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec.options.__dict__)


def _compile_key(variant: KernelVariant, arch: int) -> tuple:
    """Variants that compile to the same binary share a key."""
    spec = variant.launch.specialised(arch)
    return (variant.kernel.cache_key, repr(spec.signature), repr(sorted(spec.constexprs.items())),
            repr(sorted(spec.attrs.items())), repr(sorted(spec.options.__dict__.items())))


def _stats_of(variant: KernelVariant, arch: int, compiled) -> KernelStats:
    cubin = compiled.asm["cubin"]
    name = compiled.metadata.name
    registers, stack, static_shared = res_usage(cubin)[name]
    sass = sass_stats(_cuobjdump("-sass", cubin))
    shared = compiled.metadata.shared + static_shared
    warps = compiled.metadata.num_warps
    grid = variant.grid
    estimate, bound = _estimate(arch, sass, variant.flops, variant.bytes)
    return KernelStats(variant.op, variant.name, variant.dtype, registers, stack, sass["spill_store_bytes"],
                       sass["spill_load_bytes"], shared, warps, compiled.metadata.num_stages,
                       occupancy_warps(arch, registers, shared, warps), sass["tensor_core"], sass["ffma"],
                       grid[0] * grid[1] * grid[2], variant.launches, variant.flops, variant.bytes, estimate, bound)


def _variants_of(op: Op, shapes: str, arch: int) -> Optional[List[KernelVariant]]:
    """The op's variants, or None when the op has no variants module yet."""
    try:
        return op.kernel_variants(shapes, arch)
    except ModuleNotFoundError as err:
        if err.name == f"{op.package}.variants":
            return None  # the provider itself is absent, not one of its imports
        raise


CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCE = CSRC / "cross_attention_step.cu"


def csrc_constant(name: str, header: Path = CSRC / "cross_attention_step.h") -> int:
    """An integer constant of csrc (kThreads: threads per CTA of the CUDA kernels), read from
    its one definition, for what compiles csrc without loading the built extension."""
    match = re.search(rf"constexpr int {name} = (\d+);", header.read_text())
    if match is None:
        raise ValueError(f"{name} not found in {header}")
    return int(match[1])


def _demangle(name: str) -> str:
    """`partial_attention_kernel<float>` for a mangled C++ name (c++filt when present)."""
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    full = subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name
    full = full.replace("(anonymous namespace)::", "")
    return re.sub(r"^void |\([^()]*\)$|\w+::", "", full)


def cuda_extension_stats(arch: int, source: Path = CUDA_SOURCE) -> List[dict]:
    """Registers, stack, shared memory, occupancy and instruction mix of every kernel in the
    CUDA extension's source, compiled with nvcc to a cubin (-cubin -arch sm_XX). Raises
    FileNotFoundError without nvcc or the source."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or not source.exists():
        raise FileNotFoundError(f"nvcc or {source} not found")
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = Path(tmp) / "cross_attention_step.cubin"
        subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-o", str(cubin_path), str(source)],
                       check=True, capture_output=True, text=True)
        cubin = cubin_path.read_bytes()
    usage = res_usage(cubin)
    sass = _cuobjdump("-sass", cubin)
    # one listing per function: split on the "Function : name" headers
    sections = re.split(r"\n\s*Function : (\S+)\n", sass)
    per_function = dict(zip(sections[1::2], sections[2::2]))
    threads = csrc_constant("kThreads")
    rows = []
    for name, (registers, stack, shared) in sorted(usage.items()):
        mix = sass_stats(per_function.get(name, ""))
        rows.append({"name": _demangle(name), "registers": registers, "stack_bytes": stack, "static_shared_bytes": shared,
                     "warps": threads // 32, "warps_per_sm": occupancy_warps(arch, registers, shared, threads // 32),
                     "tensor_core_instructions": mix["tensor_core"], "ffma_instructions": mix["ffma"],
                     "spill_store_bytes": mix["spill_store_bytes"], "spill_load_bytes": mix["spill_load_bytes"]})
    return rows


def report(arch: str = "sm_90", shapes: str = "published", select: Optional[Callable[[KernelVariant], bool]] = None,
           cuda: bool = True) -> dict:
    """Compile every variant of every op for `arch` at the shape set `shapes` (keeping those
    `select` accepts) and return {"arch", "peaks", "providers" (per op: "ok" or "not
    provided"), "kernels": [KernelStats as dicts], "failed": [variants Triton's compiler
    rejects, with the error], "cuda_extension": rows or a reason}.
    Identical compiles are done once (and Triton's cache keeps them across runs)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the static report compiles kernels: unset TRITON_INTERPRET")
    from triton.compiler.errors import CompilationError
    capability = ARCHS[arch]
    providers, kernels, failed, compiled = {}, [], [], {}
    for op in OPS.values():
        variants = _variants_of(op, shapes, capability)
        providers[op.name] = "not provided" if variants is None else "ok"
        for variant in variants or []:
            if select is not None and not select(variant):
                continue
            key = _compile_key(variant, capability)
            if key not in compiled:
                try:
                    compiled[key] = compile_variant(variant, capability)
                except CompilationError as err:  # a launch the GPU would refuse: reported, not fatal
                    compiled[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
            if isinstance(compiled[key], str):
                failed.append({"op": variant.op, "name": variant.name, "dtype": variant.dtype, "error": compiled[key]})
            else:
                kernels.append(dataclasses.asdict(_stats_of(variant, capability, compiled[key])))
    result = {"arch": arch, "shapes": shapes, "peaks": PEAKS[capability], "providers": providers, "kernels": kernels,
              "failed": failed}
    if cuda:
        try:
            result["cuda_extension"] = cuda_extension_stats(capability)
        except (FileNotFoundError, subprocess.CalledProcessError) as err:
            result["cuda_extension"] = f"not compiled: {err}"
    return result


def _shape_of(name: str, dtype: str) -> str:
    """The shape part of a variant's name: 'T=200 L=1024' of 'arm_backward fp32 T=200 L=1024',
    'images=1,L=256' of 'merge[images=1,L=256,fp32]'."""
    if "[" in name:
        return ",".join(part for part in name[name.index("[") + 1:name.rindex("]")].split(",") if part != dtype)
    return name.split(dtype)[-1].strip()


def format_report(result: dict) -> str:
    """The report as a text table (one row per variant), plus per-op totals of the estimates."""
    peaks = result["peaks"]
    lines = [f"Static GPU report, {result['arch']}, shapes {result['shapes']} (compiled, not run). Roofline "
             f"ESTIMATES against {peaks['device']} published peaks: FP32 {peaks['fp32'] / 1e12:g}, TF32 "
             f"{peaks['tf32'] / 1e12:g}, BF16/FP16 {peaks['half'] / 1e12:g} TFLOPS, "
             f"{peaks['bandwidth'] / 1e12:g} TB/s."]
    for module, state in result["providers"].items():
        if state != "ok":
            lines.append(f"{module}: {state}")
    for k in result.get("failed", []):
        lines.append(f"DOES NOT COMPILE: {k['name']}: {k['error']}")
    header = ("kernel", "regs", "spill st/ld B", "smem KB", "warps", "warps/SM", "TC instr", "FFMA", "CTAs",
              "GFLOP", "MB", "est. us", "bound")
    rows = [header]
    for k in result["kernels"]:
        rows.append((k["name"], str(k["registers"]), f"{k['spill_store_bytes']}/{k['spill_load_bytes']}",
                     f"{k['shared_bytes'] / 1024:.1f}", str(k["warps"]), str(k["warps_per_sm"]),
                     str(k["tensor_core_instructions"]), str(k["ffma_instructions"]), str(k["ctas"]),
                     f"{k['flops'] / 1e9:.2f}", f"{k['bytes'] / 1e6:.1f}", f"{k['estimate_us']:.1f}", k["bound"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    totals: Dict[tuple, float] = {}
    for k in result["kernels"]:
        group = (k["op"], k["dtype"], _shape_of(k["name"], k["dtype"]))
        totals[group] = totals.get(group, 0.0) + k["estimate_us"] * k["launches"]
    lines.append("Estimated time per layer call (sum of the launches' estimates):")
    lines += [f"  {op} {dtype} {shape}: {us:.0f} us (estimate)" for (op, dtype, shape), us in totals.items()]
    cuda = result.get("cuda_extension")
    if isinstance(cuda, str):
        lines.append(f"CUDA extension: {cuda}")
    elif cuda:
        lines.append("CUDA extension (csrc/cross_attention_step.cu, nvcc; shared memory static only: the dynamic part depends "
                     "on the launch and is not in warps/SM):")
        for row in cuda:
            lines.append(f"  {row['name']}: {row['registers']} regs, stack {row['stack_bytes']} B, spill st/ld "
                         f"{row['spill_store_bytes']}/{row['spill_load_bytes']} B, smem {row['static_shared_bytes']} "
                         f"B static, {row['warps']} warps, {row['warps_per_sm']} warps/SM, TC "
                         f"{row['tensor_core_instructions']}, FFMA {row['ffma_instructions']}")
    return "\n".join(lines)
