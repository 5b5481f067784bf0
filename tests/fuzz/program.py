"""A generated program as a tree of statements: what the generator builds, the shrinker cuts
and the harness renders to source text.

A ``Stmt`` is one simple statement (one or more lines, indented relative to its block); a
``Block`` is a compound statement: lines before its header, the header, its body and any
further clauses (``else:``, ``except ...:``, ``finally:``), each a list of statements.
Statements marked ``keep`` (the program's fixed frame: imports, the variable pool, the step's
call and return) are never removed by the shrinker.
"""
from __future__ import annotations

import dataclasses
import textwrap

INDENT = "    "


@dataclasses.dataclass
class Stmt:
    text: str
    keep: bool = False

    def render(self, depth: int) -> list[str]:
        return [INDENT * depth + line for line in textwrap.dedent(self.text).strip("\n").splitlines()]


@dataclasses.dataclass
class Block:
    header: str
    body: list
    clauses: list = dataclasses.field(default_factory=list)  # [(header, [stmts])]
    pre: str = ""  # lines before the header, at the block's own depth
    post: str = ""  # lines after the block (e.g. logging a while loop's turn count)
    keep: bool = False

    def render(self, depth: int) -> list[str]:
        out = Stmt(self.pre).render(depth) if self.pre.strip() else []
        out.append(INDENT * depth + self.header)
        out += render_body(self.body, depth + 1)
        for header, body in self.clauses:
            out.append(INDENT * depth + header)
            out += render_body(body, depth + 1)
        if self.post.strip():
            out += Stmt(self.post).render(depth)
        return out

    def bodies(self) -> list[list]:
        return [self.body] + [body for _, body in self.clauses]


def render_body(body: list, depth: int) -> list[str]:
    lines = [line for stmt in body for line in stmt.render(depth)]
    return lines or [INDENT * depth + "pass"]


@dataclasses.dataclass
class Program:
    """``body`` is the module: it defines ``main(decorate)``, which returns (values, log)."""
    seed: int
    body: list

    def source(self) -> str:
        return "\n".join(render_body(self.body, 0)) + "\n"
