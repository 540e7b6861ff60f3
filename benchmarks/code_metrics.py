"""Code metrics for issue 15: module sizes, the longest functions, and the places that name a method.

Reads the source of ``src/flexlora`` with the standard library's ``ast`` (nothing is executed except the
import of the method list) and prints a markdown report:

(a) lines per module (physical lines, largest first) and the total;
(b) the 20 longest functions and methods (``def`` line to last line, decorators excluded) with
    ``file:line``, and how many exceed 60 lines;
(c) the places that name a method: the modules holding a string literal equal to a method name, and how
    many of those literals sit in name *lists* (tuple/list/set/dict literals with two or more method
    names). The method names come from ``flexlora.methods.METHODS`` when that registry exists, else from
    ``flexlora.config.METHODS``. Not counted: the registry module (``flexlora/methods.py`` or the
    ``flexlora/methods/`` package), an aggregator's own declaration ``name = "..."`` and docstrings.

    python benchmarks/code_metrics.py                      # markdown on stdout
    python benchmarks/code_metrics.py --out docs/code-metrics.md
    python benchmarks/code_metrics.py --json               # the same numbers as JSON on stdout

``--before FILE`` (a ``--json`` output of an earlier tree; ``benchmarks/code_metrics_f1045a4.json`` is the
tree before the issue-15 redesign) adds a before/after table of the headline numbers and of every module
whose size changed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "flexlora"
LONG = 60  # the goal: no function in src/ over about this many lines
TOP = 20
COMMAND = (
    "PYTHONPATH=src python benchmarks/code_metrics.py --out docs/code-metrics.md"
    " --before benchmarks/code_metrics_f1045a4.json"
)
PACKAGE_NAME = "flexlora"  # also a method's name: a logger, cache directory or program name is not a method


@dataclass(frozen=True)
class Function:
    """One ``def``: its qualified name, where it starts, and its length in lines."""

    file: str
    line: int
    name: str
    lines: int


@dataclass(frozen=True)
class NamingModule:
    """A module that names methods: how many literals do, how many name lists it holds, which names."""

    file: str
    literals: int
    lists: int
    names: list[str]


def method_names() -> tuple[str, str]:
    """The method names and the module they were read from (the registry when there is one)."""
    sys.path.insert(0, str(PACKAGE.parent))
    for source in ("flexlora.methods", "flexlora.config"):
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as exc:
            if exc.name != source:
                raise
            continue
        # a tuple of names, a name -> spec mapping, or specs with a ``name``
        names = [m if isinstance(m, str) else m.name for m in module.METHODS]
        return tuple(sorted(names)), source
    raise SystemExit("code_metrics: neither flexlora.methods nor flexlora.config defines METHODS")


def modules(package: Path) -> list[Path]:
    """Every ``.py`` file under ``package``, sorted by path."""
    return sorted(package.rglob("*.py"))


def relative(path: Path) -> str:
    """``path`` relative to the repository root, in POSIX form."""
    return path.relative_to(ROOT).as_posix()


def module_lines(paths: list[Path]) -> list[tuple[str, int]]:
    """(file, physical lines) per module, largest first (ties by name)."""
    sizes = [(relative(p), len(p.read_text(encoding="utf-8").splitlines())) for p in paths]
    return sorted(sizes, key=lambda item: (-item[1], item[0]))


def functions(path: Path, tree: ast.Module) -> list[Function]:
    """Every function and method in ``tree``, nested ones included, with its qualified name."""
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                lines = child.end_lineno - child.lineno + 1
                found.append(Function(relative(path), child.lineno, name, lines))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (module, class or function)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
    return skip


def declarations(tree: ast.Module) -> set[int]:
    """ids of the string constants that declare an aggregator's own name: ``name = "..."`` in a class."""
    skip: set[int] = set()
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        for stmt in cls.body:
            if isinstance(stmt, ast.Assign):
                targets = stmt.targets
            elif isinstance(stmt, ast.AnnAssign):
                targets = [stmt.target]
            else:
                continue
            if isinstance(stmt.value, ast.Constant) and any(
                isinstance(t, ast.Name) and t.id == "name" for t in targets
            ):
                skip.add(id(stmt.value))
    return skip


def collection_items(node: ast.AST) -> list[ast.AST]:
    """The elements of a tuple/list/set literal, or the keys and values of a dict literal."""
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return list(node.elts)
    if isinstance(node, ast.Dict):
        return [n for n in (*node.keys, *node.values) if n is not None]
    return []


def naming(path: Path, tree: ast.Module, names: set[str]) -> NamingModule | None:
    """How ``path`` names methods, or None when it names none."""
    skip = docstrings(tree) | declarations(tree)

    def is_name(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in names and id(node) not in skip

    literals = [n for n in ast.walk(tree) if is_name(n)]
    if not literals:
        return None
    lists = sum(sum(map(is_name, collection_items(n))) >= 2 for n in ast.walk(tree))
    found = sorted({n.value for n in literals})
    return NamingModule(relative(path), len(literals), lists, found)


def is_registry(path: Path) -> bool:
    """Whether ``path`` is the method registry (``flexlora/methods.py`` or a file of ``flexlora/methods/``)."""
    inside = path.relative_to(PACKAGE).parts
    return inside[0] in ("methods.py", "methods")


def commit() -> str:
    """The short hash of HEAD, with ``+dirty`` when src/ has uncommitted changes ("unknown" outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def measure() -> dict:
    """Every number of the report, as plain data."""
    names, source = method_names()
    paths = modules(PACKAGE)
    trees = {p: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in paths}
    sizes = module_lines(paths)
    funcs = sorted(
        (f for p, t in trees.items() for f in functions(p, t)), key=lambda f: (-f.lines, f.file, f.line)
    )
    places = [m for p, t in trees.items() if not is_registry(p) and (m := naming(p, t, set(names)))]
    return {
        "commit": commit(),
        "methods": list(names),
        "methods_from": source,
        "modules": [{"file": f, "lines": n} for f, n in sizes],
        "total_lines": sum(n for _, n in sizes),
        "functions": len(funcs),
        "longest": [asdict(f) for f in funcs[:TOP]],
        "over_limit": len([f for f in funcs if f.lines > LONG]),
        "places": [asdict(m) for m in places],
        "places_beyond_package_name": len([m for m in places if m.names != [PACKAGE_NAME]]),
        "name_lists": sum(m.lists for m in places),
    }


def markdown(data: dict) -> str:
    """The report as markdown."""
    out = [
        "# Code metrics",
        "",
        f"Describes commit `{data['commit']}`. Regenerate with `{COMMAND}`",
        "(benchmarks/code_metrics.py; standard-library `ast` only).",
        "",
        f"## Lines per module ({len(data['modules'])} modules, {data['total_lines']} lines)",
        "",
        "| module | lines |",
        "|---|---:|",
        *(f"| {m['file']} | {m['lines']} |" for m in data["modules"]),
        f"| **total** | **{data['total_lines']}** |",
        "",
        f"## Longest functions (top {TOP} of {data['functions']})",
        "",
        f"{data['over_limit']} functions exceed {LONG} lines (the issue's goal: none).",
        "",
        "| function | where | lines |",
        "|---|---|---:|",
        *(f"| `{f['name']}` | {f['file']}:{f['line']} | {f['lines']} |" for f in data["longest"]),
        "",
        "## Places that name a method",
        "",
        f"Method names from `{data['methods_from']}.METHODS`: {', '.join(data['methods'])}.",
        f"**{len(data['places'])} modules** outside the registry name a method"
        f" (**{data['places_beyond_package_name']}** when a module whose only such literal is"
        f' `"{PACKAGE_NAME}"` is left out: that string is also the package\'s name, used for its logger,'
        " cache directory and program name, so this lower bound also misses a default"
        f' `method="{PACKAGE_NAME}"`), holding **{data["name_lists"]} name lists**'
        " (tuple/list/set/dict literals with two or more method names). Not counted: the registry module"
        " (`flexlora/methods.py` or `flexlora/methods/`, when it exists), an aggregator's own"
        ' `name = "..."`, and docstrings.',
        "",
        "| module | literals | name lists | names |",
        "|---|---:|---:|---|",
        *(
            f"| {m['file']} | {m['literals']} | {m['lists']} | {', '.join(m['names'])} |"
            for m in data["places"]
        ),
        "",
    ]
    return "\n".join(out)


HEADLINES = (
    ("lines in src/flexlora", "total_lines"),
    ("functions", "functions"),
    (f"functions over {LONG} lines", "over_limit"),
    ("modules naming a method", lambda d: len(d["places"])),
    ('... not counting the package-name string "flexlora" alone', "places_beyond_package_name"),
    ("method name lists", "name_lists"),
)


def comparison(before: dict, after: dict) -> str:
    """Markdown: the headline numbers of ``before`` and ``after``, then every module whose size changed."""
    out = [
        f"## Before (`{before['commit']}`) and after (`{after['commit']}`)",
        "",
        "| measure | before | after |",
        "|---|---:|---:|",
    ]
    for label, key in HEADLINES:
        get = key if callable(key) else (lambda d, k=key: d[k])
        out.append(f"| {label} | {get(before)} | {get(after)} |")
    old = {m["file"]: m["lines"] for m in before["modules"]}
    new = {m["file"]: m["lines"] for m in after["modules"]}
    changed = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
    out += ["", "| module | lines before | lines after |", "|---|---:|---:|"]
    out += [f"| {f} | {old.get(f, '-')} | {new.get(f, '-')} |" for f in changed]
    return "\n".join([*out, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here (else print it)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument(
        "--before", type=Path, help="a --json output to compare with (adds a before/after table)"
    )
    args = parser.parse_args(argv)
    data = measure()
    report = markdown(data)
    if args.before:
        report += "\n" + comparison(json.loads(args.before.read_text(encoding="utf-8")), data)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    if args.json:
        print(json.dumps(data, indent=2))
    elif not args.out:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
