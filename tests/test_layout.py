"""The layout rules of DEVELOPERS.md, checked by parsing the code (no imports executed):

- imports point downward: each package may import only the packages listed in ALLOWED, and of ``tiling`` only
  the modules listed in TILING_MODULES; imports inside functions, relative imports (``from ..train import x``)
  and ``importlib.import_module("...")`` count too;
- no import circle between modules, imports inside functions included;
- the leaf modules (``tiling.errors``, ``tiling.fsio``, ``tiling.configio``) import no other project module but
  ``tiling.errors``;
- no function in pathdino/ or tiling/ is longer than MAX_FUNCTION_LINES;
- a function with more than three parameters makes the options keyword-only (``*,``); KEYWORD_ONLY_NOT_YET lists
  the functions that broke the rule when it was introduced, and may only shrink.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchvision", "timm", "accelerate", "pathdino"}

# package -> the project packages (and heavy libraries) it may import; DEVELOPERS.md explains each line.
ALLOWED: dict[str, set[str]] = {
    "tiling": {"tiling"},
    "pathdino.data": {"tiling", "torch", "torchvision"},
    "pathdino.models": {"tiling", "torch", "timm"},
    "pathdino.losses": {"torch"},
    "pathdino.train": {
        "tiling",
        "torch",
        "accelerate",
        "pathdino.data",
        "pathdino.models",
        "pathdino.losses",
        "pathdino.eval",
        "pathdino.export",
    },
    "pathdino.export": {"tiling", "torch", "timm", "pathdino.data", "pathdino.models"},
    "pathdino.embed": {"tiling", "torch", "timm", "pathdino.export"},
    "pathdino.eval": {"tiling", "torch", "torchvision", "timm", "pathdino.data", "pathdino.models", "pathdino.export"},
    "pathdino.mil": {"tiling", "torch", "pathdino.eval", "pathdino.slide"},
    "pathdino.slide": {"tiling", "torch", "timm", "accelerate", "pathdino.models", "pathdino.train", "pathdino.embed"},
    "pathdino.cli": {
        "tiling",
        "torch",
        "pathdino.data",
        "pathdino.models",
        "pathdino.train",
        "pathdino.export",
        "pathdino.embed",
        "pathdino.eval",
        "pathdino.mil",
        "pathdino.slide",
    },
    # pathdino/__init__.py: load_encoder, load_slide_encoder, imported on first use
    "pathdino": {"tiling", "pathdino.export", "pathdino.slide"},
}
# package -> the tiling modules it may use ("tiling": the package itself, for __version__). Everything outside
# tiling reaches the tiler's internals (readers, tissue, runner) only through the CLI.
TILING_MODULES: dict[str, set[str]] = {
    "pathdino": {"tiling"},
    "pathdino.data": {"tiling.configio", "tiling.errors", "tiling.store"},
    "pathdino.models": {"tiling.configio", "tiling.errors"},
    "pathdino.losses": set(),
    "pathdino.train": {"tiling.configio", "tiling.errors", "tiling.fsio", "tiling.store"},
    "pathdino.export": {"tiling", "tiling.errors", "tiling.fsio", "tiling.store"},
    "pathdino.embed": {"tiling", "tiling.errors", "tiling.fsio", "tiling.store"},
    "pathdino.eval": {"tiling.configio", "tiling.errors", "tiling.fsio"},
    "pathdino.mil": {"tiling.configio", "tiling.errors", "tiling.fsio"},
    "pathdino.slide": {"tiling", "tiling.configio", "tiling.errors", "tiling.fsio"},
    "pathdino.cli": {
        "tiling.config",
        "tiling.configio",
        "tiling.errors",
        "tiling.inputs",
        "tiling.outcome",
        "tiling.preflight",
        "tiling.runner",
        "tiling.store",
    },
}
# `python -m pathdino.<package>` entry points run the CLI's own command (the same arguments under a launcher)
ENTRY_POINT_MAY_IMPORT = {"pathdino.cli"}
# the bottom of the graph: every package imports these, so they import no project module but the error root
LEAF_MODULES = {"tiling/errors.py": set(), "tiling/fsio.py": {"tiling.errors"}, "tiling/configio.py": {"tiling.errors"}}
# import_module(<not a literal>): the layout cannot see what is imported; each needs a reason here
DYNAMIC_IMPORTS = {"pathdino/export/known_encoders.py": "timm layer classes named by an encoder table entry"}
# import circles that exist today and are being removed (another branch); an entry that no longer is a circle fails
KNOWN_CYCLES: set[frozenset[str]] = set()

MAX_FUNCTION_LINES = 100
TOO_LONG_FOR_NOW: set[tuple[str, str]] = set()  # (file, function) pairs allowed over the limit: none
MAX_POSITIONAL = 3

# "file:function" (methods as Class.method, nested functions as outer.inner) with more than three positional
# parameters when the rule was introduced. Only ever remove entries (test_keyword_only_list_only_shrinks fails on
# an entry that keeps the rule now); new code follows the rule.
KEYWORD_ONLY_NOT_YET: set[str] = {
    "pathdino/cli/main.py:tile",
    "pathdino/data/colour.py:apply_to",
    "pathdino/data/colour.py:blend_step",
    "pathdino/data/colour.py:colour_augment",
    "pathdino/data/colour.py:colour_jitter",
    "pathdino/data/colour.py:fused_jitter",
    "pathdino/data/colour.py:jitter_affine",
    "pathdino/data/params.py:crop_params",
    "pathdino/data/params.py:random_resized_crop",
    "pathdino/data/params.py:sample_params",
    "pathdino/data/plan.py:EpochPlan.__init__",
    "pathdino/data/plan.py:Schedule.__init__",
    "pathdino/data/plan.py:counter_rng",
    "pathdino/data/plan.py:round_start",
    "pathdino/data/plan.py:slide_quotas",
    "pathdino/data/resize.py:crop_resize_cpu",
    "pathdino/data/resize.py:resize_weights",
    "pathdino/data/worker.py:BatchBuilder._pack_tiles",
    "pathdino/data/worker.py:BatchBuilder._substitute",
    "pathdino/data/worker.py:BatchBuilder.build",
    "pathdino/embed/compute.py:array_specs",
    "pathdino/embed/compute.py:run_loop",
    "pathdino/embed/loader.py:make_loader",
    "pathdino/embed/runner.py:_Run.__init__",
    "pathdino/embed/runner.py:_check",
    "pathdino/embed/runner.py:_write_h5",
    "pathdino/embed/runner.py:embed_store",
    "pathdino/embed/store.py:EmbeddingWriter.__init__",
    "pathdino/embed/store.py:EmbeddingWriter.write_slide",
    "pathdino/embed/store.py:write_h5",
    "pathdino/eval/diagnostics.py:diagnose",
    "pathdino/eval/diagnostics.py:uniformity",
    "pathdino/eval/fewshot.py:fewshot_evaluate",
    "pathdino/eval/fewshot.py:sample_support",
    "pathdino/eval/fewshot.py:simpleshot_scores",
    "pathdino/eval/knn.py:knn_evaluate",
    "pathdino/eval/knn.py:knn_scores",
    "pathdino/eval/linear.py:_score",
    "pathdino/eval/linear.py:fit_logistic_regression",
    "pathdino/eval/linear.py:linear_probe_evaluate",
    "pathdino/eval/linear.py:select_l2",
    "pathdino/eval/run.py:_diagnostics",
    "pathdino/eval/run.py:run_eval",
    "pathdino/export/export.py:_timm_config",
    "pathdino/export/sample.py:export_untrained_encoder",
    "pathdino/losses/dino.py:DINOLoss.forward",
    "pathdino/losses/dino.py:DINOLoss.forward_terms",
    "pathdino/losses/dino.py:PrototypeCrossEntropy.__init__",
    "pathdino/losses/dino.py:PrototypeTargets.__init__",
    "pathdino/losses/ibot.py:IBOTPatchLoss.forward",
    "pathdino/losses/prototype_ce.py:_PrototypeCrossEntropy.forward",
    "pathdino/mil/abmil.py:ABMIL.__init__",
    "pathdino/mil/train.py:_finish",
    "pathdino/mil/train.py:read_slide_labels",
    "pathdino/mil/train.py:write_h5_features",
    "pathdino/models/flops.py:dinov2_train_flops_per_image",
    "pathdino/models/heads.py:DINOHead.__init__",
    "pathdino/models/query_rows.py:_QueryRowsForward.forward",
    "pathdino/models/query_rows.py:_attention",
    "pathdino/models/query_rows.py:_read_rows",
    "pathdino/models/query_rows.py:objective_tokens",
    "tiling/configio.py:check_choice",
    "tiling/configio.py:check_int",
    "tiling/configio.py:check_range",
    "tiling/configio.py:fail",
    "tiling/geometry.py:_choose_level",
    "tiling/geometry.py:_validate",
    "tiling/mpp.py:_from_resolution",
    "tiling/pixel_qc.py:_screened_share",
    "tiling/pool.py:call_and_spill",
    "tiling/qc_image.py:draw_qc_image",
    "tiling/readers.py:OpenSlideReader.read_region",
    "tiling/readers.py:SlideReader.read_region",
    "tiling/readers.py:TiffSlideReader.read_region",
    "tiling/readers.py:_check_request",
    "tiling/regions.py:BlockReader.__init__",
    "tiling/regions.py:BlockReader._read_cells",
    "tiling/regions.py:BlockReader._read_level",
    "tiling/regions.py:BlockReader.read_block",
    "tiling/regions.py:FastLevelReader.read_region",
    "tiling/regions.py:downsample",
    "tiling/regions.py:slice_tiles",
    "tiling/runner.py:run_tiling",
    "tiling/outcome.py:why_empty",
    "tiling/tiff_source.py:TiffLevelSource.__init__",
    "tiling/tiff_source.py:TiffLevelSource.can_reduce",
    "tiling/tiff_source.py:TiffLevelSource.read",
    "tiling/tiff_source.py:TiffLevelSource.read_into",
    "tiling/tiff_source.py:TiffLevelSource.self_check",
    "tiling/tiff_source.py:find_page",
    "tiling/thumbnail.py:ThumbnailReader.read_region",
    "tiling/thumbnail.py:_block_mean_strips",
    "tiling/tissue.py:tissue_fractions",
    "tiling/worker.py:_block_reader",
}


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("pathdino/**/*.py"), *ROOT.glob("tiling/**/*.py")])


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "tiling":
        return "tiling"
    return "pathdino" if len(parts) == 2 else f"pathdino.{parts[1]}"


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute dotted name, as imported
    names: tuple[str, ...] = ()  # for `from module import a, b`: a, b (each may be a submodule)
    dynamic: bool = False  # import_module(...) with an argument that is not a string literal


def _imports(path: Path) -> list[Import]:
    """Every import of a file: top-level and inside functions, absolute and relative (resolved), and
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append(Import(node.lineno, base, tuple(alias.name for alias in node.names)))
        elif isinstance(node, ast.Call) and _call_name(node) in ("import_module", "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                if name.startswith("."):  # import_module(".x", __package__)
                    level = len(name) - len(name.lstrip("."))
                    anchor = package.split(".")[: len(package.split(".")) - (level - 1)]
                    name = ".".join(anchor + [name.lstrip(".")])
                found.append(Import(node.lineno, name))
            else:
                found.append(Import(node.lineno, "", dynamic=True))
    return found


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _target(module: str) -> str | None:
    """The package an import lands in, or None for libraries the rules do not restrict."""
    parts = module.split(".")
    if parts[0] == "pathdino":
        return "pathdino" if len(parts) == 1 else f"pathdino.{parts[1]}"
    return parts[0] if parts[0] in HEAVY | {"tiling"} else None


def _tiling_modules(imp: Import) -> set[str]:
    """The tiling modules an import uses: ``tiling.x`` of ``tiling.x.y``; ``from tiling import x`` uses
    ``tiling.x`` where x is a module, else the package itself."""
    parts = imp.module.split(".")
    if parts[0] != "tiling":
        return set()
    if len(parts) > 1:
        return {f"tiling.{parts[1]}"}
    modules = {f"tiling.{n}" for n in imp.names if (ROOT / "tiling" / f"{n}.py").is_file()}
    return modules | ({"tiling"} if len(modules) < len(imp.names) or not imp.names else set())


def _downward_problems() -> list[str]:
    bad = []
    for path in _sources():
        package = _package(path)
        if package not in ALLOWED:
            bad.append(
                f"{_rel(path)}: package {package} has no line in ALLOWED (tests/test_layout.py) and none "
                "in DEVELOPERS.md's layout table: add both"
            )
            continue
        for imp in _imports(path):
            if imp.dynamic:
                if _rel(path) not in DYNAMIC_IMPORTS:
                    bad.append(
                        f"{_rel(path)}:{imp.line} imports a module named at run time (import_module of a "
                        "non-literal); import it by name, or list it in DYNAMIC_IMPORTS with the reason"
                    )
                continue
            target = _target(imp.module)
            if target is None or target == package:
                continue
            if path.name == "__main__.py" and target in ENTRY_POINT_MAY_IMPORT:
                continue
            if target not in ALLOWED[package]:
                bad.append(
                    f"{_rel(path)}:{imp.line} imports {imp.module} ({package} may import {sorted(ALLOWED[package])})"
                )
            elif target == "tiling" and package != "tiling":
                for used in sorted(_tiling_modules(imp) - TILING_MODULES.get(package, set())):
                    bad.append(
                        f"{_rel(path)}:{imp.line} uses {used} ({package} may use "
                        f"{sorted(TILING_MODULES.get(package, set()))} of tiling)"
                    )
    return bad


def test_imports_point_downward():
    bad = _downward_problems()
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("leaf", sorted(LEAF_MODULES))
def test_leaf_modules_import_no_project_module(leaf):
    path = ROOT / leaf
    project = [
        f"{leaf}:{imp.line} imports {imp.module}"
        for imp in _imports(path)
        if _target(imp.module) is not None and imp.module not in LEAF_MODULES[leaf]
    ]
    assert not project, project


# ---- import circles ---------------------------------------------------------------------------------------------


def _module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file). ``from a.b import c`` is an edge to the
    module a.b.c when c is one, else to a.b; importing a.b.c does not add an edge to the package a.b (Python
    runs the package first, but a package that imports its own submodules is no circle)."""
    modules = {_module(p): p for p in _sources()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for imp in _imports(path):
            candidates = [f"{imp.module}.{n}" for n in imp.names] or [imp.module]
            for name in candidates:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def _cycle_problems() -> list[str]:
    return [f"import circle: {' <-> '.join(sorted(c))}" for c in _cycles(_module_graph()) if c not in KNOWN_CYCLES]


def test_no_import_circles_even_through_imports_inside_functions():
    bad = _cycle_problems()
    assert not bad, "\n".join(bad)


def test_known_circles_still_exist():
    """KNOWN_CYCLES only shrinks: a circle that was removed leaves the list."""
    gone = KNOWN_CYCLES - set(_cycles(_module_graph()))
    assert not gone, f"no longer import circles, remove them from KNOWN_CYCLES: {[sorted(c) for c in gone]}"


# ---- function length and keyword-only options ----------------------------------------------------------------


def _functions(path: Path):
    """(qualified name, node) of every function and method in a file, nested ones included."""

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child, isinstance(node, ast.ClassDef)
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(path.read_text()), "")


def test_functions_are_short():
    long = []
    for path in _sources():
        for name, node, _ in _functions(path):
            n_lines = node.end_lineno - node.lineno + 1
            if n_lines > MAX_FUNCTION_LINES and (_rel(path), node.name) not in TOO_LONG_FOR_NOW:
                long.append(f"{_rel(path)}:{node.lineno} {name} is {n_lines} lines")
    assert not long, "\n".join(long)


def _positional(node: ast.FunctionDef, is_method: bool) -> list[str]:
    names = [a.arg for a in node.args.posonlyargs + node.args.args]
    return names[1:] if is_method and names and names[0] in ("self", "cls") else names


def _keyword_only_breakers() -> dict[str, int]:
    """``file:function`` -> its number of positional parameters, for every function with more than three."""
    found = {}
    for path in _sources():
        for name, node, is_method in _functions(path):
            n = len(_positional(node, is_method))
            if n > MAX_POSITIONAL:
                found[f"{_rel(path)}:{name}"] = n
    return found


def _keyword_only_problems() -> list[str]:
    return [
        f"{where} takes {n} positional parameters: make the options keyword-only (def f(a, b, *, c, d))"
        for where, n in sorted(_keyword_only_breakers().items())
        if where not in KEYWORD_ONLY_NOT_YET
    ]


def test_options_are_keyword_only_past_three_parameters():
    bad = _keyword_only_problems()
    assert not bad, "\n".join(bad)


def test_keyword_only_list_only_shrinks():
    fixed = sorted(KEYWORD_ONLY_NOT_YET - set(_keyword_only_breakers()))
    assert not fixed, f"these keep the rule now (or are gone): remove them from KEYWORD_ONLY_NOT_YET: {fixed}"


# ---- the rules can fail ----------------------------------------------------------------------------------------


def test_the_rules_can_fail(tmp_path, monkeypatch):
    """Each check above sees what it should, in a small tree built here: a torch import inside a tiling function,
    a relative and an import_module import upward, a tiling module a package may not use, a circle through an
    import inside a function, a long function and one with four positional parameters."""
    files = {
        "tiling/__init__.py": "",
        "tiling/store.py": "",
        "tiling/bad.py": "def f():\n    import torch\n" + "    x = 1\n" * 120,
        "pathdino/__init__.py": "",
        "pathdino/losses/__init__.py": "",
        "pathdino/losses/rel.py": "from ..train import a\n",
        "pathdino/losses/dyn.py": "import importlib\nloop = importlib.import_module('pathdino.train.b')\n",
        "pathdino/models/__init__.py": "",
        "pathdino/models/uses.py": "from tiling.store import open_store\n",
        "pathdino/train/__init__.py": "",
        "pathdino/train/a.py": "def later():\n    from pathdino.train import b\n",
        "pathdino/train/b.py": "from pathdino.train.a import later\n\n\ndef g(x, y, z, w):\n    return x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    downward = "\n".join(_downward_problems())
    assert "tiling/bad.py:2 imports torch" in downward
    assert "pathdino/losses/rel.py:1 imports pathdino.train " in downward
    assert "pathdino/losses/dyn.py:2 imports pathdino.train.b " in downward
    assert "pathdino/models/uses.py:1 uses tiling.store" in downward
    assert _cycle_problems() == ["import circle: pathdino.train.a <-> pathdino.train.b"]
    assert _keyword_only_problems() == [
        "pathdino/train/b.py:g takes 4 positional parameters: make the options keyword-only (def f(a, b, *, c, d))"
    ]
    with pytest.raises(AssertionError, match="f is 122 lines"):
        test_functions_are_short()
