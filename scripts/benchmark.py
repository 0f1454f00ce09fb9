"""Encode/decode speed, memory and accuracy: ldm_vae against diffusers (eager and ``torch.compile``) and
OpenVINO, on the same random SD-shaped weights.

Every case runs in a fresh subprocess, so its peak RSS is its own. With ``--rounds N`` the cases run N times,
interleaved (round 1 runs every case once, then round 2, ...), and medians are over rounds, so a change in
machine load hits every case alike. Compiled cases (``torch.compile`` with inductor, freezing on; OpenVINO's
``convert_model`` + ``compile_model``) report their first call, compilation included, as ``first s``.
Accuracy is against the fp32 untiled decode/encode (ldm_vae and diffusers agree bit for bit there). Usage:

    python scripts/benchmark.py [--sizes 256 512 1024] [--tiled-sizes 2048] [--rounds 3] [--json bench.json]

OpenVINO is optional (``pip install -e ".[benchmark]"`` or ``pip install openvino``); without it its case is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 1024**3

# name -> (library, dtype, how)
CASES = {
    "diffusers fp32": ("diffusers", "fp32", "plain"),
    "diffusers bf16+channels_last": ("diffusers", "bf16", "plain"),
    "diffusers bf16+channels_last compile": ("diffusers", "bf16", "compile"),
    "diffusers tiled fp32": ("diffusers", "fp32", "tiled"),
    "openvino bf16": ("openvino", "bf16", "compile"),
    "ldm_vae fp32": ("ldm_vae", "fp32", "plain"),
    "ldm_vae auto": ("ldm_vae", "auto", "plain"),
    "ldm_vae auto compile": ("ldm_vae", "auto", "compile"),
    "ldm_vae exact-tiled fp32": ("ldm_vae", "fp32", "tiled"),
    "ldm_vae exact-tiled auto": ("ldm_vae", "auto", "tiled"),
}
TILED_MAX_MEMORY = 2_500_000_000  # the 2.5 GB (decimal) the 2048 decode must fit in


def proc_status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmRSS now, VmHWM peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _inductor_for_inference() -> None:
    """Inductor's CPU inference settings: weights frozen into the graph as constants (folds layout
    conversions and lets oneDNN pre-pack them), as diffusers' and PyTorch's CPU inference guides do."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True


def _diffusers_run(spec: dict, inp: torch.Tensor):
    import diffusers

    torch_dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    model = diffusers.AutoencoderKL.from_pretrained(spec["weights"], torch_dtype=torch_dtype).eval()
    if spec["dtype"] == "bf16":
        model = model.to(memory_format=torch.channels_last)
        inp = inp.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    if spec["how"] == "tiled":
        model.enable_tiling()
    if spec["how"] == "compile":  # what diffusers' docs suggest: compile the networks
        _inductor_for_inference()
        model.encoder.compile(fullgraph=True)
        model.decoder.compile(fullgraph=True)
    if spec["op"] == "encode":
        return lambda: model.encode(inp).latent_dist.mean.float()
    return lambda: model.decode(inp).sample.float()


def _openvino_run(spec: dict, inp: torch.Tensor):
    """diffusers' encoder (+ quant_conv) or (post_quant_conv +) decoder through OpenVINO, bf16 inference."""
    import diffusers
    import openvino as ov

    model = diffusers.AutoencoderKL.from_pretrained(spec["weights"]).eval()
    if spec["op"] == "encode":
        net = torch.nn.Sequential(model.encoder, model.quant_conv)
    else:
        net = torch.nn.Sequential(model.post_quant_conv, model.decoder)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    compiled = None

    def run():
        nonlocal compiled
        if compiled is None:  # static shape, converted and compiled on the first call (counted in first s)
            compiled = core.compile_model(ov.convert_model(net, example_input=inp), "CPU", config)
        out = torch.from_numpy(compiled(inp.numpy())[0])
        return out[:, : out.shape[1] // 2] if spec["op"] == "encode" else out  # the posterior mean

    return run


def _ldm_vae_run(spec: dict, inp: torch.Tensor):
    from ldm_vae import AutoencoderKL

    model = AutoencoderKL.from_pretrained(spec["weights"], dtype=spec["dtype"])
    if spec["how"] == "compile":
        _inductor_for_inference()
        model.compile_()
    kwargs = {"max_memory": TILED_MAX_MEMORY} if spec["how"] == "tiled" else {}
    if spec["op"] == "encode":
        return lambda: model.encode(inp, **kwargs).mean
    return lambda: model.decode(inp, **kwargs)


GEMM_N = 4096  # the ceiling's matrix size: large enough that oneDNN runs at its peak


def gemm_worker(spec: dict) -> None:
    """Times a ``GEMM_N``-cubed matmul in this (fresh) process: the compute ceiling of the machine.

    The dtype is the one ``auto`` computes in: bf16 where the CPU has native bf16, else fp32 (emulated bf16
    runs about 100x below the fp32 peak on AVX2, which would make a 4096^3 product take minutes).
    """
    from ldm_vae.runtime import resolve_dtype

    a, b = (torch.randn(GEMM_N, GEMM_N, dtype=resolve_dtype(spec["dtype"])) for _ in range(2))
    for _ in range(2):  # oneDNN picks and builds its kernel on the first calls
        a @ b
    times: list[float] = []
    while len(times) < 3 or (len(times) < 10 and sum(times) < 5.0):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    tflops = 2 * GEMM_N**3 / statistics.median(times) / 1e12
    Path(spec["result"]).write_text(json.dumps({"tflops": tflops}))


def worker(spec: dict) -> None:
    """Runs one case in this (fresh) process and writes timings, memory and the output."""
    if spec["library"] == "gemm":
        return gemm_worker(spec)
    torch.manual_seed(0)
    inp = torch.load(spec["input"], weights_only=True)
    run = {"diffusers": _diffusers_run, "openvino": _openvino_run, "ldm_vae": _ldm_vae_run}[spec["library"]](
        spec, inp
    )
    times, first = [], None
    with torch.no_grad():
        if spec["warmup"]:
            t = time.perf_counter()
            run()  # one untimed run: oneDNN builds its kernels (and compilers compile) on first use
            first = time.perf_counter() - t
        base = proc_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t)
    peak = proc_status("VmHWM")
    torch.save(out.contiguous(), spec["output"])
    result = {"times": times, "first_s": first, "peak_above_model": peak - base}
    Path(spec["result"]).write_text(json.dumps(result))


def run_worker(tmp: Path, spec: dict) -> dict:
    """Runs ``spec`` in a fresh ``--worker`` process (its peak RSS is its own) and returns what it wrote."""
    spec = dict(spec, result=str(tmp / "result.json"))
    (tmp / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, "--worker", str(tmp / "spec.json")], check=True)
    return json.loads((tmp / "result.json").read_text())


def conv_flops(op: str, size: int) -> int:
    """The SD-shaped untiled pass's convolution FLOPs (2 * MACs), counted on meta tensors."""
    from benchmark_tiling import tiled_flops  # this script's folder is on sys.path when run as a script

    from ldm_vae import AutoencoderKL

    vae = AutoencoderKL.from_pretrained("sd").to(device="meta").eval()
    shape = (1, 4, size // 8, size // 8) if op == "decode" else (1, 3, size, size)
    return tiled_flops(vae, op, torch.zeros(shape, device="meta"), None)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    span = float(b.max() - b.min())
    mse = float((a.double() - b.double()).square().mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(span**2 / mse)).item()


def peak_gb(row: dict) -> float:
    """Peak in decimal GB (results files before 2026-11-22 12:00 held only GiB in ``peak_gb``)."""
    return row["peak_bytes"] / 1e9 if "peak_bytes" in row else row["peak_gb"] * GIB / 1e9


def accuracy(row: dict) -> tuple[str, str]:
    """Max abs diff and PSNR against the reference as text, blank when the run had none (``--no-reference``)."""
    if row["max_abs_diff"] is None:
        return "", ""
    return f"{row['max_abs_diff']:.1e}", "inf" if row["psnr_db"] == float("inf") else f"{row['psnr_db']:.1f}"


def markdown_table(report: dict) -> str:
    """The results as a Markdown table, with speed-ups against diffusers' fp32 and bf16 runs of the same case."""
    rows = report["results"]
    by_key = {(r["op"], r["size"], r["case"]): r for r in rows}
    lines = [
        f"Machine: {report['machine']}.",
        "",
        "| op | size | case | median s | first s | x vs diffusers fp32 | x vs diffusers bf16 | x vs diffusers bf16 "
        "compile | % of GEMM ceiling | peak GB | max abs diff | PSNR dB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if report.get("gemm_tflops"):
        lines[0] += (
            f" {report.get('gemm_dtype', 'bf16')} GEMM ceiling ({GEMM_N}^3 matmul, median of rounds): "
            f"{report['gemm_tflops']:.2f} TFLOP/s."
        )
    for r in rows:
        ratios = []
        for base in (
            "diffusers fp32",
            "diffusers bf16+channels_last",
            "diffusers bf16+channels_last compile",
        ):
            ref = by_key.get((r["op"], r["size"], base))
            ratios.append(f"{ref['median_s'] / r['median_s']:.2f}" if ref else "")
        first = "" if r.get("first_s") is None else f"{r['first_s']:.1f}"
        ceiling = f"{100 * r['ceiling_fraction']:.0f}%" if r.get("ceiling_fraction") else ""
        lines.append(
            f"| {r['op']} | {r['size']} | {r['case']} | {r['median_s']:.2f} | {first} | {' | '.join(ratios)} | "
            f"{ceiling} | {peak_gb(r):.2f} | {' | '.join(accuracy(r))} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024], help="sizes run by every case")
    p.add_argument(
        "--tiled-sizes", type=int, nargs="*", default=[2048], help="sizes run only by ldm_vae tiled"
    )
    p.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case and round (1 above 512 px)")
    p.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds of all cases (medians over rounds)"
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the fp32 untiled reference (minutes and over 16 GB at 2048): no accuracy columns",
    )
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print a results file as a Markdown table, run nothing"
    )
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker.read_text()))
    if args.markdown:
        return print(markdown_table(json.loads(args.markdown.read_text())))

    from ldm_vae import AutoencoderKL
    from ldm_vae.runtime import native_bf16

    tmp = Path(tempfile.mkdtemp(prefix="ldm_vae_bench_"))
    torch.manual_seed(0)
    reference_model = AutoencoderKL.from_pretrained("sd")
    reference_model.save_pretrained(tmp / "weights")
    machine = (
        f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    with open("/proc/cpuinfo") as f:
        model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"machine: {model_name}; {machine}; SD-shaped random weights")
    results, gemm_runs = [], []
    gemm_dtype = "bf16" if native_bf16() else "fp32"  # the ceiling of the dtype ``auto`` runs in
    header = (
        f"{'op':6} {'size':>5} {'case':38} {'median s':>9} {'first s':>8} {'ceiling':>8} {'peak GB':>8} "
        f"{'max|diff|':>10} {'PSNR dB':>8}"
    )
    print(header)
    for op in args.ops:
        for size in sorted({*args.sizes, *args.tiled_sizes}):
            cases = [
                c
                for c in args.cases
                if size in args.sizes or (CASES[c][2] == "tiled" and c.startswith("ldm"))
            ]
            gen = torch.Generator().manual_seed(size)
            if op == "encode":
                inp = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
            else:
                inp = torch.randn(1, 4, size // 8, size // 8, generator=gen)
            torch.save(inp, tmp / "input.pt")
            ref = None
            if not args.no_reference:
                with torch.no_grad():  # the fp32 untiled reference, in this process
                    ref = reference_model.encode(inp).mean if op == "encode" else reference_model.decode(inp)
            if "openvino bf16" in cases and importlib.util.find_spec("openvino") is None:
                cases.remove("openvino bf16")
                print("openvino is not installed (pip install openvino): its case is skipped")
            per_case: dict[str, list[dict]] = {c: [] for c in cases}
            flops = conv_flops(op, size)
            for _ in range(args.rounds):  # interleaved: each round runs every case once
                # Each round, so the ceiling is measured under the same load as the cases.
                gemm_runs.append(run_worker(tmp, {"library": "gemm", "dtype": gemm_dtype})["tflops"])
                for case in cases:
                    library, dtype, how = CASES[case]
                    spec = dict(
                        library=library,
                        dtype=dtype,
                        how=how,
                        op=op,
                        weights=str(tmp / "weights"),
                        input=str(tmp / "input.pt"),
                        output=str(tmp / "out.pt"),
                        repeats=args.repeats if size <= 512 else 1,
                        warmup=size <= 512 or how == "compile",  # above 512 one timed run (minutes each)
                    )
                    res = run_worker(tmp, spec)
                    res["output"] = torch.load(tmp / "out.pt", weights_only=True)
                    per_case[case].append(res)
            for case, runs in per_case.items():
                out = runs[-1]["output"]
                row = dict(
                    op=op,
                    size=size,
                    case=case,
                    # the median of the rounds' medians: each round's repeats are one sample of the load
                    median_s=statistics.median(statistics.median(r["times"]) for r in runs),
                    times=[r["times"] for r in runs],
                    first_s=runs[0]["first_s"],
                    peak_bytes=max(r["peak_above_model"] for r in runs),
                    max_abs_diff=None if ref is None else float((out - ref).abs().max()),
                    psnr_db=None if ref is None else psnr(out, ref),
                )
                row["peak_gb"] = row["peak_bytes"] / 1e9  # decimal GB, as the 2.5 GB target
                # Standard count (convolutions only, nearest upsampling): the share of the machine's bf16 peak.
                row["conv_flops"] = flops
                row["ceiling_fraction"] = flops / row["median_s"] / (statistics.median(gemm_runs) * 1e12)
                results.append(row)
                diff_text, psnr_text = accuracy(row)
                first_text = "" if row["first_s"] is None else f"{row['first_s']:.1f}"
                print(
                    f"{op:6} {size:>5} {case:38} {row['median_s']:>9.2f} {first_text:>8} "
                    f"{100 * row['ceiling_fraction']:>7.0f}% {row['peak_gb']:>8.2f} {diff_text:>10} {psnr_text:>8}",
                    flush=True,
                )
                if args.json:  # after every size: a long run stopped early keeps what it measured
                    report = {
                        "machine": f"{model_name}; {machine}",
                        "rounds": args.rounds,
                        "gemm_dtype": gemm_dtype,
                        "gemm_tflops": statistics.median(gemm_runs),
                        "gemm_tflops_runs": gemm_runs,
                        "results": results,
                    }
                    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
