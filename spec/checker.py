"""The checker: names, scopes, types, shapes, cycles and clause rules of a
declaration, producing its IR (``core.ir``) as it goes.

Every problem is a ``SpecError`` at the position of the construct at fault.
``Checker`` is composed here from one mixin per job:

- ``check_decls``: parameters, inputs, lets and the one-clause-per-keyword rule;
- ``check_layouts``: tokens/queries/keys layouts, grids, segments and the ``Frame``;
- ``check_exprs``: expressions and their types;
- ``check_calls``: builtin functions, ``window()`` and calls of other patterns;
- ``check_masks``: a pattern's mask and score terms (bias, softcap, decay);
- ``check_routing``: the route clause;
- ``check_vertical_slash``: the vertical-slash route clause, lowered into the mask;
- ``check_recurrence``: recurrence declarations;

with the shared types and constants in ``check_types``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..core import ir
from ..core.errors import Pos, SpecError
from . import ast
from .check_calls import CallChecks
from .check_decls import DeclarationChecks, names_used
from .check_exprs import ExpressionChecks
from .check_layouts import Frame, LayoutChecks
from .check_masks import PatternChecks
from .check_recurrence import RecurrenceChecks
from .check_routing import RoutingChecks
from .check_stripes import StripesChecks
from .check_topp import TopPChecks
from .check_types import (
    BOOL,
    BUILTINS,
    FIXED_NAMES,
    FLOAT,
    INT,
    INT64_LIMIT,
    WINDOW_KEYWORDS,
    Typed,
)
from .check_vertical_slash import VerticalSlashChecks

#: The names this module has always offered (the pieces now live in the check_* modules).
__all__ = [
    "BOOL", "BUILTINS", "FIXED_NAMES", "FLOAT", "INT", "INT64_LIMIT", "WINDOW_KEYWORDS",
    "Checker", "Frame", "Typed", "names_used",
]


@dataclass
class Checker(DeclarationChecks, LayoutChecks, ExpressionChecks, CallChecks, PatternChecks, RoutingChecks,
              VerticalSlashChecks, RecurrenceChecks, TopPChecks, StripesChecks):
    """Checks and lowers one declaration.

    ``params`` maps parameter names to given values; ``strict`` requires a
    value for every parameter (compile time); otherwise a parameter without
    one stays a symbol (``attnc check``). ``resolve`` finds a called pattern
    by name: it returns (module, declaration) or None.
    """

    module: ast.Module
    decl: ast.Declaration
    params: dict[str, object]
    resolve: Callable[[str, ast.Module], tuple[ast.Module, ast.Declaration] | None]
    strict: bool = True
    frame: Frame | None = None
    call_stack: tuple[str, ...] = ()
    param_exprs: dict[str, Typed] | None = None  # when called: typed values from the caller
    #: int parameters kept as symbols though given (``S.param_symbol``): where the generated kernels read them
    symbolic: frozenset[str] = frozenset()

    env_params: dict[str, Typed] = field(default_factory=dict)
    #: parameters given one value per head (``NAME[heads]``): their value counts
    head_params: dict[str, int] = field(default_factory=dict)
    env_lets: dict[str, Typed] = field(default_factory=dict)
    inputs: dict[str, ir.InputDecl] = field(default_factory=dict)
    input_pos: dict[str, Pos] = field(default_factory=dict)
    windows: list[ir.WindowSite] = field(default_factory=list)

    # ------------------------------------------------------------ errors
    def error(self, message: str, pos: Pos | None, hint: str | None = None) -> SpecError:
        return SpecError(message, pos, filename=self.module.filename, source=self.module.source, hint=hint)

    # ------------------------------------------------------------ entry points
    def lower(self) -> ir.PatternIR | ir.RecurrenceIR:
        self._bind_params()
        layouts = self._layout_clauses()
        if self.frame is None:
            self.frame = self._own_frame(layouts)
        self._declare_inputs()
        self._lower_lets()
        if self.decl.kind == "recurrence":
            return self._recurrence(layouts)
        return self._pattern()
