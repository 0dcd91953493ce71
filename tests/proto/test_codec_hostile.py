"""The codec against hostile entries: no amplification, every failure a DecodeError."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from proto.codec import DecodeError, decode, encode
from proto.messages import RolloutGroup, Sample
from tests.factories import rollout_group


def entry_with(header: dict, blob: bytes) -> dict:
    return {b"v": b"1", b"k": b"rollout_group", b"h": json.dumps(header).encode(), b"b": blob}


def header_of(group: RolloutGroup) -> dict:
    return json.loads(encode(group)["h"])


def test_aliased_array_references_are_refused_before_any_copy():
    group = rollout_group("r", "g", [[65, 256]] * 2)
    header = header_of(group)
    blob = np.zeros(1 << 20, dtype=np.int8).tobytes()  # 1 MiB of payload
    ref = {"@a": ["|i1", 0, 1 << 20]}  # the whole blob, as 1-byte ints
    for s in header["samples"]:
        s["response_ids"], s["logprobs"] = ref, ref  # widened to int32 / float32: 4x each
    tracemalloc.start()
    with pytest.raises(DecodeError, match="overlap|dtype"):
        decode(entry_with(header, blob), RolloutGroup)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20  # never the ~16 MiB the widened aliases would take


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        (["<i4", 4, 10**12], "outside"),
        (["<i4", -8, 2], "outside"),
        (["<f8", 0, 2], "dtype"),
        (["<i4", 0, "x"], "malformed"),
        ("not a list", "malformed"),
    ],
)
def test_bad_array_references_are_decode_errors(ref, why):
    group = rollout_group("r", "g", [[65, 256]] * 2)
    fields = encode(group)
    header = json.loads(fields["h"])
    header["prompt_ids"] = {"@a": ref}
    with pytest.raises(DecodeError, match=why):
        decode(entry_with(header, bytes(fields["b"])), RolloutGroup)


def test_deep_or_huge_json_is_a_decode_error():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(DecodeError):
        decode({b"v": b"1", b"k": b"rollout_group", b"h": deep, b"b": b""}, RolloutGroup)
    huge = b'{"n": 1' + b"0" * 5000 + b"}"
    with pytest.raises(DecodeError):
        decode({b"v": b"1", b"k": b"rollout_group", b"h": huge, b"b": b""}, RolloutGroup)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e30, 5.0])
def test_log_probs_must_be_finite_and_not_positive(bad):
    with pytest.raises(ValueError, match="logprobs"):
        Sample(response_ids=[1, 2], logprobs=[-0.5, bad], finish_reason="stop",
               versions=[0], version_starts=[0])  # fmt: skip
