"""Tests as calls and checks: what the candidate's process computes, and what this process judges.

`plan_test` turns a test (one or more `assert` statements) into a `Plan`: each call into the candidate's
code is cut out and sent to the child as source (with the builtin names it uses), never the expected
values; the assert expressions keep a placeholder `_call<k>` for each call's output. `passes` evaluates
them here, on the decoded outputs, with pure operations on plain data only (`PURE`, `MATH`, literals,
comparisons, arithmetic with size guards, subscripts). Anything else is an `UnsupportedTest`.
"""

from __future__ import annotations

import ast
import builtins
import functools
import math
import operator
from dataclasses import dataclass
from typing import Any


class UnsupportedTest(ValueError):
    """A test that cannot be turned into calls and checks (see the module docstring)."""


PURE = {f.__name__: f for f in (abs, all, any, bool, dict, float, frozenset, int, len, list, max, min, round, set,
                                 sorted, str, sum, tuple, isinstance)}
"""Builtins a test may apply in this process (to literals and outputs), besides math's MATH."""
MATH = {name: getattr(math, name) for name in ("isclose", "isnan", "isinf", "isfinite", "pi", "e", "tau", "inf", "nan")}
TYPES = {t.__name__: t for t in (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset, type(None))}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: lambda a, b: _times(a, b), ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: lambda a, b: _modulo(a, b), ast.Pow: lambda a, b: _power(a, b),
              ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
            ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_,
            ast.IsNot: operator.is_not}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}


@dataclass(frozen=True)
class Plan:
    """One test as this process runs it: its assert expressions, each call into the candidate's code replaced
    by the name `_call<k>`, and those calls as (expression source, builtin names it uses)."""

    test: str
    asserts: tuple[ast.expr, ...]
    calls: tuple[tuple[str, tuple[str, ...]], ...]


@functools.lru_cache(maxsize=4096)
def plan_test(test: str, entry_point: str | None = None) -> Plan:
    """The test's checks, or UnsupportedTest saying why it cannot be judged here.

    >>> plan = plan_test("assert add(3, 5) == 8", "add")
    >>> plan.calls, ast.unparse(plan.asserts[0])
    ((('add(3, 5)', ()),), '_call0 == 8')
    """
    try:
        body = ast.parse(test).body
    except SyntaxError as e:
        raise UnsupportedTest(f"SyntaxError: {e.msg}") from None
    if not body or not all(isinstance(s, ast.Assert) for s in body):
        raise UnsupportedTest("only assert statements can be judged")
    cut = _CutCalls(entry_point or "")
    asserts = tuple(cut.visit(s.test) for s in body)
    if not cut.calls:
        raise UnsupportedTest("it calls none of the candidate's code")
    return Plan(test, asserts, tuple(cut.calls))


class _CutCalls(ast.NodeTransformer):
    """An assert's expression with the calls into the candidate's code cut out (kept in `calls`, replaced by
    `_call<k>`); anything this process could not evaluate on plain data raises UnsupportedTest."""

    JUDGED = (ast.Constant, ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.List, ast.Tuple, ast.Set, ast.Dict,
              ast.Subscript, ast.Slice, ast.keyword, ast.expr_context, ast.boolop, ast.cmpop, ast.operator, ast.unaryop)

    def __init__(self, entry: str) -> None:
        self.entry = entry
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def visit_Call(self, node: ast.Call) -> ast.expr:
        if not _pure_function(node.func, self.entry):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id != self.entry and n.id in builtins.__dict__}
            self.calls.append((ast.unparse(node), tuple(sorted(names))))
            return ast.copy_location(ast.Name(f"_call{len(self.calls) - 1}", ast.Load()), node)
        if isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            if len(node.args) != 2 or node.keywords:
                raise UnsupportedTest("isinstance takes a value and a type")
            _type_of(node.args[1])
            node.args[0] = self.visit(node.args[0])
            return node
        node.args = [self.visit(a) for a in node.args]
        node.keywords = [self.visit(k) for k in node.keywords]
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        for op, a, b in zip(node.ops, [node.left, *node.comparators], node.comparators):
            singleton = [x for x in (a, b) if isinstance(x, ast.Constant) and any(x.value is c for c in (None, True, False))]
            if isinstance(op, (ast.Is, ast.IsNot)) and not singleton:
                raise UnsupportedTest("`is` compares only with None, True or False")
        return self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.expr:
        if isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in MATH:
            return node
        return self.refuse(node)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        judged = isinstance(node, self.JUDGED) and not (
            isinstance(node, ast.BinOp) and type(node.op) not in _OPERATORS or
            isinstance(node, ast.UnaryOp) and type(node.op) not in _UNARY or
            isinstance(node, ast.Dict) and None in node.keys or  # {**x}
            isinstance(node, ast.keyword) and node.arg is None or  # f(**x)
            isinstance(node, ast.Constant) and node.value is Ellipsis)
        if not judged:
            self.refuse(node)
        return super().generic_visit(node)

    @staticmethod
    def refuse(node: ast.AST) -> ast.AST:
        shown = ast.unparse(node)[:80] if isinstance(node, ast.expr) else type(node).__name__
        raise UnsupportedTest(f"`{shown}` cannot be judged outside the candidate's process")


def _pure_function(func: ast.expr, entry: str) -> bool:
    if isinstance(func, ast.Name):
        return func.id in PURE and func.id != entry
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "math" and \
        func.attr in MATH and callable(MATH[func.attr])


def _type_of(node: ast.expr) -> type | tuple[type, ...]:
    """isinstance's second argument: a builtin type's name, type(None), or a tuple of those."""
    if isinstance(node, ast.Name) and node.id in TYPES:
        return TYPES[node.id]
    if isinstance(node, ast.Call) and ast.unparse(node) == "type(None)":
        return type(None)
    if isinstance(node, ast.Tuple):
        found = [_type_of(e) for e in node.elts]
        return tuple(t for ts in found for t in (ts if isinstance(ts, tuple) else (ts,)))
    raise UnsupportedTest(f"isinstance(..., {ast.unparse(node)[:40]}): use builtin type names, type(None) or a tuple of them")


class Iterated:
    """An iterator the child drained (a generator, map, ...): iterable here, equal only to itself."""

    __slots__ = ("items",)

    def __init__(self, items: tuple) -> None:
        self.items = items

    def __iter__(self):  # noqa: ANN204
        return iter(self.items)

    def __repr__(self) -> str:
        return f"<iterator of {len(self.items)} items>"


class Failed(Exception):
    """A call whose output is not a value (it raised, or was not plain data)."""


def _evaluate(node: ast.expr, outputs: list) -> Any:
    """An assert expression `_CutCalls` returned, on the decoded outputs; pure operations on plain data only."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        value = outputs[int(node.id[len("_call"):])]
        if isinstance(value, Failed):
            raise value
        return value
    if isinstance(node, ast.Attribute):
        return MATH[node.attr]
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, outputs)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, outputs)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        value = None
        for part in node.values:
            value = _evaluate(part, outputs)
            if isinstance(node.op, ast.And) != bool(value):
                return value
        return value
    if isinstance(node, ast.Call):
        func = MATH[node.func.attr] if isinstance(node.func, ast.Attribute) else PURE[node.func.id]
        if func is isinstance:
            return isinstance(_evaluate(node.args[0], outputs), _type_of(node.args[1]))
        args = [_evaluate(a, outputs) for a in node.args]
        if func is round and len(args) == 2 and not (isinstance(args[1], int) and abs(args[1]) <= 1000):
            raise ValueError("round's ndigits must be an int of at most 1000")
        return func(*args, **{k.arg: _evaluate(k.value, outputs) for k in node.keywords})
    if isinstance(node, ast.BinOp):
        return _OPERATORS[type(node.op)](_evaluate(node.left, outputs), _evaluate(node.right, outputs))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, outputs))
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](_evaluate(e, outputs) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {_evaluate(k, outputs): _evaluate(v, outputs) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Subscript):
        return _evaluate(node.value, outputs)[_evaluate(node.slice, outputs)]
    if isinstance(node, ast.Slice):
        return slice(*(None if p is None else _evaluate(p, outputs) for p in (node.lower, node.upper, node.step)))
    raise TypeError(f"not judged here: {type(node).__name__}")


def _times(a: Any, b: Any) -> Any:
    """a * b, refusing a repeated sequence of more than a million items (an output may be any int)."""
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * n > 1_000_000:
            raise ValueError("a repeated sequence too long to judge")
    return a * b


def _modulo(a: Any, b: Any) -> Any:
    if isinstance(a, (str, bytes)):
        raise ValueError("%-formatting is not judged")
    return a % b


def _power(a: Any, b: Any) -> Any:
    if isinstance(b, int) and abs(b) > 1000 or isinstance(a, int) and a.bit_length() > 4096 and isinstance(b, int) and b > 1:
        raise ValueError("a power too large to judge")
    return a ** b


def passes(plan: Plan, outputs: list) -> tuple[bool, str]:
    """(whether every assert of the test holds, why not)."""
    for expression in plan.asserts:
        try:
            if not _evaluate(expression, outputs):
                shown = ", ".join(repr(o)[:60] for o in outputs if not isinstance(o, Failed))
                return False, f"{plan.test[:120]} (got {shown[:150]})"
        except Exception as e:  # noqa: BLE001 - a failed call, or an operation the outputs do not support
            return False, f"{plan.test[:120]}: {e if isinstance(e, Failed) else f'{type(e).__name__}: {e}'}"
    return True, ""
