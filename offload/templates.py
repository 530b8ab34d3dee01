"""Chat templates, rendered as HF renders them, within bounds of time and size.

A chat template comes with the model file, and a model file may come from anyone.
jinja2's sandbox keeps a template from reaching Python internals; it does not keep
it from looping for hours or building a 10 GB string. Here every render has a
deadline and a size budget, checked wherever a template does work: each loop
step over `range`, each attribute or item lookup, each call and filter (its arguments and its result), each
arithmetic operator, and each piece of output. A template that exceeds either
gets a `TemplateError` that names the bound (and so does one that recurses without
end). Real templates use a few milliseconds and about the size of the messages.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

RENDER_SECONDS = 5.0
MIN_RENDER_CHARS = 1 << 20  # whatever the messages, a template may write this much
RENDER_FACTOR = 4  # ... or this many times the characters of the messages
MAX_INT_ARGUMENT = 1 << 20  # counts and widths a call may be given ("x".center(n), ...)


class _Budget:
    def __init__(self, chars: int):
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.chars = chars

    def check(self, value=None):
        if time.monotonic() > self.deadline:
            raise TemplateError(f"the chat template ran longer than {RENDER_SECONDS:g} s")
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.chars:
            raise TemplateError(
                f"the chat template built a value of {len(value):,} items or characters, "
                f"more than its bound of {self.chars:,}"
            )
        return value


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The HF chat-template environment with per-render bounds (`render`)."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self._local = threading.local()

        def raise_exception(message):
            raise TemplateError(message)

        self.globals["raise_exception"] = raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.globals["range"] = self._range
        self.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        # Filters are called directly by compiled templates, not through `call`: wrap them.
        self.filters = {name: self._bounded(f) for name, f in self.filters.items()}

    def _bounded(self, f):
        @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
        def bounded(*args, **kwargs):
            self._check_args(args[1:], kwargs)
            return self._budget.check(f(*args, **kwargs))

        return bounded

    @property
    def _budget(self) -> _Budget:
        return self._local.budget

    def render(self, template, chars: int, **variables) -> str:
        """Render within RENDER_SECONDS and about RENDER_FACTOR x `chars` characters."""
        budget = _Budget(max(MIN_RENDER_CHARS, RENDER_FACTOR * chars))
        self._local.budget = budget
        out, n = [], 0
        try:
            for piece in template.generate(**variables):
                n += len(piece)
                if n > budget.chars:
                    raise TemplateError(
                        f"the chat template wrote more than its bound of {budget.chars:,} characters"
                    )
                budget.check()
                out.append(piece)
        except RecursionError:
            raise TemplateError("the chat template recursed without end") from None
        except MemoryError:
            raise TemplateError("the chat template ran out of memory") from None
        return "".join(out)

    def _range(self, *args):
        budget = self._budget
        for i in safe_range(*args):  # at most MAX_RANGE items per range
            budget.check()
            yield i

    def _check_args(self, args, kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT_ARGUMENT:
                raise TemplateError(
                    f"the chat template passed {a:,} to a call; the bound is {MAX_INT_ARGUMENT:,}"
                )

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        __self._check_args(args, kwargs)
        return __self._budget.check(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        return self._budget.check(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        return self._budget.check(super().getitem(obj, argument))

    def call_binop(self, context, operator, left, right):
        budget = self._budget
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TemplateError(f"the chat template raised a number to the power {right:,}")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > budget.chars:
                        raise TemplateError(
                            f"the chat template repeated a value {n:,} times, more than its "
                            f"bound of {budget.chars:,} characters"
                        )
        return budget.check(super().call_binop(context, operator, left, right))
