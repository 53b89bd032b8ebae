"""What each Triton kernel's hot loop costs per weight on Hopper, read from its SASS (no GPU needed).

    python benchmarks/sass_report.py            # every variant, table + benchmarks/results/sass-<triton>.json
    python benchmarks/sass_report.py --only int8_gemv

Every kernel variant the dispatcher can launch (each GEMV autotune config, the GEMM tiles that
bracket the autotuner's range, the dequantize kernels) is compiled for sm_90 with the 16-byte
alignment real launches get (LLM shapes: K and N multiples of 16), disassembled with the
``cuobjdump`` that ships in Triton's NVIDIA backend, and its hot loop found: the innermost loop
(backward branch) with the most global loads. Per variant it reports the loop's
thread-instructions per weight (per kept value for 2:4, per nonzero for CSR): SASS instructions
in the loop body x threads of the program / weights one iteration consumes; the instruction mix
(global loads by width, I2F, barriers, shared-memory loads/stores, local-memory spills, tensor
core ops); registers, stack and shared memory; and a modelled M = 1 bandwidth ceiling: an SM
issues at most one warp-instruction per scheduler per cycle (4 per SM), so a loop of ``I``
thread-instructions per weight streams at most ``4 * SMs * clock * 32 / I`` weights a second,
times the bytes each weight takes; int -> float conversions (I2F) have a second ceiling, 16 a
cycle per SM, and warp shuffles (the codebook GEMV's lookups) a third, 32 a cycle per SM. Where
the lowest is below HBM bandwidth, the loop, not memory, is the limit.
Works with Triton 3.6 (the GPU machines) and 3.8.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = ("cuda", 90, 32)
# (SMs, boost clock GHz, HBM TB/s) for the modelled ceiling.
GPUS = {"H100-SXM": (132, 1.98, 3.35), "H200": (132, 1.98, 4.8)}
I2F_PER_SM_CYCLE = 16  # sm_90 throughput of 8/16/32-bit integer -> fp32 conversions
SHFL_PER_SM_CYCLE = 32  # sm_90 throughput of warp shuffles (threads a cycle per SM)


@dataclass
class Variant:
    """One compiled kernel variant and how to count its work."""

    family: str  # e.g. "int8_gemv": the row of the static targets it is held to
    kernel: object  # the @triton.jit function
    pointers: dict  # argument name -> pointer type ("*bf16"); other non-constexpr args are i32
    constexprs: dict
    num_warps: int
    num_stages: int
    per_iter: Callable[[dict], float]  # weights (kept values, nonzeros) one hot-loop iteration consumes
    bytes_per_weight: float  # HBM bytes of weight data per counted unit
    unit: str = "weight"
    loop: bool = True  # False: the whole kernel is the "loop" (one tile per program)
    label: str = ""
    maxnreg: int | None = None  # the config's register cap (ptxas .maxnreg), if any

    def name(self) -> str:
        tag = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK") or k in (
            "GROUP", "BITS", "KIND", "SPLIT_K") or k == "XS" and v)
        cap = f",r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.family}[{tag},w{self.num_warps},s{self.num_stages}{cap}]{self.label}"


def variants() -> list[Variant]:
    """Every variant the report compiles (bf16 activations, the dispatcher's configs)."""
    import triton.language as tl

    from torchzip.kernels import _common as C
    from torchzip.kernels import codebook as CB
    from torchzip.kernels import csr as CSR
    from torchzip.kernels import int8 as I8
    from torchzip.kernels import sparse24 as S24

    bf16 = "*bf16"
    out = {"b_ptr": bf16, "out_ptr": bf16}
    side = {"s_ptr": "*fp32", "book_ptr": "*fp32"}
    dot = {"DOT_DTYPE": tl.bfloat16, "PRECISION": "tf32", "SPLIT_K": 1, "HAS_BIAS": True}
    gemms = (C.GEMM_CONFIGS[1], C.GEMM_CONFIGS[9])  # small tile (mma) and large tile (wgmma)
    res: list[Variant] = []

    int8 = {"x_ptr": bf16, "q_ptr": "*i8", "s_ptr": "*fp32", **out}
    # 16-bit x (the decode path): the int32-word kernel, per channel and in groups of 128.
    words = {**int8, "q_ptr": "*i32"}
    for c in I8.MMA_CONFIGS:
        res.append(Variant("int8_gemv", I8._int8_gemv_mma_kernel, words, {"HAS_BIAS": True, **I8.mma_constexprs(c)},
                           c.num_warps, c.num_stages, I8.mma_weights_per_iter, 1.0))
    for c in I8.WORD_CONFIGS:
        res.append(Variant("int8_gemv_words", I8._int8_gemv_words_kernel, words, {"HAS_BIAS": True, **I8.words_constexprs(c)},
                           c.num_warps, c.num_stages, I8.words_weights_per_iter, 1.0))
    for c in I8.WORD_GROUP_CONFIGS:
        res.append(Variant("int8_gemv_g128", I8._int8_gemv_words_kernel, words,
                           {"HAS_BIAS": True, **I8.words_constexprs(c, 128)},
                           c.num_warps, c.num_stages, I8.words_weights_per_iter, 1.0))
    for c in gemms:
        res.append(Variant("int8_gemm", I8._int8_gemm_kernel, int8, {"GROUP": 0, **dot, **c.kwargs},
                           c.num_warps, c.num_stages, lambda k: k["BLOCK_N"] * k["BLOCK_K"], 1.0))

    cb = {"x_ptr": bf16, "p_ptr": "*i32", "book_ptr": "*fp32", **out}
    for bits in (4, 3):
        for c in CB.gemv_configs(bits):
            res.append(Variant(f"codebook{bits}_gemv", CB._codebook_gemv_kernel, cb,
                               {**CB.gemv_constexprs(bits, c), "HAS_BIAS": False},
                               c.num_warps, c.num_stages, CB.gemv_weights_per_iter, bits / 8 if bits == 4 else 0.4,
                               maxnreg=c.maxnreg))
        if bits == 4:  # x staged in shared memory, for K = 4096 (the variant for K up to 11264)
            for c in CB.GEMV_STAGED_CONFIGS4:
                res.append(Variant("codebook4_gemv", CB._codebook_gemv_kernel, cb,
                                   {**CB.gemv_constexprs(4, c, staged_k=4096), "HAS_BIAS": False},
                                   c.num_warps, c.num_stages, CB.gemv_weights_per_iter, 0.5, maxnreg=c.maxnreg))
        per = {"BITS": bits, "PER": 32 // bits, "PER_P2": C.next_pow2(32 // bits)}
        for c in (CB.GEMM_CONFIGS[1], CB.GEMM_CONFIGS[-1]):
            res.append(Variant(f"codebook{bits}_gemm", CB._codebook_gemm_kernel, cb, {**per, **dot, **c.kwargs},
                               c.num_warps, c.num_stages,
                               lambda k: k["BLOCK_N"] * (k["BLOCK_K"] // k["PER_P2"]) * k["PER"],
                               bits / 8 if bits == 4 else 0.4))

    for kind, values, vbytes in ((0, bf16, 2.0), (1, "*i8", 1.0), (2, "*u8", 1.0)):
        s24 = {"x_ptr": bf16, "v_ptr": values, "p_ptr": "*i32", **side, **out}
        for c in S24.S24_GEMV_CONFIGS:
            if not S24.gemv_config_ok(c, 2 if kind == 0 else 1, 16 if kind == 2 else 0):
                continue  # a 16-entry codebook (4-bit values) runs on the configs that hold it in registers
            res.append(Variant(f"sparse24_gemv_kind{kind}", S24._sparse24_gemv_kernel, s24,
                               {"KIND": kind, "GROUP": 0, "HAS_BIAS": True, **S24.gemv_constexprs(c, kind)},
                               c.num_warps, c.num_stages, S24.gemv_values_per_iter, vbytes + 0.25, unit="kept value"))
        for c in gemms:
            res.append(Variant(f"sparse24_gemm_kind{kind}", S24._sparse24_gemm_kernel, s24,
                               {"KIND": kind, "GROUP": 0, **dot, **c.kwargs}, c.num_warps, c.num_stages,
                               lambda k: k["BLOCK_N"] * k["BLOCK_K"], (vbytes + 0.25) / 2))
        csr = {"x_ptr": bf16, "rp_ptr": "*i32", "len_ptr": "*i32", "col_ptr": "*i16", "v_ptr": values, **side, **out}
        for c in CSR.CSR_CONFIGS:
            if c.kwargs["BLOCK_M"] != 1:
                continue  # M = 1 configs: the ones the 90%-sparse GEMV target is about
            # codebooks: up to 31 entries (a zero lane for padding), and 32 (5-bit: a bit test)
            for fam, entries in ((f"csr_kind{kind}", 16), ("csr_kind2_32", 32))[:2 if kind == 2 else 1]:
                res.append(Variant(fam, CSR._csr_kernel, csr,
                                   {"KIND": kind, "GROUP": 0, "HAS_BIAS": True, **CSR.csr_constexprs(c, kind, entries)},
                                   c.num_warps, c.num_stages, CSR.csr_nonzeros_per_iter, vbytes + 2, unit="nonzero"))

    tile = {"BLOCK_N": C.DQ_BLOCK_N, "BLOCK_K": C.DQ_BLOCK_K}
    whole = lambda k: k["BLOCK_N"] * k["BLOCK_K"]  # noqa: E731
    res += [
        Variant("int8_dequant", I8._int8_dequant_kernel, {"q_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": bf16},
                {"GROUP": 0, **tile}, C.DQ_WARPS, 1, whole, 1.0, loop=False),
        Variant("codebook4_dequant", CB._codebook_dequant_kernel, {"p_ptr": "*i32", "book_ptr": "*fp32", "out_ptr": bf16},
                {"BITS": 4, "PER": 8, **tile}, C.DQ_WARPS, 1, whole, 0.5, loop=False),
        Variant("sparse24_dequant", S24._sparse24_dequant_kernel,
                {"v_ptr": "*i8", "p_ptr": "*i32", **side, "out_ptr": bf16},
                {"KIND": 1, "GROUP": 0, **tile}, C.DQ_WARPS, 1, whole, 0.625, loop=False),
    ]
    return res


# ---- compiling and reading SASS -----------------------------------------------------------------

def triton_bin(tool: str) -> str:
    """Path of a CUDA tool shipped inside the installed Triton's NVIDIA backend."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def compile_variant(v: Variant):
    """The Triton ``CompiledKernel`` of ``v`` for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = v.kernel
    signature = {n: "constexpr" if n in v.constexprs else v.pointers.get(n, "i32") for n in kernel.arg_names}
    # Real launches specialise 16-byte aligned pointers and sizes/strides divisible by 16 (every
    # LLM shape); M (activation rows) is the one size that usually is not.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if signature[n] != "constexpr" and n not in ("M", "M_BUCKET", "MN")}
    return triton.compile(ASTSource(kernel, signature, v.constexprs, attrs), target=GPUTarget(*TARGET),
                          options={"num_warps": v.num_warps, "num_stages": v.num_stages,
                                   **({"maxnreg": v.maxnreg} if v.maxnreg else {})})


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def disassemble(cubin: bytes) -> tuple[list[tuple[int, str]], dict]:
    """``([(address, instruction text)], resources)`` of a one-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([triton_bin("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([triton_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    instrs = [(int(m.group(1), 16), m.group(2)) for m in _LINE.finditer(sass)]
    res = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return instrs, res


def opcode(text: str) -> str:
    """The opcode with modifiers of one SASS instruction (predicate stripped)."""
    text = re.sub(r"^@!?U?P\w+\s+", "", text.strip())
    return text.split()[0] if text else ""


def loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """``(first, last)`` instruction indexes of every loop (a branch back to an earlier address)."""
    index = {addr: i for i, (addr, _) in enumerate(instrs)}
    out = []
    for i, (addr, text) in enumerate(instrs):
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if m and opcode(text).startswith("BRA"):
            target = int(m.group(1), 16)
            if target <= addr and target in index:
                out.append((index[target], i))
    return out


def hot_loop(instrs: list[tuple[int, str]]) -> tuple[int, int] | None:
    """The innermost loop with the most global loads (ties: the longest), or None."""
    found = loops(instrs)
    inner = [lp for lp in found if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in found)]

    def score(lp):
        body = [opcode(t) for _, t in instrs[lp[0]: lp[1] + 1]]
        return sum(op.startswith("LDG") for op in body), lp[1] - lp[0]

    return max(inner, key=score) if inner else None


def mix(ops: list[str]) -> dict:
    """Instruction mix of a list of opcodes."""
    counts: dict = {"instructions": len(ops)}

    def add(key):
        counts[key] = counts.get(key, 0) + 1

    for op in ops:
        if ".FTZ" in op:
            add("FTZ")
        if op.startswith("SHFL"):
            add("shuffle")
        if op.startswith("LDG"):
            width = next((w for w in ("128", "64", "U8", "S8", "U16", "S16") if f".{w}" in op), "32")
            add(f"LDG.{width}")
            if ".EF" in op or ".EL" in op or ".LU" in op or "EVICT" in op:
                add("LDG.evict_hint")
                if width == "128":
                    add("LDG.128.evict_hint")  # the streamed weights (x loads carry no hint)
        elif op.startswith(("LDS", "STS", "LDSM")):
            add("shared_ld" if op.startswith("LD") else "shared_st")
        elif op.startswith(("LDL", "STL")):
            add("spill")
        elif op.startswith("BAR"):
            add("barrier")
        elif op.startswith("I2F"):
            add("I2F")
        elif op.startswith(("F2F", "F2FP")):
            add("F2F")
        elif op.startswith(("HMMA", "HGMMA", "WGMMA")):
            add("mma")
        elif op.startswith(("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2")):
            add("fp_math")
    return counts


def analyse(v: Variant, gpu: str = "H200") -> dict:
    """Compile ``v`` and read its SASS: the report row (see the module doc)."""
    compiled = compile_variant(v)
    instrs, res = disassemble(compiled.asm["cubin"])
    threads = 32 * v.num_warps
    lp = hot_loop(instrs) if v.loop else None
    body = instrs[lp[0]: lp[1] + 1] if lp else instrs
    ops = [opcode(t) for _, t in body if opcode(t) not in ("NOP",)]
    all_ops = [opcode(t) for _, t in instrs]
    per_iter = float(v.per_iter(v.constexprs))
    per_weight = len(ops) * threads / per_iter
    sms, ghz, hbm = GPUS[gpu]
    issue_gbs = 4 * sms * ghz * 32 / per_weight * v.bytes_per_weight  # GB/s the issue rate allows
    i2f_per_weight = mix(ops).get("I2F", 0) * threads / per_iter
    if i2f_per_weight:
        issue_gbs = min(issue_gbs, I2F_PER_SM_CYCLE * sms * ghz / i2f_per_weight * v.bytes_per_weight)
    shfl_per_weight = mix(ops).get("shuffle", 0) * threads / per_iter
    if shfl_per_weight:
        issue_gbs = min(issue_gbs, SHFL_PER_SM_CYCLE * sms * ghz / shfl_per_weight * v.bytes_per_weight)
    # Layout (threads per warp) of every global load of 32-bit integers (packed weights) and of
    # 16-bit ones (CSR columns): the codebook GEMV's and the CSR kernel's register-held tables need
    # one row per warp register slot.
    ttgir = compiled.asm.get("ttgir", "")
    layouts = dict(re.findall(r"^#(\w+) = #ttg\.blocked<\{[^}]*threadsPerWarp = \[([\d, ]+)\]", ttgir, re.M))
    def load_layouts(ty):
        return sorted({layouts.get(lay, "?") for lay in re.findall(
            rf"tt\.load .*: tensor<[\dx]+x!tt\.ptr<{ty}>, #(\w+)>", ttgir)})

    i32_loads = load_layouts("i32")
    row = {
        "variant": v.name(), "i32_load_threads_per_warp": i32_loads, "i16_load_threads_per_warp": load_layouts("i16"), "family": v.family, "unit": v.unit, "found_loop": lp is not None or not v.loop,
        "per_weight": round(per_weight, 3), "loop_instructions": len(ops), "units_per_iteration": per_iter,
        "threads": threads, "mix": mix(ops),
        "registers": res.get("reg"), "stack": res.get("stack", 0), "local": res.get("local", 0),
        "shared": int(getattr(compiled.metadata, "shared", 0) or 0),
        "spill_instructions": sum(op.startswith(("LDL", "STL")) for op in all_ops),
        "bytes_per_unit": v.bytes_per_weight,
        "I2F_per_weight": round(i2f_per_weight, 3),
        f"issue_ceiling_GBps_{gpu}": round(issue_gbs, 1),
        f"m1_ceiling_fraction_of_hbm_{gpu}": round(min(1.0, issue_gbs / (hbm * 1000)), 3),
    }
    return row


def summarise(rows: list[dict]) -> dict:
    """Per family: the best and worst variant's instructions per unit, most registers, any spill."""
    out: dict = {}
    for r in rows:
        f = out.setdefault(r["family"], {"unit": r["unit"], "min_per_weight": r["per_weight"],
                                         "max_per_weight": r["per_weight"], "max_registers": 0, "spills": 0,
                                         "I2F": 0, "barriers": 0, "variants": 0})
        f["min_per_weight"] = min(f["min_per_weight"], r["per_weight"])
        f["max_per_weight"] = max(f["max_per_weight"], r["per_weight"])
        f["max_registers"] = max(f["max_registers"], r["registers"] or 0)
        f["spills"] += r["spill_instructions"] + r["stack"] + r["local"]
        f["I2F"] = max(f["I2F"], r["mix"].get("I2F", 0))
        f["barriers"] = max(f["barriers"], r["mix"].get("barrier", 0))
        f["variants"] += 1
    return out


def print_table(rows: list[dict], gpu: str) -> None:
    cols = ["per unit", "instr", "LDG128", "LDG<128", "I2F", "BAR", "LDS/STS", "mma", "regs", "spill", "smem",
            f"GB/s@{gpu}"]
    print(f"{'variant':<78} " + " ".join(f"{c:>8}" for c in cols))
    for r in rows:
        m = r["mix"]
        small = sum(v for k, v in m.items() if k.startswith("LDG.") and k not in ("LDG.128", "LDG.evict_hint",
                                                                                  "LDG.128.evict_hint"))
        vals = [r["per_weight"], m["instructions"], m.get("LDG.128", 0), small, m.get("I2F", 0), m.get("barrier", 0),
                m.get("shared_ld", 0) + m.get("shared_st", 0), m.get("mma", 0), r["registers"],
                r["spill_instructions"], r["shared"], r[f"issue_ceiling_GBps_{gpu}"]]
        print(f"{r['variant'][:78]:<78} " + " ".join(f"{v:>8}" for v in vals))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated families (int8_gemv, codebook4_gemv, ...)")
    ap.add_argument("--per-family", type=int, default=0, help="at most this many variants a family (0: all)")
    ap.add_argument("--gpu", default="H200", choices=sorted(GPUS))
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/sass-triton<version>.json)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported
    import triton

    only = {f for f in args.only.split(",") if f}
    rows, failures, seen = [], [], {}
    for v in variants():
        if only and v.family not in only:
            continue
        seen[v.family] = seen.get(v.family, 0) + 1
        if args.per_family and seen[v.family] > args.per_family:
            continue
        try:
            rows.append(analyse(v, args.gpu))
        except Exception as exc:  # report every failure
            failures.append({"variant": v.name(), "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            print(f"FAIL {v.name()}: {failures[-1]['error']}", file=sys.stderr)
    print_table(rows, args.gpu)
    summary = summarise(rows)
    print()
    print(f"{'family':<24} {'unit':<11} {'min':>7} {'max':>7} {'regs':>5} {'spill':>5} {'I2F':>4} {'BAR':>4}")
    for fam, s in summary.items():
        print(f"{fam:<24} {s['unit']:<11} {s['min_per_weight']:>7} {s['max_per_weight']:>7} {s['max_registers']:>5} "
              f"{s['spills']:>5} {s['I2F']:>4} {s['barriers']:>4}")
    from benchmarks.common import RESULTS, run_info

    path = Path(args.out) if args.out else RESULTS / f"sass-triton{triton.__version__}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"run": {**run_info(), "triton": triton.__version__, "target": "sm_90", "model_gpu": args.gpu,
                    "model": dict(zip(("sms", "clock_ghz", "hbm_tbps"), GPUS[args.gpu]))},
            "summary": summary, "variants": rows, "failures": failures}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
