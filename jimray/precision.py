"""Numeric precision of Jim-Net's training steps (``train.precision``): fp32, tf32 or bf16.

* ``fp32``: nothing is changed (torch's defaults: matmuls in IEEE float32; on CUDA, torch lets cuDNN run
  convolutions as TF32 by default).
* ``tf32``: on CUDA (Ampere and later) matmuls and cuDNN convolutions may run as TensorFloat-32 (10-bit
  mantissa, float32 range) on the tensor cores, for the whole step (forward and backward); tensors stay
  float32. No effect on the CPU.
* ``bf16``: the forward pass and the loss run under ``torch.autocast(device, bfloat16)`` (CUDA or CPU):
  convolutions, matmuls and einsums in bfloat16, parameters, gradients and optimiser state in float32; the
  backward pass follows the forward's dtypes. bfloat16 has float32's exponent range, so no loss scaling
  (``GradScaler``) is needed.

Under ``bf16`` the geometry stays in float32: the functions decorated with :func:`float32_region` (FFTs:
cuFFT has no bfloat16; ``grid_sample`` resampling: one dtype for volume and grid; rigid fits:
``linalg.inv`` has no bfloat16 on CUDA; rotation decoding and pose composition: ``1 + small correction``
vanishes in bfloat16's 8-bit significand) upcast their half-precision tensor arguments and switch autocast
off inside. Outside autocast they are untouched, so ``fp32`` and ``tf32`` compute exactly as before.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

import torch

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
_HALF = (torch.bfloat16, torch.float16)

F = TypeVar("F", bound=Callable)


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _first_device(args, kwargs) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _upcast(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in _HALF else value


def float32_region(fn: F) -> F:
    """Decorator: under autocast (on the device of the first tensor argument) run ``fn`` with autocast off and
    its bfloat16/float16 tensor arguments (top level only) upcast to float32; otherwise call ``fn`` as it is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = _first_device(args, kwargs)
        if device is None or not torch.is_autocast_enabled(device.type):
            return fn(*args, **kwargs)
        with torch.autocast(device.type, enabled=False):
            return fn(*(_upcast(a) for a in args), **{k: _upcast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device type, bfloat16)`` for ``bf16``; a context that does nothing otherwise."""
    _check(precision)
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _tf32_backends() -> list:
    """The backends whose float32 precision TF32 changes (torch's ``fp32_precision`` API): cuBLAS matmuls and
    cuDNN (convolutions, and RNNs so that the two cuDNN flags agree, as torch's legacy ``allow_tf32`` reader needs)."""
    return [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]


@contextlib.contextmanager
def tf32_scope(enabled: bool | None) -> Iterator[None]:
    """Inside: CUDA matmuls and cuDNN convolutions in TF32 (``True``), in IEEE float32 (``False``) or as they are
    (``None``); the previous settings come back on exit. Process-wide flags, read when a kernel is launched."""
    if enabled is None:
        yield
        return
    backends = _tf32_backends()
    try:
        before = [b.fp32_precision for b in backends]
    except RuntimeError as exc:  # torch refuses to mix this API with the legacy allow_tf32 flags set elsewhere
        warnings.warn(f"TF32 setting left as it is: {exc}", RuntimeWarning, stacklevel=3)
        yield
        return
    try:
        for b in backends:
            b.fp32_precision = "tf32" if enabled else "ieee"
        yield
    finally:
        for b, value in zip(backends, before, strict=True):
            b.fp32_precision = value


def uses_tf32(precision: str) -> bool | None:
    """The :func:`tf32_scope` setting of a precision: ``True`` for ``tf32``, ``None`` (unchanged) otherwise."""
    _check(precision)
    return True if precision == "tf32" else None
