"""README.md cannot rot: its plain-torch definition of the op is run against ``bsconv_cuda.bsconv_u`` (forward and
every gradient), and its signatures are compared with the code's."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

import bsconv_cuda
from fused_checks import skip_unless_available

README = Path(__file__).resolve().parents[1] / "README.md"
PLAIN_TORCH_NAME = "bsconv_u_plain"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def _block_with(text: str) -> str:
    blocks = [block for block in _python_blocks() if text in block]
    assert len(blocks) == 1, f"README.md should have exactly one python block containing {text!r}, has {len(blocks)}"
    return blocks[0]


def _plain_torch():
    """The README's plain-torch definition, executed exactly as written."""
    namespace: dict = {}
    exec(compile(_block_with(f"def {PLAIN_TORCH_NAME}("), str(README), "exec"), namespace)  # noqa: S102
    return namespace[PLAIN_TORCH_NAME]


CASES = {
    "default": dict(),
    "biases-relu": dict(dw_bias=True, pw_bias=True, padding=1, mid_activation="relu"),
    "stride2-relu6": dict(stride=2, padding=(1, 0), mid_activation="relu6", dw_bias=True),
    "dilation-hardswish": dict(kernel=(3, 5), dilation=(2, 1), padding="same", mid_activation="hardswish"),
    "even-kernel-same-silu": dict(kernel=(4, 2), padding="same", mid_activation="silu", pw_bias=True),
    "pw-4d-valid": dict(pw_4d=True, padding="valid", stride=(1, 2)),
    "unbatched": dict(unbatched=True, padding=1, pw_bias=True),
}


def _inputs(kernel=(3, 3), dw_bias=False, pw_bias=False, pw_4d=False, unbatched=False, **_):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    c_in, c_out = 3, 5
    x = rand(c_in, 7, 8) if unbatched else rand(2, c_in, 7, 8)
    pw = rand(c_out, c_in, 1, 1) if pw_4d else rand(c_out, c_in)
    return dict(x=x, pw_weight=pw, dw_weight=rand(c_out, 1, *kernel), dw_bias=rand(c_out) if dw_bias else None,
                pw_bias=rand(c_out) if pw_bias else None)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's, for the plain form
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_readme_plain_torch_equals_bsconv_u(case, backend):
    skip_unless_available(backend, torch.device("cpu"))
    options = CASES[case]
    conv = {k: options[k] for k in ("stride", "padding", "dilation", "mid_activation") if k in options}
    tensors = _inputs(**options)
    leaves = [t for t in tensors.values() if t is not None]

    expected = _plain_torch()(**tensors, **conv)
    expected_grads = torch.autograd.grad(expected, leaves, torch.ones_like(expected))
    got = bsconv_cuda.bsconv_u(**tensors, **conv, backend=backend)
    got_grads = torch.autograd.grad(got, leaves, torch.ones_like(got))

    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for name, g, e in zip([n for n, t in tensors.items() if t is not None], got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad of {name}: {m}")


SIGNATURES = {
    "bsconv_u": bsconv_cuda.bsconv_u,
    "bsconv_u_batch_norm": bsconv_cuda.bsconv_u_batch_norm,
    "FusedBSConvU": bsconv_cuda.FusedBSConvU.__init__,
    "convert": bsconv_cuda.convert,
    "available_backends": bsconv_cuda.available_backends,
}


def _readme_signatures() -> dict[str, ast.arguments]:
    """Every ``bsconv_cuda.NAME(...)`` line of the README's API block, parsed as a function's parameters."""
    block = _block_with("bsconv_cuda.bsconv_u(x, ")
    found = {}
    for name, params in re.findall(r"^bsconv_cuda\.(\w+)\((.*?)\)$", block, flags=re.S | re.M):
        found[name] = ast.parse(f"def {name}({params}): pass").body[0].args
    return found


def _described(args: ast.arguments) -> list[tuple[str, str, object]]:
    """(name, kind, default) of every parameter, ``inspect``'s way."""
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + [
        ast.literal_eval(d) for d in args.defaults
    ]
    described = [(a.arg, "POSITIONAL_OR_KEYWORD", d) for a, d in zip(positional, defaults)]
    described += [
        (a.arg, "KEYWORD_ONLY", inspect.Parameter.empty if d is None else ast.literal_eval(d))
        for a, d in zip(args.kwonlyargs, args.kw_defaults)
    ]
    return described


def test_readme_signatures_match_the_code():
    documented = _readme_signatures()
    assert sorted(documented) == sorted(SIGNATURES), "README's API block should list exactly the public entry points"
    for name, function in SIGNATURES.items():
        params = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
        actual = [(p.name, p.kind.name, p.default) for p in params]
        assert _described(documented[name]) == actual, f"README's signature of {name} differs from the code"

