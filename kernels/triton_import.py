"""Triton when it is installed; otherwise a stand-in whose ``jit`` leaves functions undecorated.

Triton ships for Linux x86-64/aarch64 only. The kernel modules decorate their Triton functions at import
time, so this keeps ``kernels`` (and the models importing it) importable elsewhere: there only the torch
references run, and ``HAS_TRITON`` is False. Kernel modules use ``from __future__ import annotations`` so
``tl.constexpr`` annotations are never evaluated.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - only on platforms without Triton wheels

    class _NoTriton:
        """Just enough of ``triton`` for kernel modules to import."""

        @staticmethod
        def jit(fn=None, **_options):  # noqa: ANN001, ANN205 - mirrors triton.jit's two call forms
            return fn if fn is not None else (lambda inner: inner)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(n - 1, 0).bit_length()

    triton = _NoTriton()
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "tl", "triton"]
