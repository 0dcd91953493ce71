"""In-flight weight updates in the HF engine: ``between_steps`` loads new weights between
decode steps, the KV cache is kept, and every completion says where its version changed.

An update of ``lm_head`` alone leaves the KV cache as the new weights would have made it,
so there every recorded log-prob must equal a teacher-forced recomputation: by the old
model before the update, by the new one from it on.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dapo.engines.base import Completion, InferenceEngine
from dapo.engines.hf import HFEngine
from dapo.engines.vllm import VLLMEngine
from proto.messages import Sample, SamplingParams

EOS = (1, 2)
PROMPTS = [[5, 6, 7, 8], [10, 11, 12, 13, 14, 15, 16, 17, 18], [3]]  # different lengths
PARAMS = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=16, seed=7)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    """A tiny Qwen2 with an output head of its own (untied), so changing it leaves the
    embeddings, hence the KV cache, alone."""
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=list(EOS), tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def teacher_forced(model, prompt: list[int], response: np.ndarray, temperature: float):
    """(L,) log_softmax(logits / T) of each response token from one uncached forward."""
    ids = torch.tensor([prompt + response.tolist()])  # (1, P + L)
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # (P + L, V)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]  # (L, V)
    return logprobs.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).numpy()


class UpdateAt:
    """``between_steps`` that, at its ``at``-th call, loads ``tensors`` (maybe none) into
    ``engine`` and returns ``version``; None at every other call."""

    def __init__(self, engine: HFEngine, at: int, version: int, tensors=()) -> None:
        self.engine, self.at, self.version, self.tensors = engine, at, version, list(tensors)
        self.calls = 0

    def __call__(self) -> int | None:
        assert not torch.is_inference_mode_enabled()  # what it creates must outlive generate
        self.calls += 1
        if self.calls != self.at:
            return None
        self.engine.load_weights(self.tensors)
        return self.version


def flat(groups: list[list[Completion]]) -> list[Completion]:
    return [c for group in groups for c in group]


@pytest.mark.parametrize("max_batch_size", [None, 4])
def test_an_update_that_loads_nothing_changes_nothing_but_the_record(model, max_batch_size):
    engine = HFEngine(model, max_batch_size=max_batch_size)
    plain = flat(engine.generate(PROMPTS, PARAMS))
    assert all(c.weight_updates == () for c in plain)
    quiet = flat(engine.generate(PROMPTS, PARAMS, lambda: None))
    noop = UpdateAt(engine, at=4, version=1)
    marked = flat(engine.generate(PROMPTS, PARAMS, noop))
    for a, b, c in zip(plain, quiet, marked, strict=True):
        for other in (b, c):
            np.testing.assert_array_equal(a.token_ids, other.token_ids)
            np.testing.assert_array_equal(a.logprobs, other.logprobs)
            assert a.finish_reason == other.finish_reason
        assert b.weight_updates == ()
    # the 4th call precedes the forward pass that yields token 3 of the first chunk's rows
    first_chunk = marked[: max_batch_size or len(marked)]
    assert {c.weight_updates for c in first_chunk if len(c) > 3} == {((3, 1),)}
    assert all(c.weight_updates == () for c in first_chunk if len(c) <= 3)
    assert all(c.weight_updates == ((0, 1),) for c in marked[len(first_chunk) :])
    assert noop.calls > 4


@pytest.mark.parametrize("max_batch_size", [None, 4])
def test_an_lm_head_update_applies_from_the_next_token_with_the_cache_kept(model, max_batch_size):
    old = model
    new = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        new.lm_head.weight.mul_(1.5).add_(0.1 * torch.randn_like(new.lm_head.weight))
    engine = HFEngine(copy.deepcopy(old), max_batch_size=max_batch_size)
    update = UpdateAt(engine, at=5, version=8, tensors=[("lm_head.weight", new.lm_head.weight)])
    groups = engine.generate(PROMPTS, PARAMS, update)
    seen = set()
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for c in group:
            versions, starts = c.version_segments(3)
            Sample(response_ids=c.token_ids, logprobs=c.logprobs, finish_reason=c.finish_reason,
                   versions=versions, version_starts=starts)  # fmt: skip
            switch = starts[-1] if versions[-1] == 8 else len(c)  # first token of version 8
            seen.add((tuple(versions), switch))
            by_old = teacher_forced(old, prompt, c.token_ids, PARAMS.temperature)
            by_new = teacher_forced(new, prompt, c.token_ids, PARAMS.temperature)
            np.testing.assert_allclose(c.logprobs[:switch], by_old[:switch], atol=1e-5, rtol=0)
            np.testing.assert_allclose(c.logprobs[switch:], by_new[switch:], atol=1e-5, rtol=0)
            assert np.abs(by_old[switch:] - by_new[switch:]).min(initial=1.0) > 1e-3
    assert ((3, 8), 4) in seen  # mid-sample: old up to token 3, new from token 4 on
    if max_batch_size is not None:
        assert ((8,), 0) in seen  # a chunk started after the update: new throughout


def test_version_segments_merge_and_override() -> None:
    tokens, logprobs = np.arange(6, dtype=np.int32), np.full(6, -1.0, np.float32)

    def segments(updates, start=2):
        return Completion(tokens, logprobs, "length", tuple(updates)).version_segments(start)

    assert segments([]) == ([2], [0])
    assert segments([(3, 4)]) == ([2, 4], [0, 3])
    assert segments([(0, 3), (0, 4), (2, 5)]) == ([4, 5], [0, 2])  # later update wins at 0
    assert segments([(2, 2), (4, 3)]) == ([2, 3], [0, 4])  # no segment for the same version
    assert segments([(3, 4), (3, 2)]) == ([2], [0])
    with pytest.raises(ValueError, match="weight_updates"):
        Completion(tokens, logprobs, "length", ((6, 3),))
    with pytest.raises(ValueError, match="weight_updates"):
        Completion(tokens, logprobs, "length", ((3, 3), (2, 4)))


def test_engines_share_the_generate_signature(model) -> None:
    want = inspect.signature(InferenceEngine.generate).parameters
    for engine_cls in (HFEngine, VLLMEngine):
        got = inspect.signature(engine_cls.generate).parameters
        assert list(got) == list(want), engine_cls
        assert got["between_steps"].default is None
    assert isinstance(HFEngine(model), InferenceEngine)
