"""Triton's interpreter (the kernels' tests on a CPU, and the emulated CUDA device) without
work it repeats: a launch patches `triton.language` for its programs and puts it back when
it ends, but a `@triton.jit` function that a kernel calls (a device function) patches the
language again at every call, in every program (`InterpretedFunction.__call__` in Triton
3.x): a scan of the language's modules, up to a fifth of an emulated benchmark's time.
Such a call inside a launch that has patched the languages the function sees now only
runs the function; anything else goes through Triton as it is.
"""

from __future__ import annotations

import inspect


def install() -> None:
    """Once per process, before kernels run (later launches are served; nothing to undo)."""
    import triton.language as tl
    from triton.runtime import interpreter

    cls = getattr(interpreter, "InterpretedFunction", None)
    call = vars(cls).get("__call__") if cls is not None else None
    if call is None or getattr(call, "skips_patched", False):
        return
    langs: dict = {}  # a device function -> the language modules its module sees

    def patched(fn) -> bool:
        seen = langs.get(fn)
        if seen is None:
            seen = langs[fn] = [
                v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)
            ]
        # (a patched language's builtins are the interpreter's wrappers)
        return bool(seen) and not any(tl.core.is_builtin(lang.load) for lang in seen)

    def device_call(self, *args, **kwargs):
        if not patched(self.fn):
            return call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    device_call.skips_patched = True
    cls.__call__ = device_call
