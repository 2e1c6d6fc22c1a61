"""``load_bench(name)``: a script of ``bench/`` imported as a module, for the tests of the benchmarks.

The scripts are not a package: each is loaded from its file once (cached in ``sys.modules`` under its name,
which dataclasses need to find their module) with ``bench/`` on ``sys.path``, so a script's own imports of its
siblings (``import cost``) resolve as they do when it runs.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
