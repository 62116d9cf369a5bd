"""Training-mode BSConv-U with BatchNorm: ``pw -> BatchNorm (batch statistics) -> act -> dw``, one forward + backward
(``pytest benchmarks --benchmark-only``; see BENCHMARKS.md).

Contenders, one test per (shape, dtype, contender), grouped per ``train-bn shape dtype``:

- ``eager``: the standard layers (``nn.Conv2d``, ``nn.BatchNorm2d``, activation, ``nn.Conv2d``), what
  ``bsconv.pytorch.BSConvU(with_bn=True)`` runs; the intermediate is written, normalized and saved for backward.
- ``compile``: ``torch.compile`` of the same layers (GPU only, as in ``test_bsconv_u.py``).
- ``triton``, ``cuda``: the fused training path (``FusedBSConvU(with_bn=True).train()``'s forward,
  :func:`bsconv_cuda.modules.fused_block_forward`): batch statistics from the input's, no intermediate written or saved.

Every contender runs the same parameters on the same channels_last input (``bench_harness.training_block``: the
layer benchmark's case, in modules); the running statistics are updated by every call, as in training. Recorded in
``extra_info``: ``time_ms`` (``bench_harness.measure``: GPU CUDA events; CPU the wall clock, which says nothing about
the GPU kernels), ``peak_mem_bytes``
(``torch.cuda.max_memory_allocated`` above the live inputs during one forward + backward; GPU only) with
``eager_peak_mem_bytes`` and ``peak_mem_vs_eager`` for the other contenders, ``speedup_vs_eager``, and ``rel_err`` of
the fused output against ``eager`` in the same dtype. The keys (``layer``, ``block``) differ from
``test_bsconv_u.py``'s, so ``benchmarks/report.py``'s layer table does not mix these rows in.

On CPU only ``eager`` is timed, at batch 1 on the quick shapes: the machinery runs, GPU numbers come with a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest

from bsconv_cuda import bench_harness as harness

from _suite import DTYPE_NAMES, layer_shapes, parametrize, record

REL_ERR_LIMIT = 2e-2  # fused vs eager in the same dtype; the accuracy tests are tests/test_batchnorm_training.py


def plan(which: str, gpu: bool) -> list[harness.Job]:
    """The training block on the throughput shapes of a set (quick ones unless ``full``); on CPU in fp32 only."""
    shapes = layer_shapes("full" if which == "full" else "quick", gpu, latency=False)
    return harness.training_jobs(shapes, DTYPE_NAMES if gpu else ("fp32",))


def pytest_generate_tests(metafunc):
    parametrize(metafunc, "train_job", plan, lambda job: f"{job.shape.name}-{job.dtype}-{job.contender}")


def test_bsconv_u_train(benchmark, device, session, train_job):
    job, shape = train_job, train_job.shape
    benchmark.group = f"train-bn {shape.name} {job.dtype}"
    reason = harness.unavailable_reason(job.contender, device)
    if reason is not None:
        pytest.skip(f"{job.contender}: {reason}")
    info = benchmark.extra_info
    info.update(suite="bsconv_u_train", layer=shape.name, describe=shape.describe(), family=shape.family,
                batch=shape.batch, dtype=job.dtype, pass_=job.pass_, block=job.contender, layout=job.layout,
                fused=job.contender in harness.FUSED, activation=shape.activation, device=device.type)
    if job.contender in harness.FUSED:
        info["rel_err"] = session.relative_error(job)
        assert info["rel_err"] <= REL_ERR_LIMIT, f"{job.contender} output differs from the standard layers"
    eager = session.measure(dataclasses.replace(job, contender="eager"))  # first: the session keeps the last runner
    measured = session.measure(job)
    if job.contender != "eager":
        _, speedup = harness.speedups({"eager": eager.ms, job.contender: measured.ms}, ["eager"])
        info.update(eager_ms=eager.ms, speedup_vs_eager=speedup[job.contender])
        if measured.peak_mem_bytes is not None:
            info.update(eager_peak_mem_bytes=eager.peak_mem_bytes, peak_mem_vs_eager=measured.peak_memory_vs(eager))
    record(benchmark, session.runner(job), device, measured)
