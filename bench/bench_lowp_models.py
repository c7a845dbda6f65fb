"""BERT-base end to end with block sparsity and low precision together (CPU).

    python bench/bench_lowp_models.py           # BERT-base, 8 x 128 tokens, 70% and 90%
    python bench/bench_lowp_models.py --smoke   # a tiny BERT, seconds (CI); nothing written

Random weights; block masks as bench_models.py (every encoder Linear keeps a random 1 - s of
its 32x32 blocks). Variants, timed interleaved in one process (ratios of medians):
  dense_fp32        the dense model (torch)                  the reference of every ratio
  dense_bf16        the dense model in bf16 (torch)
  dense_dynint8     torch.ao.quantization.quantize_dynamic on the dense model (all Linears)
  openvino          OpenVINO's default on the dense model (n/a when not installed; both
                    extras: pip install -e ".[baselines]" --no-build-isolation)
  ort_fp32          ONNX Runtime on the dense model (n/a when not installed / not exportable)
  kernel_fp32       ModelSpeedup(mode="kernel")                       (fused FFN)
  kernel_bf16       ModelSpeedup(mode="kernel", dtype=torch.bfloat16)  (the model in bf16)
  kernel_int8       ModelSpeedup(mode="kernel", dtype="int8",          (fp32 activations,
                      attention_fp32_precision="bf16")                  attention products bf16,
                                                                        q / k / v written bf16)
  kernel_int8_bf16  the same, then model.to(torch.bfloat16): int8 weights, bf16 activations
  kernel_int8_qk8   kernel_int8's model with its attention precision switched to "int8" for
                      the call (q k^T in int8, per-row scales; P V in bf16): the same
                      instance, so the two differ in nothing else
Also, for every kernel mode: the share of the forward's time not in a sparse Linear / FFN
module (attention, whether SDPA or our block-sparse op, norms, adds, embeddings, copies,
Python), timed by hooks on the sparse modules against unhooked forwards (and against the
hooked ones, which carry the hooks' cost); for kernel_int8 and kernel_int8_bf16 also a
torch.profiler breakdown of it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from bench_models import apply, block_masks, build, dummy_for  # noqa: E402
from common import time_interleaved, write_results  # noqa: E402

from sparsekernels.ops.precision import cpu_isa  # noqa: E402
from sparsekernels.speedup import ModelSpeedup  # noqa: E402

DEEPSPARSE_PUBLISHED = 8.7  # BERT-base, 90% + int8 (their 32-core figure)


@dataclasses.dataclass(frozen=True)
class Case:
    sparsity: float
    batch: int = 8
    seq: int = 128


def openvino_runner(model, dummy, threads):
    """(callable, note) for OpenVINO's default on `model`, or (None, why)."""
    try:
        import openvino as ov
    except ImportError as exc:
        return None, f"not installed ({exc.name})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = ov.convert_model(model, example_input=dict(dummy))
        core = ov.Core()
        compiled = core.compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": threads})
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        request = compiled.create_infer_request()
        inputs = {k: v.numpy() for k, v in dummy.items()}
        return (lambda: request.infer(inputs)), f"OpenVINO {ov.__version__}, precision {precision}"
    except Exception as exc:  # report why instead of dropping the column
        return None, f"failed: {type(exc).__name__}: {str(exc)[:120]}"


def ort_runner(model, dummy, threads, workdir: Path):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return None, f"not installed ({exc.name})"
    path = workdir / "bert.onnx"
    try:
        names = list(dummy)

        class Positional(nn.Module):  # the exporter passes tensors by position
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *tensors):
                return self.model(**dict(zip(names, tensors)))[0]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Positional().eval(), tuple(dummy.values()), str(path),
                              input_names=names, dynamo=False, opset_version=17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = {k: v.numpy() for k, v in dummy.items()}
        return (lambda: session.run(None, inputs)), f"ONNX Runtime {ort.__version__} fp32"
    except Exception as exc:
        return None, f"failed: {type(exc).__name__}: {str(exc)[:120]}"


def _sparse_modules(model) -> list:
    """The outermost modules that run a sparse Linear / FFN op: SparseLinear and
    QuantizedSparseLinear (fused FFN layers included) and gated MLPs fused whole."""
    from sparsekernels.nn import QuantizedSparseLinear, SparseLinear

    found, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (SparseLinear, QuantizedSparseLinear)) or "_gated_ffn" in m.__dict__:
            found.append(m)
            inside.add(name)
    return found


def non_sparse_share(model, dummy, reps: int,
                     profiled: bool = True) -> tuple[float, float, float, list[tuple[str, float]]]:
    """(share of the forward's wall time outside the sparse Linear / FFN modules; the same
    share of the hooked forward; the same share in a profiled forward; the largest others
    there as (name, share)); profiled=False: nan and [] for the last two.

    The sparse modules are timed by forward hooks; the hooks' own cost (a module with hooks
    takes torch's slow call path: microseconds a call, tens of calls a forward) lands outside
    them, so the share is taken against the wall time of the unhooked forwards run just before
    and after each hooked one (their mean; median over `reps` hooked forwards); the hooked
    forward's own share is the second.

    The profiler adds its own cost to every op it records -- a few microseconds, hundreds of
    times per forward -- and that lands outside the sparse ops, so the profiled share is an
    upper bound. A sparse op's time
    includes what it calls (the fused FFN's activation) and its epilogue: a post-norm that
    runs inside the layer's kernel (nn.add_norm; the attention output's dense is called
    through its add_norm_forward, timed here as the hooks time a forward). The profiled
    forward goes through the ops' dispatcher, where those norms run as their own op
    (add_layer_norm), so its share also counts them outside."""
    import time
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile, record_function

    from sparsekernels.nn import QuantizedSparseLinear, SparseLinear

    spent, start, patched = [0.0], {}, []

    def pre(m, args):
        start[id(m)] = time.perf_counter()

    def post(m, args, out):
        spent[0] += time.perf_counter() - start.pop(id(m))

    handles = []

    def hook():
        for m in _sparse_modules(model):
            handles.extend([m.register_forward_pre_hook(pre), m.register_forward_hook(post)])
            if type(m) in (SparseLinear, QuantizedSparseLinear):  # a fused FFN's: in a forward
                def timed(*args, _m=m, _f=m.add_norm_forward):
                    t = time.perf_counter()
                    try:
                        return _f(*args)
                    finally:
                        spent[0] += time.perf_counter() - t
                m.add_norm_forward = timed  # the instance's, over the class's
                patched.append(m)

    def unhook():
        for h in handles:
            h.remove()
        for m in patched:
            del m.add_norm_forward
        handles.clear()
        patched.clear()

    def plain_forward() -> float:
        t0 = time.perf_counter()
        model(**dummy)
        return time.perf_counter() - t0

    shares, hooked_shares = [], []
    try:
        with torch.no_grad():
            model(**dummy)
            before = plain_forward()
            for _ in range(reps):  # hooked forwards between plain ones
                hook()
                spent[0] = 0.0
                t0 = time.perf_counter()
                model(**dummy)
                hooked = time.perf_counter() - t0
                unhook()
                after = plain_forward()
                shares.append(1 - spent[0] / ((before + after) / 2))
                hooked_shares.append(1 - spent[0] / hooked)
                before = after
    finally:
        unhook()
    shares.sort()
    hooked_shares.sort()
    wall_share, hooked_share = shares[len(shares) // 2], hooked_shares[len(shares) // 2]
    if not profiled:
        return wall_share, hooked_share, float("nan"), []

    class Dispatched(torch.overrides.TorchFunctionMode):
        """Any active mode sends eager calls through the ops' dispatcher (ops/eager.py),
        where the profiler sees them; the direct entries it skips would be invisible."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Dispatched():
        model(**dummy)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                with record_function("forward"):  # the whole forward's wall time
                    model(**dummy)
    events = prof.events()

    def sparse_op(e):  # a sparse Linear or FFN; attention counts as the rest of the graph
        return e.name.startswith("sparsekernels::bsr")

    def in_sparse(e):
        while e is not None:
            if sparse_op(e):
                return True
            e = e.cpu_parent
        return False

    total = sum(e.cpu_time_total for e in events if e.name == "forward")
    sparse = sum(e.cpu_time_total for e in events if sparse_op(e) and not in_sparse(e.cpu_parent))
    others = defaultdict(float)
    for e in events:
        if not in_sparse(e) and e.name != "forward":  # its self time: Python between ops
            others[e.name] += e.self_cpu_time_total
    top = sorted(((k, v / total) for k, v in others.items()), key=lambda kv: -kv[1])
    return wall_share, hooked_share, 1 - sparse / total, top[:6]


def variants_for(base, dummy, masks, extras):
    out = dict(extras)
    for name, kwargs, cast in (("kernel_fp32", {}, None),
                               ("kernel_bf16", {"dtype": torch.bfloat16}, None),
                               ("kernel_int8", {"dtype": "int8",
                                                "attention_fp32_precision": "bf16"}, None),
                               ("kernel_int8_bf16", {"dtype": "int8"}, torch.bfloat16)):
        m = copy.deepcopy(base)
        ModelSpeedup(m, dummy, masks, mode="kernel", block_size=(32, 32), **kwargs).speedup_model()
        if cast is not None:
            m.to(cast)
        out[name] = m
    out["kernel_int8_qk8"] = out["kernel_int8"]
    return out


# the attention product precision each model runs with (kernel_int8_qk8 is kernel_int8's model)
PRECISIONS = {"kernel_int8": "bf16", "kernel_int8_qk8": "int8"}


def with_precision(name: str, model: nn.Module):
    """model, its attention switched to the precision `name` runs with (a few attribute writes:
    cheap enough to sit in front of every timed call)."""
    from sparsekernels.attention.integration import _ATTR

    if name in PRECISIONS:
        configs = getattr(model, "_bench_attention_configs", None)
        if configs is None:
            configs = [c for c in (getattr(m, _ATTR, None) for m in model.modules())
                       if c is not None]
            model._bench_attention_configs = configs
        for c in configs:
            c.fp32_precision = PRECISIONS[name]
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--sparsities", default="0.7,0.9")
    p.add_argument("--no-extras", action="store_true", help="skip OpenVINO / ONNX Runtime")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base, scope = build("bert-base", args.smoke)
    base = base.eval()
    batch, seq = (2, 32) if args.smoke else (8, 128)
    dummy = dummy_for("bert-base", base, batch, seq)
    sparsities = [0.7] if args.smoke else [float(s) for s in args.sparsities.split(",")]
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="bench_lowp_models_"))
    rows, notes = [], []
    for s in sparsities:
        torch.manual_seed(1)
        masks = block_masks(base, scope, s)
        masked = apply(copy.deepcopy(base), masks)
        bf16 = copy.deepcopy(masked).to(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynint8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(masked), {nn.Linear},
                                                             dtype=torch.qint8)
        extras = {"dense_fp32": masked, "dense_bf16": bf16, "dense_dynint8": dynint8}
        fns = {}
        if not args.no_extras and not args.smoke:
            for name, runner in (("openvino", lambda: openvino_runner(masked, dummy, args.threads)),
                                 ("ort_fp32", lambda: ort_runner(masked, dummy, args.threads, workdir))):
                fn, note = runner()
                notes.append(f"- {name} (sparsity {s}): {note}")
                if fn is not None:
                    fns[name] = fn
        models = variants_for(base, dummy, masks, extras)
        with torch.no_grad():
            ref = masked(**dummy)[0].float()
            errors = {}
            for name, m in models.items():
                out = with_precision(name, m)(**dummy)[0].float()
                errors[name] = ((out - ref).norm() / ref.norm()).item()
            assert errors["kernel_fp32"] < 1e-4, errors
            assert max(errors.values()) < 0.1, errors
            fns.update({k: (lambda k=k, m=m: with_precision(k, m)(**dummy))
                        for k, m in models.items()})
            t = time_interleaved(fns, device, reps=3 if args.smoke else args.reps,
                                 budget_s=60 if args.smoke else 900)
        reps = 1 if args.smoke else 15
        shares = {"int8": non_sparse_share(with_precision("kernel_int8", models["kernel_int8"]),
                                           dummy, reps),
                  "int8_bf16": non_sparse_share(models["kernel_int8_bf16"], dummy, reps)}
        # the float kernel modes too: the share asked of "kernel mode" in each dtype
        shares.update({name: non_sparse_share(with_precision(f"kernel_{name}",
                                                             models[f"kernel_{name}"]),
                                              dummy, reps, profiled=False)
                       for name in ("fp32", "bf16", "int8_qk8")})
        row = {"model": "bert-base", "batch": batch, "seq": seq, "sparsity": s}
        for name in ("dense_fp32", "dense_bf16", "dense_dynint8", "openvino", "ort_fp32",
                     "kernel_fp32", "kernel_bf16", "kernel_int8", "kernel_int8_bf16",
                     "kernel_int8_qk8"):
            row[f"{name}_ms"] = t[name] * 1e3 if name in t else float("nan")
        nan = float("nan")
        for name in ("kernel_int8", "kernel_int8_bf16", "kernel_int8_qk8"):
            row[f"{name}_vs_dense"] = t["dense_fp32"] / t[name]
            row[f"{name}_vs_dynint8"] = t["dense_dynint8"] / t[name]
            row[f"{name}_vs_openvino"] = t["openvino"] / t[name] if "openvino" in t else nan
        row["kernel_fp32_vs_dense"] = t["dense_fp32"] / t["kernel_fp32"]
        row["kernel_bf16_vs_kernel_fp32"] = t["kernel_fp32"] / t["kernel_bf16"]
        row["dynint8_vs_dense"] = t["dense_fp32"] / t["dense_dynint8"]
        row["openvino_vs_dense"] = t["dense_fp32"] / t["openvino"] if "openvino" in t else nan
        for name in ("fp32", "bf16", "int8", "int8_bf16", "int8_qk8"):
            row[f"{name}_non_sparse_share"] = shares[name][0]
        for name in ("fp32", "bf16", "int8", "int8_bf16", "int8_qk8"):
            row[f"{name}_non_sparse_share_hooked"] = shares[name][1]
        for name in ("int8", "int8_bf16"):
            row[f"{name}_non_sparse_share_profiled"] = shares[name][2]
        for name in ("kernel_bf16", "kernel_int8", "kernel_int8_bf16", "kernel_int8_qk8",
                     "dense_dynint8"):
            row[f"{name}_rel_err"] = errors[name]
        rows.append(row)
        notes.append(f"- sparsity {s}: time outside sparse ops, kernel_int8: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in shares["int8"][3])
                     + "; kernel_int8_bf16: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in shares["int8_bf16"][3]))
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()))
        del models, masked, bf16, dynint8, fns
    if args.smoke:
        return 0
    head = [f"- low-precision paths: {cpu_isa()}; batch {batch} x {seq} tokens, random weights, "
            "32x32 block masks in every encoder Linear",
            "- *_vs_X = X time / variant time (medians of interleaved repetitions, one process); "
            f"DeepSparse's published BERT-base figure at 90% + int8: x{DEEPSPARSE_PUBLISHED}",
            "- *_non_sparse_share: share of the forward's wall time outside the sparse Linear / "
            "FFN modules (attention, SDPA or ours, layer norms, residual adds, embeddings, "
            "copies, Python): the sparse modules timed by forward hooks, against the wall time "
            "of the unhooked forwards just before and after each hooked one (median of 15); "
            "*_hooked: against the hooked forward's own time, which also holds the hooks' cost "
            "(torch's slow call path for a hooked module); *_profiled: the same share in a "
            "torch.profiler forward, "
            "where the profiler's own per-op cost lands outside the sparse ops (an upper "
            "bound; the breakdown below is from it); rel_err = "
            "|y - y_masked_fp32| / |y_masked_fp32| on the last hidden state"]
    cols = list(rows[0])
    out = write_results(device, "lowp_models", "BERT-base: block sparsity with bf16 and int8 (CPU)",
                        rows, head + notes + [f"- {n}" for n in args.note], cols)
    print(f"wrote {out}/lowp_models.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
