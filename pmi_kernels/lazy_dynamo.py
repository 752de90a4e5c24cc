"""torch.compile's marks, without importing torch._dynamo before a compile needs it.

Importing torch._dynamo (sympy with it) takes about as long as importing torch. Two of torch's
own paths import it early: `torch.compiler.assume_constant_result` at decoration time, and
torch.library's wrapper around a custom op's implementation at the op's first call. Until
torch._dynamo is imported no frame can be compiled, so neither needs it before then.
"""

from __future__ import annotations

import sys


def assume_constant_result(fn):
    """torch.compiler.assume_constant_result: the decorator only marks the function, and dynamo
    reads the mark when torch.compile traces a call (tests/test_build.py checks the mark is torch's)."""
    fn._dynamo_marked_constant = True
    return fn


def defer_dynamo_import(op) -> None:
    """A custom op (torch.library.custom_op) whose first eager call does not import torch._dynamo.

    torch wraps each implementation so that dynamo never traces into it, building the
    `torch._dynamo.disable` wrapper at the first call and caching it on the implementation as
    `__dynamo_disable`. Here that cache starts as a stand-in that calls the implementation
    directly while torch._dynamo is not imported, and builds torch's wrapper (and caches it in
    its own place) once it is. A torch without these internals keeps its own behaviour."""
    for wrapper in getattr(op, "_backend_fns", {}).values():
        impl = getattr(wrapper, "__wrapped__", None)
        if impl is not None and getattr(impl, "__dynamo_disable", None) is None:
            setattr(impl, "__dynamo_disable", _until_dynamo(impl))


def _until_dynamo(impl):
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return impl(*args, **kwargs)
        import torch._dynamo

        disabled = torch._dynamo.disable(impl, recursive=True, wrapping=False)
        setattr(impl, "__dynamo_disable", disabled)
        return disabled(*args, **kwargs)

    return call
