"""mutmut's hook for ``make mutate`` (mutmut 2 imports this file from the directory it runs in).

mutmut 2 mutates whole files, and each surviving mutant costs a whole run of the tests: with
MUTATE_FUNCTIONS set (names of top-level functions, separated by spaces), only the mutants on
the lines of those functions are tested; the file's other mutants are reported as skipped.
Functions are found by name, not line numbers, so the selection survives edits and moves.
"""
import ast
import os

_LINES_BY_FILE = {}


def _lines_of(filename, names):
    """1-based line numbers of the named functions in ``filename`` (its unmutated text:
    pre_mutation runs before mutmut writes the mutant)."""
    if filename not in _LINES_BY_FILE:
        with open(filename) as f:
            tree = ast.parse(f.read(), filename)
        lines = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
                lines.update(range(node.lineno, node.end_lineno + 1))
        _LINES_BY_FILE[filename] = lines
    return _LINES_BY_FILE[filename]


def pre_mutation(context):
    names = set(os.environ.get("MUTATE_FUNCTIONS", "").split())
    if names and context.current_line_index + 1 not in _lines_of(context.filename, names):
        context.skip = True
