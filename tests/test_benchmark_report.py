"""Smoke test of benchmarks/report.py on a tiny pytest-benchmark-style JSON written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmark_scripts


@pytest.fixture(scope="module")
def report():
    return benchmark_scripts.load("report")


def _bench(shape, dtype, pass_, contender, layout, ms, device="cuda", **extra):
    info = dict(shape=shape, describe=f"{shape} desc", dtype=dtype, pass_=pass_, contender=contender, layout=layout,
                label=f"{contender}-{layout}", device=device, time_ms=ms, **extra)
    return {"name": f"test_bsconv_u[{shape}-{dtype}-{pass_}-{contender}-{layout}]", "group": f"{shape}",
            "extra_info": info, "stats": {"median": ms * 1e-3 * 5, "min": ms * 1e-3}}


def _write(tmp_path, benches, machine=None):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine_info": machine or {"bsconv_device": "Test GPU", "copy_bandwidth_gbs": 3000.0},
                                "benchmarks": benches}))
    return path


def test_gpu_report_table_and_png(report, tmp_path):
    benches = []
    for shape, fused_ms in (("mbv1_a", 0.5), ("mbv2_b", 2.0)):
        for pass_ in ("fwd", "fwdbwd"):
            benches += [
                _bench(shape, "bf16", pass_, "reference", "nchw", 1.6),
                _bench(shape, "bf16", pass_, "reference", "cl", 1.0),
                _bench(shape, "bf16", pass_, "triton", "cl", fused_ms, gbs=1234.0, frac_copy_bw=0.41,
                       peak_mem_vs_ref=0.5),
            ]
    benches.append({"name": "test_model_step", "extra_info": {"model": "x"}, "stats": {"median": 1.0}})  # ignored
    src = _write(tmp_path, benches)
    out = tmp_path / "out"
    md_file = tmp_path / "BENCHMARKS.md"
    md_file.write_text("# Benchmarks\n\nintro\n")
    assert report.main([str(src), "--out-dir", str(out), "--update-markdown", str(md_file)]) == 0

    md = (out / "report-gpu.md").read_text()
    assert "Test GPU" in md and "3000 GB/s" in md
    assert "#### bf16, fwd" in md and "#### bf16, fwdbwd" in md
    row_a = next(line for line in md.splitlines() if line.startswith("| mbv1_a") )
    # best non-fused is reference-cl at 1.0 ms; triton at 0.5 ms -> 2.00x
    assert "| triton-cl | 2.00x | 1234 (41%)" in row_a
    row_b = next(line for line in md.splitlines() if line.startswith("| mbv2_b"))
    assert "0.50x" in row_b  # a fused kernel slower than the reference shows up as < 1
    fwdbwd_rows = md.split("#### bf16, fwdbwd")[1]
    assert "peak mem vs ref" in fwdbwd_rows and "| 0.50 |" in fwdbwd_rows
    header = next(line for line in md.splitlines() if line.startswith("| shape"))
    assert header.index("reference-nchw") < header.index("reference-cl") < header.index("triton-cl")

    text = md_file.read_text()
    assert text.startswith("# Benchmarks") and "<!-- bench-report:gpu:begin -->" in text
    # updating again replaces the section instead of appending a second one
    report.main([str(src), "--out-dir", str(out), "--update-markdown", str(md_file)])
    assert md_file.read_text().count("<!-- bench-report:gpu:begin -->") == 1

    png = out / "speedup-gpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 200


def test_cpu_report_is_labelled_and_relative_to_nchw(report, tmp_path):
    benches = [
        _bench("s", "fp32", "fwd", "reference", "nchw", 4.0, device="cpu"),
        _bench("s", "fp32", "fwd", "reference", "cl", 2.0, device="cpu"),
    ]
    src = _write(tmp_path, benches, machine={"bsconv_device": "CPU"})
    report.main([str(src), "--out-dir", str(tmp_path)])
    md = (tmp_path / "report-cpu.md").read_text()
    assert "CPU timings" in md and "say nothing about the fused GPU kernels" in md
    row = next(line for line in md.splitlines() if line.startswith("| s "))
    assert row.endswith("| 2.00x |")
    assert (tmp_path / "speedup-cpu.png").stat().st_size > 1000


def test_stats_used_when_time_ms_missing(report, tmp_path):
    b = _bench("s", "fp32", "fwd", "reference", "nchw", 1.0, device="cpu")
    del b["extra_info"]["time_ms"]
    rows, _ = report.load(_write(tmp_path, [b]))
    assert rows[0]["time_ms"] == pytest.approx(5.0)


def test_models_section(report, tmp_path):
    def m(variant, ms, peak):
        return {"name": f"test_model[{variant}]", "stats": {"median": 1.0},
                "extra_info": {"model": "cifar_m", "mode": "train", "precision": "bf16", "variant": variant,
                               "batch": 128, "device": "cuda", "time_ms": ms, "peak_mem_bytes": peak}}

    src = _write(tmp_path, [m("built", 30.0, 512 * 2**20), m("converted", 20.0, 256 * 2**20)])
    report.main([str(src), "--out-dir", str(tmp_path)])
    md = (tmp_path / "report-gpu.md").read_text()
    assert "| cifar_m | train | bf16 | 128 | 30.0 | 20.0 | 1.50x | 512 | 256 |" in md
