"""Turn the pytest-benchmark JSON of ``benchmarks/test_bsconv_u.py`` into a markdown section and a PNG plot.

    python benchmarks/report.py [RESULTS.json] [--out-dir benchmark-results] [--update-markdown BENCHMARKS.md]

Without a path it reads ``benchmark-results/bsconv-gpu.json`` if it exists, else ``benchmark-results/bsconv-cpu.json``
(where ``pytest benchmarks --benchmark-only`` writes by default). Writes ``<out-dir>/report-<device>.md`` and
``<out-dir>/speedup-<device>.png``; ``--update-markdown FILE`` also replaces the text between
``<!-- bench-report:<device>:begin -->`` and ``<!-- bench-report:<device>:end -->`` in FILE (appending the markers
when absent).

Times: ``extra_info["time_ms"]`` (GPU: do_bench/CUDA events; CPU: min of pytest-benchmark's wall-clock rounds); when it is
missing, pytest-benchmark's own median. Speed-up of a contender = the fastest non-fused contender (reference in NCHW or
channels_last, composed dense conv, torch.compile) of the same shape/dtype/pass divided by its time; in results
without fused contenders (CPU) the speed-up is over the NCHW reference instead: ``bsconv_cuda.bench_harness``'s
formula, the one ``python -m bsconv_cuda.bench`` prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# This checkout's harness (its speed-up formula), not another installed copy: the report reads what this checkout's
# suite wrote.
sys.path.insert(0, str(REPO))

from bsconv_cuda import bench_harness, bench_models  # noqa: E402
from bsconv_cuda.bench_harness import FUSED  # noqa: E402

PASS_ORDER = ("fwd", "bwd", "fwdbwd")
LABEL_ORDER = ("reference-nchw", "reference-cl", "composed-nchw", "composed-cl", "compile-nchw", "compile-cl",
               "triton-nchw", "triton-cl", "cuda-nchw", "cuda-cl")


def _timed(data: dict, *keys: str) -> list[dict]:
    """The ``extra_info`` of every timed test whose info has ``keys``, with its time in ``time_ms``."""
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if any(key not in info for key in keys):
            continue  # another module's test
        ms = info.get("time_ms")
        if ms is None and b.get("stats"):
            ms = b["stats"]["median"] * 1e3
        if ms is not None:
            rows.append(dict(info, time_ms=float(ms)))
    return rows


def load(path: Path) -> tuple[list[dict], dict]:
    """Rows (one per timed test) and machine info from a pytest-benchmark JSON file."""
    data = json.loads(Path(path).read_text())
    rows = [dict(info, label=info.get("label") or bench_harness.label(info["contender"], info["layout"]))
            for info in _timed(data, "shape", "contender")]
    return rows, data.get("machine_info", {})


def load_models(path: Path) -> list[dict]:
    """Rows of benchmarks/test_models.py from the same JSON."""
    return _timed(json.loads(Path(path).read_text()), "model", "variant")


def models_markdown(rows: list[dict]) -> str:
    """One row per (model, mode, precision): as built vs after bsconv_cuda.convert."""
    if not rows:
        return ""
    groups: dict = defaultdict(dict)
    for r in rows:
        groups[(r["model"], r["mode"], r["precision"])][r["variant"]] = r
    lines = ["#### Models (channels_last): as built vs after `bsconv_cuda.convert`", "",
             "| model | step | precision | batch | built ms | converted ms | speed-up | peak MiB built | "
             "peak MiB converted |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    mib = lambda r: f"{r['peak_mem_bytes'] / 2**20:.0f}" if r and r.get("peak_mem_bytes") else "–"  # noqa: E731
    for (model, mode, precision), by in groups.items():
        b, c = by.get("built"), by.get("converted")
        gain = bench_models.speedup({variant: r["time_ms"] for variant, r in by.items()})
        sp = "–" if gain is None else f"{gain:.2f}x"
        batch = (b or c)["batch"]
        lines.append(f"| {model} | {mode} | {precision} | {batch} | {_fmt_ms(b['time_ms']) if b else '–'} | "
                     f"{_fmt_ms(c['time_ms']) if c else '–'} | {sp} | {mib(b)} | {mib(c)} |")
    lines.append("")
    return "\n".join(lines)


def _order(labels) -> list[str]:
    return sorted(labels, key=lambda lab: (LABEL_ORDER.index(lab) if lab in LABEL_ORDER else len(LABEL_ORDER), lab))


def speedups(rows: list[dict]) -> dict:
    """{(shape, dtype, pass): {label: speed-up}} as described in the module docstring."""
    groups: dict = defaultdict(dict)
    for r in rows:
        groups[(r["shape"], r["dtype"], r["pass_"])][r["label"]] = r
    any_fused = any(r["contender"] in FUSED for r in rows)
    out = {}
    for key, by_label in groups.items():
        baseline, speedup = bench_harness.layer_speedups({lab: r["time_ms"] for lab, r in by_label.items()}, any_fused)
        if baseline is not None:
            out[key] = speedup
    return out


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def markdown(rows: list[dict], machine: dict, source: str) -> str:
    if not rows:
        return "_no BSConv-U benchmark results in the file_\n"
    device = rows[0].get("device", "?")
    any_fused = any(r["contender"] in FUSED for r in rows)
    sp = speedups(rows)
    lines = []
    dev_name = machine.get("bsconv_device", device)
    lines.append(f"Results from `{source}` on **{dev_name}** (torch {machine.get('torch', '?')}, "
                 f"triton {machine.get('triton', '?')}, set `{machine.get('bench_set', '?')}`).")
    lines.append("")
    if device != "cuda":
        lines.append("**CPU timings of the reference contenders only** (small batch, shared CI-class CPU, noisy). "
                     "They say nothing about the fused GPU kernels; speed-up is over the NCHW reference.")
    else:
        bw = machine.get("copy_bandwidth_gbs")
        lines.append(f"GPU times: median of `triton.testing.do_bench` (CUDA events, L2 flushed). Measured copy "
                     f"bandwidth: {bw:.0f} GB/s. Speed-up: fastest non-fused contender / fused contender. "
                     "GB/s: fused byte floor (x + y + weights, each once) / time." if bw else "GPU times.")
    lines.append("")
    by_dp: dict = defaultdict(list)
    for r in rows:
        by_dp[(r["dtype"], r["pass_"])].append(r)
    for (dtype, pass_) in sorted(by_dp, key=lambda k: (k[0], PASS_ORDER.index(k[1]) if k[1] in PASS_ORDER else 9)):
        group = by_dp[(dtype, pass_)]
        labels = _order({r["label"] for r in group})
        lines.append(f"#### {dtype}, {pass_} (times in ms)")
        lines.append("")
        header = ["shape", *labels]
        if any_fused:
            header += ["best fused", "speed-up", "GB/s (% of copy)"]
            if pass_ == "fwdbwd":
                header.append("peak mem vs ref")
        else:
            header += [f"{lab} speed-up" for lab in labels if lab != "reference-nchw"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        shapes_in_order = []
        for r in group:
            if r["shape"] not in shapes_in_order:
                shapes_in_order.append(r["shape"])
        for shape in shapes_in_order:
            by_label = {r["label"]: r for r in group if r["shape"] == shape}
            desc = next(iter(by_label.values())).get("describe", "")
            cells = [f"{shape} ({desc})" if desc else shape]
            cells += [_fmt_ms(by_label[lab]["time_ms"]) if lab in by_label else "–" for lab in labels]
            s = sp.get((shape, dtype, pass_), {})
            if any_fused:
                times = {lab: r["time_ms"] for lab, r in by_label.items()}
                best = by_label.get(bench_harness.fastest(times, [lab for lab in labels
                                                                  if bench_harness.contender_of(lab) in FUSED]))
                if best is not None:
                    cells.append(best["label"])
                    cells.append(f"{s.get(best['label'], float('nan')):.2f}x")
                    gbs, frac = best.get("gbs"), best.get("frac_copy_bw")
                    cells.append(f"{gbs:.0f} ({100 * frac:.0f}%)" if gbs is not None and frac is not None else "–")
                    if pass_ == "fwdbwd":
                        ratio = best.get("peak_mem_vs_ref")
                        cells.append(f"{ratio:.2f}" if ratio is not None else "–")
                else:
                    cells += ["–", "–", "–"] + (["–"] if pass_ == "fwdbwd" else [])
            else:
                cells += [f"{s[lab]:.2f}x" if lab in s else "–" for lab in labels if lab != "reference-nchw"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """Speed-up per shape and contender: one panel per (dtype, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = speedups(rows)
    any_fused = any(r["contender"] in FUSED for r in rows)
    dps = sorted({(k[1], k[2]) for k in sp}, key=lambda k: (k[0], PASS_ORDER.index(k[1]) if k[1] in PASS_ORDER else 9))
    if not dps:
        raise ValueError("no speed-ups to plot")
    shapes = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    labels = _order({lab for v in sp.values() for lab in v})
    if any_fused:
        labels = [lab for lab in labels if lab.split("-")[0] in FUSED]
    else:
        labels = [lab for lab in labels if lab != "reference-nchw"] or labels
    fig, axes = plt.subplots(len(dps), 1, figsize=(max(8, 0.45 * len(shapes) * max(1, len(labels)) ** 0.5 + 3),
                                                    2.8 * len(dps)), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, (dtype, pass_) in zip(axes[:, 0], dps):
        for i, lab in enumerate(labels):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                v = sp.get((shape, dtype, pass_), {}).get(lab)
                if v is not None:
                    xs.append(j + (i - (len(labels) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width=width, label=lab)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up")
        ref = "best non-fused" if any_fused else "NCHW reference"
        ax.set_title(f"{dtype} {pass_}: speed-up over the {ref}", fontsize=9)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=6)
        ax.legend(fontsize=7, ncol=min(4, len(labels)))
    device = rows[0].get("device", "?")
    if device != "cuda":
        fig.suptitle("CPU timings (reference contenders only; not a GPU measurement)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_markdown(path: Path, section: str, device: str) -> None:
    begin, end = f"<!-- bench-report:{device}:begin -->", f"<!-- bench-report:{device}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def default_input() -> Path:
    for name in ("bsconv-gpu.json", "bsconv-cpu.json"):
        p = REPO / "benchmark-results" / name
        if p.exists():
            return p
    raise SystemExit("no results: run `pytest benchmarks --benchmark-only` first, or pass a JSON path")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", type=Path, help="pytest-benchmark JSON (default: benchmark-results/bsconv-*.json)")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmark-results")
    p.add_argument("--update-markdown", type=Path, default=None, metavar="FILE",
                   help="replace this device's marked section in FILE (e.g. BENCHMARKS.md)")
    args = p.parse_args(argv)
    src = args.json or default_input()
    rows, machine = load(src)
    model_rows = load_models(src)
    if not rows and not model_rows:
        raise SystemExit(f"{src}: no BSConv-U benchmark results (extra_info missing?)")
    device = "gpu" if (rows or model_rows)[0].get("device") == "cuda" else "cpu"
    try:
        source = str(Path(src).resolve().relative_to(REPO))
    except ValueError:
        source = Path(src).name
    md = markdown(rows, machine, source) if rows else ""
    md += "\n" + models_markdown(model_rows) if model_rows else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    md_path = args.out_dir / f"report-{device}.md"
    md_path.write_text(md)
    png = plot(rows, args.out_dir / f"speedup-{device}.png") if rows else None
    if args.update_markdown:
        update_markdown(args.update_markdown, md, device)
    print(md)
    print(f"wrote {md_path}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
