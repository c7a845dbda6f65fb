"""Compile every sparsekernels Triton kernel for a CUDA target without a GPU (ttir -> ptx ->
cubin with the ptxas bundled in triton), over the constexpr combinations the launchers use.

    python tools/check_triton.py [ARCH] [FILTER]     # ARCH 90 (H100/H200) by default

Catches frontend, API and lowering errors that the CPU interpreter (TRITON_INTERPRET=1, what
CI runs) cannot see, e.g. against the GPU image's triton 3.6. It proves the kernels compile,
not that they compute the right numbers: that is `make test-gpu`. Exit code 1 on any failure.
Checked 2026-11-24: 819 of 819 compile on triton 3.6.0 and 3.8.0 for sm_90; the 6 cases
added since (bsr_ffn's gelu_tanh and relu epilogues) compile on both.
The gated row-block kernel (bsr_gated_ffn: GATED, silu) adds 14 cases.
"""
import itertools
import sys
import traceback

import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

from sparsekernels.ops.triton import bsr_linear as bl, block_sparse_attention as bsa

TARGET = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)
FLOATS = {"sm_scale", "dropout_p"}


def jit_of(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k


def compile_one(kernel, ptrs, consts, num_warps=4, num_stages=3):
    fn = jit_of(kernel)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


cases = []
tdt = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def rowblock_ptrs(dt):
    return dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", out_ptr=f"*{dt}", bias_ptr=f"*{dt}", ptr_ptr="*i32",
                idx_ptr="*i32", perm_ptr="*i32", w2_ptr=f"*{dt}", bias2_ptr=f"*{dt}",
                ptr2_ptr="*i32", idx2_ptr="*i32")


for dt, (bo, bi), bias, perm, act, in itertools.product(
        ["fp32", "fp16", "bf16"], [(16, 16), (32, 64), (64, 32)], [False, True], [False, True], ["none", "gelu"]):
    prec = "ieee" if dt == "fp32" else "tf32"
    cases.append((f"rowblock {dt} {bo}x{bi} bias={bias} perm={perm} {act}", bl._bsr_rowblock_kernel,
                  rowblock_ptrs(dt),
                  dict(BLOCK_OUT=bo, BLOCK_IN=bi, HAS_BIAS=bias, HAS_PERM=perm, ACTIVATION=act, GATED=False,
                       DOT_PRECISION=prec, UPCAST_DOT=False, BLOCK_M=64, GROUP_M=8)))
for dt, act in itertools.product(["fp32", "fp16", "bf16"], ["gelu_tanh", "relu"]):  # bsr_ffn's
    cases.append((f"rowblock {dt} 32x64 bias=True perm=False {act}", bl._bsr_rowblock_kernel,
                  rowblock_ptrs(dt),
                  dict(BLOCK_OUT=32, BLOCK_IN=64, HAS_BIAS=True, HAS_PERM=False, ACTIVATION=act, GATED=False,
                       DOT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST_DOT=False,
                       BLOCK_M=64, GROUP_M=8)))
for dt, act, bias in itertools.product(["fp32", "fp16", "bf16"], ["silu", "gelu_tanh"], [False, True]):
    cases.append((f"rowblock gated {dt} 32x64 bias={bias} {act}", bl._bsr_rowblock_kernel,
                  rowblock_ptrs(dt),
                  dict(BLOCK_OUT=32, BLOCK_IN=64, HAS_BIAS=bias, HAS_PERM=False, ACTIVATION=act,
                       GATED=True, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                       UPCAST_DOT=False, BLOCK_M=64, GROUP_M=8)))
for dt in ["fp32", "bf16"]:  # the silu epilogue alone (bsr_ffn with silu)
    cases.append((f"rowblock {dt} 64x32 bias=True silu", bl._bsr_rowblock_kernel, rowblock_ptrs(dt),
                  dict(BLOCK_OUT=64, BLOCK_IN=32, HAS_BIAS=True, HAS_PERM=False, ACTIVATION="silu",
                       GATED=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                       UPCAST_DOT=False, BLOCK_M=64, GROUP_M=8)))
cases.append(("rowblock fp32 tf32", bl._bsr_rowblock_kernel,
              rowblock_ptrs("fp32"),
              dict(BLOCK_OUT=32, BLOCK_IN=32, HAS_BIAS=True, HAS_PERM=False, ACTIVATION="none", GATED=False,
                   DOT_PRECISION="tf32", UPCAST_DOT=False, BLOCK_M=16, GROUP_M=8)))
cases.append(("rowblock bf16 upcast (interpreter config)", bl._bsr_rowblock_kernel,
              rowblock_ptrs("bf16"),
              dict(BLOCK_OUT=32, BLOCK_IN=32, HAS_BIAS=False, HAS_PERM=True, ACTIVATION="none", GATED=False,
                   DOT_PRECISION="tf32", UPCAST_DOT=True, BLOCK_M=32, GROUP_M=4)))
for dt, out, (bo, bi), bt in itertools.product(["fp32", "fp16", "bf16"], ["same", "fp32"], [(16, 16), (32, 64)], [32, 128]):
    prec = "ieee" if dt == "fp32" else "tf32"
    cases.append((f"sdd {dt} out={out} {bo}x{bi} T{bt}", bl._bsr_sdd_kernel,
                  dict(g_ptr=f"*{dt}", x_ptr=f"*{dt}", out_ptr=f"*{dt if out == 'same' else 'fp32'}",
                       row_ptr="*i32", col_ptr="*i32"),
                  dict(BLOCK_OUT=bo, BLOCK_IN=bi, DOT_PRECISION=prec, UPCAST_DOT=False, BLOCK_T=bt)))

for dt, mask, causal, drop, even, (bm, bn, bd) in itertools.product(
        ["fp32", "fp16", "bf16"], [None, "bool", "add"], [False, True], [False, True], [False, True],
        [(32, 32, 64), (64, 64, 128), (16, 32, 16)]):
    prec = "ieee" if dt == "fp32" else "tf32"
    mptr = {None: f"*{dt}", "bool": "*u8", "add": f"*{dt}"}[mask]
    window = even  # sliding windows: half the matrix, both causal and bidirectional
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HAS_MASK=mask is not None,
                  MASK_IS_BOOL=mask == "bool", IS_CAUSAL=causal, HAS_WINDOW=window, DROPOUT=drop,
                  PRECISION=prec, EVEN=even)
    nw = 4 if bm * bd <= 64 * 64 else 8
    name = (f"{dt} mask={mask} causal={causal} window={window} drop={drop} even={even} "
            f"{bm}/{bn}/{bd}")
    cases.append(("bsa fwd " + name, bsa._bsa_fwd_kernel,
                  dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", Mask=mptr, KvIdx="*i32", KvCnt="*i32",
                       Out=f"*{dt}", Stats="*fp32"), common, nw))
    cases.append(("bsa dkdv " + name, bsa._bsa_bwd_dkdv_kernel,
                  dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", Mask=mptr, DO=f"*{dt}", Stats="*fp32",
                       Delta="*fp32", QIdx="*i32", QCnt="*i32", DK=f"*{dt}", DV=f"*{dt}"), common, nw))
    for wdb in ([False, True] if mask == "add" else [False]):
        cases.append((f"bsa dq dbias={wdb} " + name, bsa._bsa_bwd_dq_kernel,
                      dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", Mask=mptr, DO=f"*{dt}", Stats="*fp32",
                           Delta="*fp32", KvIdx="*i32", KvCnt="*i32", DQ=f"*{dt}",
                           DBias="*fp32" if wdb else f"*{dt}"), dict(common, WRITE_DBIAS=wdb), nw))
cases.append(("bsa keep mask", bsa._keep_mask_kernel, dict(Out="*i8"), dict(BLOCK_M=32, BLOCK_N=32), 4))

only = sys.argv[2] if len(sys.argv) > 2 else ""
fails = 0
n = 0
seen_err = {}
for c in cases:
    label, kern, ptrs, consts = c[:4]
    nw = c[4] if len(c) > 4 else 4
    if only and only not in label:
        continue
    n += 1
    try:
        k = compile_one(kern, ptrs, consts, num_warps=nw)
        assert k.asm.get("cubin"), "no cubin"
    except Exception as e:  # noqa: BLE001
        fails += 1
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        key = msg[:300]
        if key not in seen_err:
            seen_err[key] = label
            print(f"FAIL {label}:\n{msg[:3000]}\n", flush=True)
        else:
            print(f"FAIL {label} (same error as {seen_err[key]})", flush=True)
print(f"triton {triton.__version__} target {TARGET}: {n - fails} compiled, {fails} failed")
sys.exit(1 if fails else 0)
