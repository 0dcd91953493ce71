"""Soft overlong punishment of DAPO (arXiv 2503.14476).

With ``Lmax`` the generation budget, ``Lcache`` the punishment interval and
``L`` the response length in tokens (the EOS token counts):

    0                                   if L <= Lmax - Lcache
    ((Lmax - Lcache) - L) / Lcache * f  if Lmax - Lcache < L <= Lmax
    -f                                  if L > Lmax

The reward service adds the penalty to the verifier's score when
``reward.overlong_buffer.enable`` is set; accuracy stays the verifier's.
The ramp is continuous: it is 0 at ``Lmax - Lcache`` and ``-f`` at ``Lmax``.
"""

from __future__ import annotations

import math


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def overlong_penalty(
    length: int, max_response_length: int, buffer_len: int, penalty_factor: float
) -> float:
    """Penalty (<= 0) for a response of ``length`` tokens; see the module doc."""
    _check_int("length", length, 0)
    _check_int("max_response_length", max_response_length, 1)
    _check_int("buffer_len", buffer_len, 1)
    if buffer_len > max_response_length:
        raise ValueError(
            f"buffer_len ({buffer_len}) must not exceed max_response_length ({max_response_length})"
        )
    if not (math.isfinite(penalty_factor) and penalty_factor >= 0):
        raise ValueError(f"penalty_factor must be a finite number >= 0, got {penalty_factor!r}")
    expected = max_response_length - buffer_len
    if length <= expected or penalty_factor == 0:
        return 0.0
    if length <= max_response_length:
        return (expected - length) / buffer_len * penalty_factor
    return -float(penalty_factor)
