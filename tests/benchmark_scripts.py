"""The scripts under benchmarks/ loaded as modules, for the tests that call their functions."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(script: str):
    """``benchmarks/<script>.py`` as the module ``bsconv_<script>`` (registered in sys.modules: dataclasses look
    their module up there)."""
    spec = importlib.util.spec_from_file_location(f"bsconv_{script}", BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
