"""Import floors, read from the source with ``ast`` (function-local imports included).

- `zeda_routing` (the routing core) imports only torch and the standard library, so every engine
  environment can import it.
- ``zeda/zero`` and ``zeda/data.py`` never import from ``zeda.distillation``, ``zeda.evaluation``,
  ``zeda.io`` or the layers above them.
- The engine adapters never import ``zeda`` (their environments pin their own transformers), and
  ``zeda_sglang`` never imports ``zeda_vllm``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path, root: Path = REPO) -> list[str]:
    """Absolute module names imported by ``path`` (relative imports resolved within its package)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join([*base, node.module] if node.module else base))
            else:
                names.append(node.module or "")
    return names


def _files(*parts: str) -> list[Path]:
    root = REPO.joinpath(*parts)
    return [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))


def _offenders(files: list[Path], bad) -> list[str]:
    return [f"{f.relative_to(REPO)}: {name}" for f in files for name in _imports(f) if bad(name)]


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_routing_core_imports_only_torch_and_stdlib() -> None:
    files = _files("zeda_routing")
    assert files
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    assert _offenders(files, lambda n: not _under(n, "zeda_routing") and n.split(".")[0] not in allowed) == []


@pytest.mark.parametrize("where", [("zeda", "zero"), ("zeda", "data.py")])
def test_zero_and_data_stay_below_distillation_evaluation_and_io(where: tuple[str, ...]) -> None:
    above = ("zeda.distillation", "zeda.evaluation", "zeda.io", "zeda.pipeline", "zeda.cli", "zeda.recipe")
    assert _offenders(_files(*where), lambda n: _under(n, *above)) == []


@pytest.mark.parametrize(
    ("adapter", "forbidden"), [("zeda_vllm", ("zeda",)), ("zeda_sglang", ("zeda", "zeda_vllm"))]
)
def test_engine_adapters_import_the_core_not_zeda(adapter: str, forbidden: tuple[str, ...]) -> None:
    files = _files(adapter)
    assert _offenders(files, lambda n: _under(n, *forbidden)) == []
    assert any(_under(n, "zeda_routing") for f in files for n in _imports(f))


def test_the_floor_check_sees_violations(tmp_path: Path) -> None:
    """The parser resolves relative and function-local imports (else the floors above prove nothing)."""
    probe = tmp_path / "zeda" / "zero" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "def f():\n    from ..evaluation import telemetry\n    from . import routing\n    import zeda.io\n"
    )
    assert _imports(probe, tmp_path) == ["zeda.evaluation", "zeda.zero", "zeda.io"]
