"""The architecture's rules: scripts import only the library, and the library has no import cycle."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_sft", "train_rm", "train_ppo", "refine", "experiments", "bench")


def imports(path):
    """Top-level module names a file imports, and the package's modules it imports relatively (any depth)."""
    names, relative = set(), set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            relative |= {node.module} if node.module else {a.name for a in node.names}
    return names, relative


def test_no_script_imports_another():
    for name in SCRIPTS:
        assert not imports(os.path.join(ROOT, name + ".py"))[0] & set(SCRIPTS), name


def test_the_package_has_no_import_cycle():
    folder = os.path.join(ROOT, "minirlhf")
    deps = {f[:-3]: imports(os.path.join(folder, f))[1] for f in os.listdir(folder) if f.endswith(".py")}

    def visit(module, path):
        for dep in deps.get(module, ()):
            assert dep not in path, " -> ".join(path + [dep])
            visit(dep, path + [dep])
    for module in deps:
        visit(module, [module])
