"""benchmarks/paths_report.py on two small bench JSONs written here (the layout ``python -m bsconv_cuda.bench
--json`` writes): the CUDA backward's paths side by side against the model's pick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmark_scripts


@pytest.fixture(scope="module")
def paths_report():
    return benchmark_scripts.load("paths_report")


def _bench_json(path: Path, forced: str, results: list[tuple]) -> Path:
    rows = [dict(shape=shape, describe=f"whatever N={batch}", dtype="bf16", pass_=pass_, contender=contender,
                 layout="cl", ms=ms, note=note, label=f"{contender}-cl")
            for shape, batch, pass_, contender, ms, note in results]
    path.write_text(json.dumps({"meta": {"cuda_backward": forced, "device": "fake"}, "results": rows}))
    return path


def test_paths_side_by_side_with_the_model(tmp_path, paths_report):
    wide, narrow = "mbv1_512x512_14", "mbv1_32x64_112"
    model_narrow = paths_report.model_path(narrow, 64, "bf16", "cl")
    assert paths_report.model_path(wide, 64, "bf16", "cl") == "split"  # no fused path above 128 input channels
    # the model's pick on the narrow layer is the slower one here, so the report must say it is wrong
    slow, fast = (2.0, 1.0)
    fused_ms, split_ms = (slow, fast) if model_narrow == "fused" else (fast, slow)
    fused = _bench_json(tmp_path / "fused.json", "fused", [
        (narrow, 64, "bwd", "cuda", fused_ms, ""), (narrow, 64, "bwd", "reference", 9.0, ""),
        (wide, 64, "bwd", "cuda", None, "failed: ValueError: FUSED_MAX_CIN")])
    split = _bench_json(tmp_path / "split.json", "split", [
        (narrow, 64, "bwd", "cuda", split_ms, ""), (wide, 64, "bwd", "cuda", 3.0, "")])
    rows = paths_report.rows(fused, split)
    assert [(r["shape"], r["faster"], r["model"]) for r in rows] == [
        (narrow, "split" if model_narrow == "fused" else "fused", model_narrow), (wide, None, "split")]
    text = paths_report.markdown(rows)
    assert "| 32->64@112 N=64 | bf16 | cl | bwd | " in text and "| **no** |" in text
    assert "picks the faster path on 0 of 1 rows" in text
    assert "512->512@14 N=64 bf16 cl bwd, fused: failed: ValueError: FUSED_MAX_CIN" in text


def test_a_json_of_the_other_path_is_refused(tmp_path, paths_report):
    auto = _bench_json(tmp_path / "auto.json", "auto", [])
    split = _bench_json(tmp_path / "split.json", "split", [])
    with pytest.raises(SystemExit, match="run with --cuda-backward auto, expected fused"):
        paths_report.rows(auto, split)
