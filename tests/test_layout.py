"""The layout the project promises its readers: each fact defined once, no import cycle, short functions, the
paper's method free of the refinements."""
import ast
from pathlib import Path

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
FACTS = ("BANDS", "AGE_MAX_MYR", "LOG_MASS_RANGE", "EBV_RANGE", "DISTANCE_RANGE_MPC", "R_MAX", "SYS_ERR",
         "PC10_IN_MPC", "THETA_BOUNDS", "QUANTILE_LEVELS", "PARAM_LABELS")


def tree(name):
    return ast.parse((ROOT / f"{name}.py").read_text())


def test_each_fact_is_defined_in_one_module_only():
    """Module-level constants (upper-case assignments) are assigned in one module each; the facts of the model
    live in simulate.py (or, for the targets' bounds, preprocess.py), and their numbers appear nowhere else."""
    where = {}
    for name in MODULES:
        for node in tree(name).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id.isupper():
                    where.setdefault(t.id, []).append(name)
    repeated = {k: v for k, v in where.items() if len(v) > 1 and k not in ("LN10",)}
    assert not repeated, repeated
    for fact in FACTS:
        assert fact in where, fact
    assert {k: where[k][0] for k in FACTS[:8]} == {k: "simulate" for k in FACTS[:8]}
    for name in MODULES:
        if name == "simulate":
            continue
        t = tree(name)
        assert not {n.value for n in ast.walk(t) if isinstance(n, ast.Constant)} & {13750, 13750.5, 13751}, name
        band_lists = [n for n in ast.walk(t) if isinstance(n, (ast.Tuple, ast.List))
                      and {getattr(e, "value", None) for e in n.elts} >= {"F275W", "F336W", "F438W", "F555W", "F814W"}]
        assert not band_lists, name


def imports(name):
    """The project modules that `name` imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out & set(MODULES)


def test_no_import_cycle_and_the_paper_path_is_free_of_the_refinements():
    graph = {name: imports(name) for name in MODULES}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for m in graph[todo.pop()]:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    for name in MODULES:
        assert name not in reach(name), (name, graph)
    assert not ({"refinements", "grid_posterior"} & reach("preprocess"))
    assert graph["cinn"] == {"preprocess", "refinements"}     # refinements only inside cinn.build


def test_no_function_longer_than_about_sixty_lines():
    long = [(name, node.name, node.end_lineno - node.lineno + 1) for name in MODULES
            for node in ast.walk(tree(name)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 65]
    assert not long, long


def test_public_functions_have_docstrings():
    missing = [(name, node.name) for name in MODULES for node in tree(name).body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
               and node.name != "main" and not ast.get_docstring(node)]
    assert not missing, missing


def test_no_text_dates_itself_by_rounds_of_work():
    import re
    word = "ses" + "sion"               # spelt in two pieces so that this file passes its own check
    pattern = re.compile(rf"\b{word}s?\b|\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|"
                         rf"eleventh|twelfth|thirteenth) ({word}|round)\b")
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *(ROOT / "benchmarks").glob("*"), *(ROOT / "tests").glob("*.py")]:
        assert not pattern.search(Path(path).read_text().lower()), path
