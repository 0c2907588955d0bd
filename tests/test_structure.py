"""The architecture's rules: scripts import only the library; the core (the algorithm at the package's
top level, and the data and plumbing it runs on) never imports the study or the benchmarks, which
never import each other; and the package has no import cycle."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "minirlhf")
SCRIPTS = ("train_sft", "train_rm", "train_ppo", "refine", "experiments", "bench", "curves")
OUTSIDE_THE_CORE = ("minirlhf.study", "minirlhf.bench")


def modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = \
                    os.path.join(folder, f)
    return found


def imports(path, name):
    """The dotted names a file imports (a relative import resolved against module `name`; for
    `from X import y`, both X and X.y, since y may be a module)."""
    package = name.split(".")[:-1] if not path.endswith("__init__.py") else name.split(".")
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
    return out


def within(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


def test_no_script_imports_another():
    for name in SCRIPTS:
        assert not imports(os.path.join(ROOT, name + ".py"), name) & set(SCRIPTS), name


def test_the_core_never_imports_the_study_or_the_benchmarks():
    for name, path in modules().items():
        deps = imports(path, name)
        outside = [o for o in OUTSIDE_THE_CORE if within(name, o)]
        for other in OUTSIDE_THE_CORE:
            if other not in outside:  # the core, or the study looking at the benchmarks (or back)
                assert not any(within(d, other) for d in deps), f"{name} imports {other}"


def test_the_layering_test_sees_the_layers():
    # the rule above must really read the package: the study imports the core, and not the reverse
    mods = modules()
    assert {"minirlhf.rlp", "minirlhf.study.cells", "minirlhf.bench.table"} <= set(mods)
    assert "minirlhf.rlp" in imports(mods["minirlhf.study.cells"], "minirlhf.study.cells")


def test_the_package_has_no_import_cycle():
    mods = modules()
    deps = {name: {d for d in imports(path, name) if d in mods and d != name}
            for name, path in mods.items()}

    done = set()

    def visit(module, path):
        for dep in deps[module] - done:
            assert dep not in path, " -> ".join(path + [dep])
            visit(dep, path + [dep])
        done.add(module)
    for module in deps:
        visit(module, [module])
