"""The CUDA backward's two paths side by side, from two runs of ``python -m bsconv_cuda.bench`` with
``--cuda-backward fused`` and ``--cuda-backward split`` (``--json``; gpu_check's paths stage writes both), next to the
path that the model picks (``bsconv_cuda.plan.prefer_fused_backward``, through ``cuda_backend.work_plan``). Where the
model picks the slower path, its weights (``LAUNCH_L2_BYTES``, the SM-filling rule) need the measurement.

    python benchmarks/paths_report.py cuda-backward-fused.json cuda-backward-split.json [--out paths.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's package and kernel_report, not another installed copy
sys.path.insert(0, str(REPO / "benchmarks"))

import kernel_report  # noqa: E402
from bsconv_cuda.shapes import get_shape  # noqa: E402

PATHS = ("fused", "split")


def _cuda_times(path: Path, forced: str) -> dict:
    """{(shape, batch, dtype, layout, pass): (ms or None, note)} of the cuda contender in one bench JSON, which must
    have been run with ``--cuda-backward forced``."""
    data = json.loads(Path(path).read_text())
    ran = data["meta"].get("cuda_backward")
    if ran != forced:
        raise SystemExit(f"{path}: run with --cuda-backward {ran}, expected {forced}")
    times = {}
    for r in data["results"]:
        if r["contender"] == "cuda":
            batch = int(re.search(r"N=(\d+)", r["describe"]).group(1))
            times[(r["shape"], batch, r["dtype"], r["layout"], r["pass_"])] = (r["ms"], r["note"])
    return times


def model_path(shape: str, batch: int, dtype: str, layout: str) -> str:
    """The backward path that the CUDA tile plan picks for this call (fp32 as TF32, as the benchmarks run it when
    torch allows TF32)."""
    _, bwd = kernel_report.call_plans(get_shape(shape).with_batch(batch), "cuda", dtype, layout, True)
    return bwd.path


def rows(fused_json: Path, split_json: Path) -> list[dict]:
    """One row per timed (shape, batch, dtype, layout, pass): both times, the faster path and the model's."""
    fused, split = _cuda_times(fused_json, "fused"), _cuda_times(split_json, "split")
    out = []
    for key in sorted(set(fused) | set(split)):
        shape, batch, dtype, layout, pass_ = key
        ms, notes = {}, {}
        for path, times in (("fused", fused), ("split", split)):
            ms[path], notes[path] = times.get(key, (None, "not in this run"))
        timed = [p for p in PATHS if ms[p] is not None]
        out.append(dict(shape=shape, describe=get_shape(shape).with_batch(batch).describe(), dtype=dtype,
                        layout=layout, pass_=pass_, fused_ms=ms["fused"], split_ms=ms["split"],
                        faster=min(timed, key=ms.get) if len(timed) == 2 else None,
                        model=model_path(shape, batch, dtype, layout),
                        untimed={p: notes[p] for p in PATHS if ms[p] is None}))
    return out


def markdown(table: list[dict]) -> str:
    def fmt(ms):
        return "–" if ms is None else f"{ms:.3f}"

    lines = ["| shape | dtype | layout | pass | fused ms | split ms | split / fused | model picks | model right |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in table:
        ratio = f"{r['split_ms'] / r['fused_ms']:.2f}" if r["faster"] else "–"
        right = "–" if r["faster"] is None else ("yes" if r["faster"] == r["model"] else "**no**")
        lines.append(f"| {r['describe']} | {r['dtype']} | {r['layout']} | {r['pass_']} | {fmt(r['fused_ms'])} | "
                     f"{fmt(r['split_ms'])} | {ratio} | {r['model']} | {right} |")
    untimed = [f"- {r['describe']} {r['dtype']} {r['layout']} {r['pass_']}, {path}: {note}"
               for r in table for path, note in r["untimed"].items()]
    if untimed:  # layers wider than FUSED_MAX_CIN have no fused path; anything else is a failure to look at
        lines += ["", "Not timed:", *untimed]
    wrong = sum(r["faster"] is not None and r["faster"] != r["model"] for r in table)
    both = sum(r["faster"] is not None for r in table)
    lines += ["", f"The model picks the faster path on {both - wrong} of {both} rows timed both ways."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fused_json", type=Path, help="bench --json of the run with --cuda-backward fused")
    p.add_argument("split_json", type=Path, help="bench --json of the run with --cuda-backward split")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    text = markdown(rows(args.fused_json, args.split_json))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
