"""The Triton kernels compile for Hopper (sm_90), without a GPU.

The interpreter (test_kernels.py) checks what the kernels compute, not that Triton can lower them:
a layout, dtype or shape rule of the GPU backend would only show on a GPU. Triton compiles ahead of
time for a named target, so a subprocess (kernels must be jitted with TRITON_INTERPRET unset)
lowers a representative variant of every kernel to a cubin (ptxas included), with the 16-byte
alignment real launches have. ``python tests/test_kernels_compile.py`` prints the list.
"""

from __future__ import annotations

import os
import subprocess
import sys

TARGET = ("cuda", 90, 32)


def variants():
    """(kernel, pointer dtypes, constexprs, num_warps, num_stages) of the variants compiled."""
    import triton.language as tl

    from torchzip.kernels import _common as C
    from torchzip.kernels import codebook as CB
    from torchzip.kernels import csr as CSR
    from torchzip.kernels import int8 as I8
    from torchzip.kernels import sparse24 as S24

    bf16, out = "*bf16", {"b_ptr": "*bf16", "out_ptr": "*bf16"}
    small, large = C.GEMM_CONFIGS[1], C.GEMM_CONFIGS[9]  # tl.dot via mma and via wgmma
    dot = {"DOT_DTYPE": tl.bfloat16, "PRECISION": "tf32", "SPLIT_K": 1, "HAS_BIAS": True}
    gemv = I8.GEMV_CONFIGS[1]
    int8 = {"x_ptr": bf16, "q_ptr": "*i8", "s_ptr": "*fp32", **out}
    side = {"s_ptr": "*fp32", "book_ptr": "*fp32"}
    out = [
        (I8._int8_gemv_kernel, int8, {"GROUP": g, "HAS_BIAS": True, "SPLIT_K": 1, "FAST": True, "FOLD": g == 0,
                                     **gemv.kwargs}, 4, 2)
        for g in (0, 32, 48, 128)
    ]
    out += [(I8._int8_gemm_kernel, int8, {"GROUP": g, **dot, **c.kwargs}, c.num_warps, c.num_stages)
            for g in (0, 128) for c in (small, large)]
    fp32 = {"x_ptr": "*fp32", "q_ptr": "*i8", "s_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32"}
    out.append((I8._int8_gemm_kernel, fp32, {"GROUP": 0, **dot, "DOT_DTYPE": tl.float32, "PRECISION": "tf32x3",
                                              "SPLIT_K": 2, **small.kwargs}, 4, 3))
    out.append((C._splitk_reduce_kernel, {"ws_ptr": "*fp32", "b_ptr": bf16, "out_ptr": bf16},
                {"SPLIT_K": 4, "HAS_BIAS": True, "BLOCK": 1024}, 4, 1))
    cb = {"x_ptr": bf16, "p_ptr": "*i32", "book_ptr": "*fp32", "b_ptr": bf16, "out_ptr": bf16}
    words = {**int8, "q_ptr": "*i32"}
    for c in (I8.WORD_CONFIGS[0], I8.WORD_CONFIGS[3]):
        for x_kind, x_type in ((0, bf16), (1, "*fp16")):
            for g in (0, 128):
                out.append((I8._int8_gemv_words_kernel, {**words, "x_ptr": x_type},
                            {"HAS_BIAS": True, **I8.words_constexprs(c, g), "X_KIND": x_kind}, c.num_warps,
                            c.num_stages))
    for c in (I8.MMA_CONFIGS[0], I8.MMA_CONFIGS[-1]):
        for x_kind, x_type in ((0, bf16), (1, "*fp16")):
            out.append((I8._int8_gemv_mma_kernel, {**words, "x_ptr": x_type},
                        {"HAS_BIAS": True, **I8.mma_constexprs(c), "X_KIND": x_kind}, c.num_warps, c.num_stages))
    for bits in (3, 4):
        per = {"BITS": bits, "PER": 32 // bits, "PER_P2": C.next_pow2(32 // bits)}
        c = CB.gemv_configs(bits)[0]
        for lanes, x_kind, x_type in ((True, 0, bf16), (True, 1, "*fp16"), (True, 2, "*fp32"), (False, 0, bf16)):
            out.append((CB._codebook_gemv_kernel, {**cb, "x_ptr": x_type},
                        {**CB.gemv_constexprs(bits, c, lanes), "X_KIND": x_kind, "HAS_BIAS": False},
                        c.num_warps, c.num_stages))
        if bits == 4:  # x staged in shared memory (16- and 32-bit x)
            s = CB.GEMV_STAGED_CONFIGS4[0]
            for x_kind, x_type in ((0, bf16), (2, "*fp32")):
                out.append((CB._codebook_gemv_kernel, {**cb, "x_ptr": x_type},
                            {**CB.gemv_constexprs(4, s, staged_k=2000), "X_KIND": x_kind, "HAS_BIAS": False},
                            s.num_warps, s.num_stages))
        out += [(CB._codebook_gemm_kernel, cb, {**per, **dot, **c.kwargs}, c.num_warps, c.num_stages)
                for c in (CB.GEMM_CONFIGS[1], CB.GEMM_CONFIGS[-1])]
    for kind, values in ((0, bf16), (1, "*i8"), (2, "*u8")):
        s24 = {"x_ptr": bf16, "v_ptr": values, "p_ptr": "*i32", **side, "b_ptr": bf16, "out_ptr": bf16}
        group = 64 if kind == 1 else 0
        out.append((S24._sparse24_gemv_kernel, s24, {"KIND": kind, "GROUP": group, "HAS_BIAS": True,
                                                    **S24.gemv_constexprs(S24.S24_GEMV_CONFIGS[0], kind)}, 4, 2))
        if kind == 1:  # scale groups that split groups of 4: the kept values' own columns
            out.append((S24._sparse24_gemv_kernel, s24, {"KIND": 1, "GROUP": 6, "HAS_BIAS": True,
                                                        **S24.gemv_constexprs(S24.S24_GEMV_CONFIGS[0], 1)}, 4, 2))
        # fp32 activations (x gathered) with 16-bit values
        fp32x = {**s24, "x_ptr": "*fp32", "v_ptr": "*fp16", "b_ptr": "*fp32", "out_ptr": "*fp32"}
        if kind == 0:
            out.append((S24._sparse24_gemv_kernel, fp32x, {"KIND": 0, "GROUP": 0, "HAS_BIAS": False,
                                                          **S24.gemv_constexprs(S24.S24_GEMV_CONFIGS[0], 0),
                                                          "X16": False}, 4, 2))
            # the fallback when the PTX byte permute fails its self-check: the permute in integer ops
            out.append((S24._sparse24_gemv_kernel, s24, {"KIND": 0, "GROUP": 0, "HAS_BIAS": True,
                                                        **S24.gemv_constexprs(S24.S24_GEMV_CONFIGS[0], 0),
                                                        "FAST": False}, 4, 2))
        out.append((S24._sparse24_gemm_kernel, s24, {"KIND": kind, "GROUP": 0, **dot, **small.kwargs}, 4, 4))
        csr = {"x_ptr": bf16, "rp_ptr": "*i32", "len_ptr": "*i32", "col_ptr": "*i16", "v_ptr": values, **side,
               "b_ptr": bf16, "out_ptr": bf16}
        # M = 1 on the aligned copy (codebooks: 16 and 32 entries in registers, and gathered), and
        # M > 1 on the plain CSR
        m1 = [(CSR.CSR_CONFIGS[2], CSR.csr_constexprs(CSR.CSR_CONFIGS[2], kind, e)) for e in (16, 32)[:1 + (kind == 2)]]
        if kind == 2:
            m1.append((CSR.CSR_CONFIGS[2], {**m1[0][1], "LANES": 0}))
        for c, const in m1 + [(CSR.CSR_CONFIGS[-3], {"ALIGN": 1, "ASM": True, "LANES": 0, "X_KIND": 0, **CSR.CSR_CONFIGS[-3].kwargs})]:
            out.append((CSR._csr_kernel, csr, {"KIND": kind, "GROUP": group, "HAS_BIAS": True, **const}, c.num_warps, 2))
        # int32 columns (K > 32768) with fp16 and fp32 activations
        for x_dtype, x_kind in (("*fp16", 1), ("*fp32", 2)):
            out.append((CSR._csr_kernel, {**csr, "x_ptr": x_dtype, "col_ptr": "*i32"},
                        {"KIND": kind, "GROUP": group, "HAS_BIAS": True,
                         **CSR.csr_constexprs(CSR.CSR_CONFIGS[0], kind), "X_KIND": x_kind}, CSR.CSR_CONFIGS[0].num_warps, 2))
    tile = {"BLOCK_N": C.DQ_BLOCK_N, "BLOCK_K": C.DQ_BLOCK_K}
    out += [
        (I8._int8_dequant_kernel, {"q_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": bf16}, {"GROUP": 128, **tile}, 4, 1),
        (CB._codebook_dequant_kernel, {"p_ptr": "*i32", "book_ptr": "*fp32", "out_ptr": bf16},
         {"BITS": 3, "PER": 10, **tile}, 4, 1),
        (S24._sparse24_dequant_kernel, {"v_ptr": "*u8", "p_ptr": "*i32", **side, "out_ptr": bf16},
         {"KIND": 2, "GROUP": 0, **tile}, 4, 1),
        (CSR._csr_dequant_kernel, {"rp_ptr": "*i32", "col_ptr": "*i16", "v_ptr": "*i8", **side, "out_ptr": bf16},
         {"KIND": 1, "GROUP": 0, "BLOCK_R": CSR.DQ_BLOCK_R, "BLOCK_NZ": CSR.DQ_BLOCK_NZ}, 4, 1),
    ]
    return out


def compile_all() -> int:
    """Compile every variant for sm_90; print one line each; return the number of failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for kernel, pointers, constexprs, num_warps, num_stages in variants():
        if constexprs.get("SPLIT_K", 1) != 1:  # a runtime argument; only the value 1 is specialised
            constexprs = {k: v for k, v in constexprs.items() if k != "SPLIT_K"}
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in kernel.arg_names}
        # Real launches specialise 16-byte aligned pointers and sizes/strides divisible by 16;
        # M (activation rows) is the one size that usually is not.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name] != "constexpr" and name not in ("M", "M_BUCKET", "MN")}
        label = f"{kernel.fn.__name__} {constexprs}"
        try:
            triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget(*TARGET),
                           options={"num_warps": num_warps, "num_stages": num_stages})
            print(f"ok   {label}")
        except Exception as exc:  # report every failure, not just the first
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}")
    return failures


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-8000:]
    assert "FAIL" not in proc.stdout


if __name__ == "__main__":
    sys.exit(1 if compile_all() else 0)
