"""Tests of the HF inference engine on a tiny random Qwen2 model.

The key property: every recorded log-prob equals a teacher-forced
recomputation (one forward over prompt + response, no cache, no padding) at the
same temperature, for prompts of different lengths decoded in one left-padded
batch. That is what makes the learner's recomputed old log-probs consistent.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dapo.engines.base import (
    Completion,
    InferenceEngine,
    SamplingParams,
    tensors_checksum,
)
from dapo.engines.hf import (
    HFEngine,
    resolve_eos_token_ids,
    sample_next_token,
    truncate_logprobs,
)

EOS = (1, 2)
PROMPTS = [[5, 6, 7, 8], [10, 11, 12, 13, 14, 15, 16, 17, 18], [3]]  # different lengths


def _tiny_model(attn: str = "sdpa") -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=list(EOS),
        tie_word_embeddings=True,
        # Wider than the default init so logits are not nearly uniform: greedy
        # decoding then has clear winners and EOS is neither rare nor certain.
        initializer_range=0.2,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls are fastest single-threaded; extra threads only contend on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return _tiny_model()


def _teacher_forced_logprobs(
    model: Qwen2ForCausalLM, prompt: list[int], response: np.ndarray, temperature: float
) -> np.ndarray:
    """log_softmax(logits / T) of each response token from one uncached, unpadded forward."""
    ids = torch.tensor([prompt + response.tolist()])  # (1, P + L)
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # (P + L, V)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]  # (L, V)
    return logprobs.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).numpy()


def _greedy_reference(model: Qwen2ForCausalLM, prompt: list[int], max_new: int) -> list[int]:
    """Argmax decoding with a full forward per step: no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in EOS:
                break
    return ids[len(prompt) :]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_batch_size", [None, 4])
def test_logprobs_equal_teacher_forced_recompute(attn: str, max_batch_size: int | None) -> None:
    model = _tiny_model(attn)
    engine = HFEngine(model, max_batch_size=max_batch_size)
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=24, seed=3)
    groups = engine.generate(PROMPTS, params)
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for completion in group:
            expected = _teacher_forced_logprobs(model, prompt, completion.token_ids, 0.7)
            np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)


def test_lengths_and_finish_reasons(model: Qwen2ForCausalLM) -> None:
    engine = HFEngine(model)
    max_new = 20
    groups = engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=max_new, seed=0))
    reasons = set()
    for group in groups:
        assert len(group) == 8
        for c in group:
            assert isinstance(c, Completion)
            assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
            assert c.token_ids.shape == c.logprobs.shape
            assert 1 <= len(c) <= max_new
            assert np.all(c.logprobs <= 0.0) and np.all(np.isfinite(c.logprobs))
            body = c.token_ids[:-1].tolist()
            assert not set(body) & set(EOS)  # nothing after the first EOS
            if c.finish_reason == "stop":
                assert int(c.token_ids[-1]) in EOS
            else:
                assert len(c) == max_new and int(c.token_ids[-1]) not in EOS
            reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}  # the seed exercises both paths


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=2, top_k=1, max_new_tokens=12, seed=5),
        SamplingParams(n=2, top_p=1e-6, max_new_tokens=12, seed=5),
        SamplingParams(n=2, temperature=0.0, max_new_tokens=12),
    ],
    ids=["top_k=1", "top_p_tiny", "temperature=0"],
)
def test_greedy_settings_equal_argmax_decoding(model: Qwen2ForCausalLM, params) -> None:
    groups = HFEngine(model).generate(PROMPTS, params)
    for prompt, group in zip(PROMPTS, groups, strict=True):
        expected = _greedy_reference(model, prompt, params.max_new_tokens)
        for c in group:
            assert c.token_ids.tolist() == expected


def test_seed_determinism(model: Qwen2ForCausalLM) -> None:
    engine = HFEngine(model)

    def tokens(seed: int) -> list[list[int]]:
        params = SamplingParams(n=4, max_new_tokens=16, seed=seed)
        return [c.token_ids.tolist() for g in engine.generate(PROMPTS, params) for c in g]

    first = tokens(11)
    assert tokens(11) == first
    assert tokens(12) != first
    assert len({tuple(t) for t in first}) > 1  # the n samples of a prompt differ


def test_sampling_frequencies_follow_truncated_distribution() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().repeat(20000, 1)  # (B, V), same distribution in every row
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.8)  # keeps {0.4, 0.3, 0.2}
    tokens, logprobs = sample_next_token(logits, params, generator)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), atol=0.015, rtol=0)
    # Recorded log-probs are those of the untruncated distribution.
    torch.testing.assert_close(logprobs, probs.log()[tokens])


def test_truncate_logprobs_hand_values() -> None:
    lp = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    inf = float("-inf")
    kept = truncate_logprobs(lp, top_k=-1, top_p=0.7)  # mass before: 0.5 -> 0.3 kept, 0.8 -> cut
    assert torch.equal(kept, torch.tensor([[inf, lp[0, 1], inf, lp[0, 3]]]))
    kept = truncate_logprobs(lp, top_k=-1, top_p=0.85)
    assert torch.isinf(kept).tolist() == [[False, False, True, False]]
    kept = truncate_logprobs(lp, top_k=3, top_p=1.0)
    assert torch.isinf(kept).tolist() == [[False, False, True, False]]
    # top-p acts on the top-k survivors renormalised: (0.625, 0.375) -> only the first.
    kept = truncate_logprobs(lp, top_k=2, top_p=0.6)
    assert torch.isinf(kept).tolist() == [[True, False, True, True]]
    assert truncate_logprobs(lp, top_k=-1, top_p=1.0) is lp


def test_load_weights_changes_outputs_and_checksum(model: Qwen2ForCausalLM) -> None:
    engine = HFEngine(copy.deepcopy(model))
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    original = {k: v.clone() for k, v in engine.state_dict().items()}
    checksum0 = engine.weights_checksum()
    out0 = [g[0].logprobs for g in engine.generate(PROMPTS, greedy)]

    torch.manual_seed(1)
    engine.load_weights((k, v + 0.1 * torch.randn_like(v)) for k, v in original.items())
    assert engine.weights_checksum() != checksum0
    out1 = [g[0].logprobs for g in engine.generate(PROMPTS, greedy)]
    assert any(a.shape != b.shape or not np.allclose(a, b) for a, b in zip(out0, out1, strict=True))

    engine.load_weights(original.items())
    assert engine.weights_checksum() == checksum0
    out2 = [g[0].logprobs for g in engine.generate(PROMPTS, greedy)]
    for a, b in zip(out0, out2, strict=True):
        np.testing.assert_array_equal(a, b)

    # A partial update (one tensor, float64 on input) is applied and cast.
    name = "model.norm.weight"
    engine.load_weights([(name, torch.full_like(original[name], 2.0, dtype=torch.float64))])
    assert engine.state_dict()[name].dtype == torch.float32
    assert torch.all(engine.state_dict()[name] == 2.0)
    assert engine.weights_checksum() != checksum0


def test_load_weights_rejects_bad_names_and_shapes(model: Qwen2ForCausalLM) -> None:
    engine = HFEngine(copy.deepcopy(model))
    with pytest.raises(KeyError, match="no.such"):
        engine.load_weights([("no.such.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def test_tensors_checksum_properties() -> None:
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.bfloat16)
    base = tensors_checksum([("a", a), ("b", b)])
    assert tensors_checksum([("b", b), ("a", a)]) == base  # order-independent
    assert tensors_checksum([("a", a.clone()), ("b", b.clone())]) == base
    bumped = a.clone()
    bumped[1, 2] = torch.nextafter(bumped[1, 2], torch.tensor(100.0))  # one ulp
    assert tensors_checksum([("a", bumped), ("b", b)]) != base
    assert tensors_checksum([("a", a.double()), ("b", b)]) != base  # dtype counts
    assert tensors_checksum([("a", a.reshape(3, 2)), ("b", b)]) != base  # shape counts
    assert tensors_checksum([("c", a), ("b", b)]) != base  # names count


def test_engine_from_model_directory(model: Qwen2ForCausalLM, tmp_path) -> None:
    model.save_pretrained(tmp_path)
    engine = HFEngine(tmp_path)
    assert isinstance(engine, InferenceEngine)
    assert engine.eos_token_ids == EOS  # from the saved generation config
    assert engine.weights_checksum() == HFEngine(model).weights_checksum()


def test_resolve_eos_token_ids() -> None:
    config = GenerationConfig(eos_token_id=[3, 4])
    assert resolve_eos_token_ids(7, config) == (7,)
    assert resolve_eos_token_ids([9, 8, 9], config) == (9, 8)
    assert resolve_eos_token_ids(None, config) == (3, 4)
    assert resolve_eos_token_ids(None, GenerationConfig(eos_token_id=5)) == (5,)
    vocab = {"<unk>": 0, "</s>": 4, "<|im_end|>": 6, "a": 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), eos_token="<|im_end|>"
    )
    assert resolve_eos_token_ids(tokenizer, config) == (6, 3, 4)
    with pytest.raises(ValueError, match="EOS"):
        resolve_eos_token_ids(None, GenerationConfig())


def test_invalid_inputs_raise(model: Qwen2ForCausalLM) -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        HFEngine(model).generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="logprobs"):
        Completion(np.zeros(2, np.int32), np.zeros(3, np.float32), "stop")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_logprobs_equal_teacher_forced_recompute_cuda(dtype: torch.dtype, atol: float) -> None:
    model = _tiny_model().to("cuda", dtype)
    engine = HFEngine(model, device="cuda")
    groups = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=24, seed=0))
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids.tolist()], device="cuda")
            with torch.no_grad():
                logits = model(ids).logits[0].float()
            expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
            expected = expected.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
            np.testing.assert_allclose(c.logprobs, expected.cpu().numpy(), atol=atol, rtol=0)
