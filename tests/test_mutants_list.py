"""The mutant list (tests/mutants.py) stays runnable as the code moves: every patch applies to
today's code and every test it names exists. Running the mutants themselves is `make mutants`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.mutants import MUTANTS, ROOT, Stale, function_span, patched


@pytest.mark.parametrize("mutant", MUTANTS, ids=[x.name for x in MUTANTS])
def test_mutant_applies_and_changes_the_code(mutant):
    try:
        new = patched(mutant, ROOT)
    except Stale as exc:
        pytest.fail(f"mutant {mutant.name} no longer applies ({exc}): rewrite it where its code moved")
    assert new != (ROOT / mutant.file).read_text()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[x.name for x in MUTANTS])
def test_mutant_names_tests_that_exist(mutant):
    assert mutant.tests, f"{mutant.name} names no test"
    for node in mutant.tests:
        path, _, name = node.partition("::")
        file = ROOT / path
        assert file.is_file(), f"{mutant.name}: no test file {path}"
        if name:
            tree = ast.parse(file.read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name.split("[")[0] in names, f"{mutant.name}: no test {name} in {path}"


def test_mutant_names_are_unique_and_at_least_twelve():
    names = [x.name for x in MUTANTS]
    assert len(names) == len(set(names))
    assert len(names) >= 12


def test_function_span_finds_methods_and_refuses_missing_ones():
    src = "def f():\n    return 1\n\nclass C:\n    def g(self):\n        return 2\n"
    a, b = function_span(src, "C.g")
    assert src[a:b] == "    def g(self):\n        return 2\n"
    with pytest.raises(Stale):
        function_span(src, "C.h")
    with pytest.raises(Stale):
        function_span(src, "D.g")


def test_a_patch_that_matches_twice_is_stale(tmp_path: Path):
    from tests.mutants import Mutant
    (tmp_path / "x.py").write_text("def f():\n    a = 1\n    a = 1\n")
    with pytest.raises(Stale, match="2 copies"):
        patched(Mutant("t", "", "x.py", "f", (("a = 1", "a = 2"),), ("x",)), tmp_path)
    assert ast.parse((tmp_path / "x.py").read_text())
