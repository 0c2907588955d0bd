"""ALGORITHMS.md cites the function that implements each equation: every citation must still exist."""
import ast
import importlib
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def citations(path):
    with open(os.path.join(ROOT, path)) as f:
        return set(re.findall(r"minirlhf/([\w/]+)\.py:(\w+)", f.read()))


def test_every_function_algorithms_md_cites_exists():
    cited = citations("ALGORITHMS.md")
    assert len(cited) > 30  # the file really does cite the code
    missing = [f"minirlhf/{m}.py:{name}" for m, name in sorted(cited)
               if not hasattr(importlib.import_module("minirlhf." + m.replace("/", ".")), name)]
    assert not missing, f"ALGORITHMS.md cites functions that no longer exist: {missing}"


def test_code_cites_only_files_in_the_repo():
    """Comments and docstrings cite ALGORITHMS.md sections that exist, never a file outside the repo."""
    with open(os.path.join(ROOT, "ALGORITHMS.md")) as f:
        sections = set(re.findall(r"^#+ §?(\d+(?:\.\d+)?)", f.read(), re.M))
    for name in python_files():
        with open(name) as f:
            text = f.read()
        assert "TASK.md" not in text and "shared/spec" not in text, name
        for sec in re.findall(r"ALGORITHMS\.md §(\d+(?:\.\d+)?)", text):
            assert sec in sections, (name, sec)


def python_files():
    """The scripts and every module of the package."""
    found = [os.path.join(ROOT, n) for n in os.listdir(ROOT) if n.endswith(".py")]
    for folder, _, files in os.walk(os.path.join(ROOT, "minirlhf")):
        found += [os.path.join(folder, n) for n in files if n.endswith(".py")]
    return sorted(found)


def comments_and_docstrings(path):
    """Every comment and docstring of a Python file."""
    with open(path) as f:
        text = f.read()
    found = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list):  # a docstring, and the string after each config field
            found += [s.value.value for s in body if isinstance(s, ast.Expr)
                      and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)]
    return found


def test_code_comments_cite_no_readme_and_no_date():
    """Comments say why and cite ALGORITHMS.md or docs/: the README is a guide that moves, and a
    date says nothing about the code."""
    for name in python_files():
        for text in comments_and_docstrings(name):
            assert not re.search(r"(?<![/\w])README\b", text), (name, text)
            assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), (name, text)
