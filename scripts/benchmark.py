"""Encode/decode speed, memory and accuracy: ldm_vae against diffusers on the same random SD-shaped weights.

Every case runs in a fresh subprocess, so its peak RSS is its own. Accuracy is against the fp32 untiled
decode/encode (ldm_vae and diffusers agree bit for bit there). Usage:

    python scripts/benchmark.py [--sizes 256 512 1024] [--tiled-sizes 2048] [--json bench.json]
"""

from __future__ import annotations

import argparse
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
    "diffusers tiled fp32": ("diffusers", "fp32", "tiled"),
    "ldm_vae fp32": ("ldm_vae", "fp32", "plain"),
    "ldm_vae auto": ("ldm_vae", "auto", "plain"),
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


def worker(spec: dict) -> None:
    """Runs one case in this (fresh) process and writes timings, memory and the output."""
    torch.manual_seed(0)
    folder, op = spec["weights"], spec["op"]
    inp = torch.load(spec["input"], weights_only=True)
    if spec["library"] == "diffusers":
        import diffusers

        torch_dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
        model = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype).eval()
        if spec["dtype"] == "bf16":
            model = model.to(memory_format=torch.channels_last)
            inp = inp.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        if spec["how"] == "tiled":
            model.enable_tiling()

        def run():
            if op == "encode":
                return model.encode(inp).latent_dist.mean.float()
            return model.decode(inp).sample.float()
    else:
        from ldm_vae import AutoencoderKL

        model = AutoencoderKL.from_pretrained(folder, dtype=spec["dtype"])
        kwargs = {"max_memory": TILED_MAX_MEMORY} if spec["how"] == "tiled" else {}

        def run():
            return model.encode(inp, **kwargs).mean if op == "encode" else model.decode(inp, **kwargs)

    times = []
    with torch.no_grad():
        if spec["warmup"]:
            run()  # one untimed run: oneDNN builds its kernels on first use
        base = proc_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t)
    peak = proc_status("VmHWM")
    torch.save(out.contiguous(), spec["output"])
    Path(spec["result"]).write_text(json.dumps({"times": times, "peak_above_model": peak - base}))


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
        "| op | size | case | median s | x vs diffusers fp32 | x vs diffusers bf16 | peak GB | max abs diff | PSNR dB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratios = []
        for base in ("diffusers fp32", "diffusers bf16+channels_last"):
            ref = by_key.get((r["op"], r["size"], base))
            ratios.append(f"{ref['median_s'] / r['median_s']:.2f}" if ref else "")
        lines.append(
            f"| {r['op']} | {r['size']} | {r['case']} | {r['median_s']:.2f} | {ratios[0]} | {ratios[1]} | "
            f"{peak_gb(r):.2f} | {' | '.join(accuracy(r))} |"
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
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (1 above 512 px)")
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
    results = []
    header = (
        f"{'op':6} {'size':>5} {'case':30} {'median s':>9} {'peak GB':>8} {'max|diff|':>10} {'PSNR dB':>8}"
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
                    result=str(tmp / "result.json"),
                    repeats=args.repeats if size <= 512 else 1,
                    warmup=size <= 512,  # above that, one timed run (minutes each); it includes set-up
                )
                (tmp / "spec.json").write_text(json.dumps(spec))
                subprocess.run([sys.executable, __file__, "--worker", str(tmp / "spec.json")], check=True)
                res = json.loads((tmp / "result.json").read_text())
                out = torch.load(tmp / "out.pt", weights_only=True)
                row = dict(
                    op=op,
                    size=size,
                    case=case,
                    median_s=statistics.median(res["times"]),
                    times=res["times"],
                    peak_bytes=res["peak_above_model"],
                    peak_gb=res["peak_above_model"] / 1e9,  # decimal GB, as the 2.5 GB target
                    max_abs_diff=None if ref is None else float((out - ref).abs().max()),
                    psnr_db=None if ref is None else psnr(out, ref),
                )
                results.append(row)
                diff_text, psnr_text = accuracy(row)
                print(
                    f"{op:6} {size:>5} {case:30} {row['median_s']:>9.2f} {row['peak_gb']:>8.2f} "
                    f"{diff_text:>10} {psnr_text:>8}",
                    flush=True,
                )
                if args.json:  # after every case: a long run stopped early keeps what it measured
                    report = {"machine": f"{model_name}; {machine}", "results": results}
                    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
