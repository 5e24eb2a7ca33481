"""The mapping's ``positive`` filter: a small row-filter language, parsed by hand (never ``eval``).

An impression log holds every impression; only some rows are positives (paper IV-A trains on
positive interactions). The filter says which, e.g.::

    clk == 1
    rating >= 4
    clk == 1 and dwell_s > 5
    action in ("click", "buy") or (rating >= 4 and not flagged == 1)
    `click flag` == "y"

Grammar (``not`` binds tightest, then ``and``, then ``or``; parentheses group)::

    expr    := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | "(" expr ")" | compare
    compare := column OP literal | column "in" "(" literal ("," literal)* ")"
    OP      := == | != | >= | <= | > | <
    column  := identifier | `back-quoted name`
    literal := number | "string" | 'string'

A number literal compares the column as numbers, a string literal as text (strings support only
``==``, ``!=`` and ``in``). Evaluation is vectorised over a whole column; the caller supplies the
columns, so this module knows nothing about files.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

Op = Literal["==", "!=", ">=", "<=", ">", "<", "in"]
_NUMERIC_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "==": np.equal,
    "!=": np.not_equal,
    ">=": np.greater_equal,
    "<=": np.less_equal,
    ">": np.greater,
    "<": np.less,
}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<str>"[^"]*"|'[^']*')
      | (?P<quoted>`[^`]+`)
      | (?P<op>==|!=|>=|<=|>|<|=|\(|\)|,)
      | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in"}


class FilterError(ValueError):
    """The filter text does not parse; the message says where."""


@dataclass(frozen=True)
class Compare:
    column: str
    op: Op
    values: tuple[float | str, ...]  # one literal, or the ``in`` list

    @property
    def numeric(self) -> bool:
        return isinstance(self.values[0], float)


@dataclass(frozen=True)
class Not:
    arg: Node


@dataclass(frozen=True)
class BoolOp:
    op: Literal["and", "or"]
    args: tuple[Node, ...]


Node = Compare | Not | BoolOp


@dataclass(frozen=True)
class _Tok:
    kind: str  # num, str, col, op, kw, end
    text: str
    pos: int


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            start = len(text) - len(text[pos:].lstrip())
            raise FilterError(f"unexpected {text[start]!r} at character {start + 1}")
        kind = m.lastgroup or ""
        value = m.group(kind)
        start = m.start(kind)
        if kind == "op" and value == "=":
            raise FilterError(f"'=' at character {start + 1}: write '==' to compare")
        if kind == "word":
            kind = "kw" if value.lower() in _KEYWORDS else "col"
            value = value.lower() if kind == "kw" else value
        elif kind == "quoted":
            kind, value = "col", value[1:-1]
        out.append(_Tok(kind, value, start))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str, text: str | None = None) -> _Tok:
        tok = self.take()
        if tok.kind != kind or (text is not None and tok.text != text):
            want = repr(text) if text is not None else {"col": "a column name", "num": "a number"}.get(kind, kind)
            got = "the end" if tok.kind == "end" else repr(tok.text)
            raise FilterError(f"expected {want} at character {tok.pos + 1}, got {got}")
        return tok

    def parse(self) -> Node:
        node = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise FilterError(f"unexpected {tok.text!r} at character {tok.pos + 1}")
        return node

    def expr(self) -> Node:
        args = [self.conj()]
        while self.peek().kind == "kw" and self.peek().text == "or":
            self.take()
            args.append(self.conj())
        return args[0] if len(args) == 1 else BoolOp("or", tuple(args))

    def conj(self) -> Node:
        args = [self.unary()]
        while self.peek().kind == "kw" and self.peek().text == "and":
            self.take()
            args.append(self.unary())
        return args[0] if len(args) == 1 else BoolOp("and", tuple(args))

    def unary(self) -> Node:
        tok = self.peek()
        if tok.kind == "kw" and tok.text == "not":
            self.take()
            return Not(self.unary())
        if tok.kind == "op" and tok.text == "(":
            self.take()
            node = self.expr()
            self.expect("op", ")")
            return node
        return self.compare()

    def literal(self) -> float | str:
        tok = self.take()
        if tok.kind == "num":
            return float(tok.text)
        if tok.kind == "str":
            return tok.text[1:-1]
        got = "the end" if tok.kind == "end" else repr(tok.text)
        raise FilterError(f"expected a number or a quoted string at character {tok.pos + 1}, got {got}")

    def compare(self) -> Compare:
        col = self.expect("col")
        tok = self.take()
        if tok.kind == "kw" and tok.text == "in":
            self.expect("op", "(")
            values = [self.literal()]
            while self.peek().kind == "op" and self.peek().text == ",":
                self.take()
                values.append(self.literal())
            self.expect("op", ")")
            if len({type(v) for v in values}) > 1:
                raise FilterError(f"column {col.text!r}: 'in' mixes numbers and strings")
            return Compare(col.text, "in", tuple(values))
        if tok.kind != "op" or tok.text not in _NUMERIC_OPS:
            got = "the end" if tok.kind == "end" else repr(tok.text)
            raise FilterError(
                f"expected a comparison (==, !=, >=, <=, >, <, in) after {col.text!r} at character {tok.pos + 1}, got {got}"
            )
        value = self.literal()
        if isinstance(value, str) and tok.text not in ("==", "!="):
            raise FilterError(f"column {col.text!r}: {tok.text} needs a number; strings support only ==, != and in")
        return Compare(col.text, tok.text, (value,))  # type: ignore[arg-type]


def parse_filter(text: str) -> Node:
    """Parse a filter; raises FilterError naming the character where it fails."""
    if not text.strip():
        raise FilterError("empty filter")
    return _Parser(text).parse()


def columns_of(node: Node) -> list[tuple[str, bool]]:
    """(column, compared as numbers) of every comparison, in order of appearance."""
    if isinstance(node, Compare):
        return [(node.column, node.numeric)]
    if isinstance(node, Not):
        return columns_of(node.arg)
    return [c for arg in node.args for c in columns_of(arg)]


def evaluate_filter(
    node: Node, numbers: Callable[[str], np.ndarray], strings: Callable[[str], np.ndarray]
) -> np.ndarray:
    """(N,) bool: rows that pass. ``numbers(col)`` gives float64, ``strings(col)`` a str array."""
    if isinstance(node, Not):
        return ~evaluate_filter(node.arg, numbers, strings)
    if isinstance(node, BoolOp):
        parts = [evaluate_filter(a, numbers, strings) for a in node.args]
        return np.logical_and.reduce(parts) if node.op == "and" else np.logical_or.reduce(parts)
    if node.numeric:
        x = numbers(node.column)
        if node.op == "in":
            return np.isin(x, np.asarray(node.values, dtype=np.float64))
        return _NUMERIC_OPS[node.op](x, float(node.values[0]))
    s = strings(node.column)
    if node.op == "in":
        return np.isin(s, np.asarray(node.values, dtype=str))
    hit = s == str(node.values[0])
    return hit if node.op == "==" else ~hit
