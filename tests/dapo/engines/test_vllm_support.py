"""Tests of the vLLM-free parts of the vLLM engine (the live engine: ``test_vllm_live``).

Names are checked against real wrapped models (torch.compile, activation
checkpointing, a DDP-style ``module`` attribute), chunking against the views of
real ``FlatBuffers``, the mapping back from vLLM's fused layout against a real model's
tensors, the generation gate with real threads.
"""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from transformers import Qwen2Config, Qwen2ForCausalLM

from dapo.engines.vllm_support import (
    GateTimeout,
    GenerationAborted,
    GenerationGate,
    RawSample,
    RequestLog,
    RequestPlan,
    canonical_name,
    check_against_specs,
    check_whole_layers,
    choose_logprobs_mode,
    chunk_by_bytes,
    logprobs_exact,
    meta_named_parameters,
    plan_requests,
    regroup,
    to_completion,
    to_hf_weights,
    to_vllm_weights,
    vllm_memory_fraction,
    vllm_sampling_kwargs,
)
from dapo.weights.buckets import BucketLayout, FlatBuffers
from proto.messages import SamplingParams

EOS = (1, 2)
WAIT = 5.0  # generous bound for events that must happen
BLOCKED = 0.15  # how long we watch for something that must not happen


def _config(tied: bool = True) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip


def _model(tied: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(_config(tied)).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- names


def test_canonical_name_removes_wrapper_components() -> None:
    assert canonical_name("_orig_mod.model.norm.weight") == "model.norm.weight"
    assert canonical_name("module._orig_mod.lm_head.weight") == "lm_head.weight"
    fsdp = "model.layers.3._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert canonical_name(fsdp) == "model.layers.3.mlp.up_proj.weight"
    assert canonical_name("model.norm.weight") == "model.norm.weight"
    with pytest.raises(ValueError, match="malformed"):
        canonical_name("module._orig_mod")
    with pytest.raises(ValueError, match="malformed"):
        canonical_name("model..weight")


class _DataParallelLike(torch.nn.Module):
    """Holds the model as ``.module``, the attribute DDP uses."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.module = inner


def test_wrapped_models_map_back_to_hf_names_with_the_same_tensors() -> None:
    model = _model()
    plain = list(model.named_parameters())
    wrapped = copy.deepcopy(model)
    for i, layer in enumerate(wrapped.model.layers):
        wrapped.model.layers[i] = checkpoint_wrapper(layer)
    outer = _DataParallelLike(torch.compile(wrapped))
    raw = list(outer.named_parameters())
    assert any("_checkpoint_wrapped_module" in n for n, _ in raw)
    assert all(n.startswith("module._orig_mod.") for n, _ in raw)
    mapped = to_vllm_weights(raw, tie_word_embeddings=True)
    assert [n for n, _ in mapped] == [n for n, _ in plain]
    for (_, a), (_, b) in zip(mapped, plain, strict=True):
        assert torch.equal(a, b)


def test_tied_head_is_skipped_only_when_tied() -> None:
    tied = list(_model(tied=True).state_dict().items())
    assert "lm_head.weight" in dict(tied)  # the state_dict lists the tied head
    names = [n for n, _ in to_vllm_weights(tied, tie_word_embeddings=True)]
    assert "lm_head.weight" not in names and len(names) == len(tied) - 1
    untied = list(_model(tied=False).named_parameters())
    kept = [n for n, _ in to_vllm_weights(untied, tie_word_embeddings=False)]
    assert "lm_head.weight" in kept and len(kept) == len(untied)


def test_two_names_mapping_to_one_is_an_error() -> None:
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="both map to 'model.norm.weight'"):
        to_vllm_weights(
            [("model.norm.weight", t), ("_orig_mod.model.norm.weight", t)],
            tie_word_embeddings=False,
        )


@pytest.mark.parametrize("tied", [True, False])
def test_meta_parameters_match_the_real_model(tied: bool) -> None:
    meta = meta_named_parameters(_config(tied))
    real = list(_model(tied).named_parameters())
    assert [(n, tuple(t.shape)) for n, t in meta] == [(n, tuple(t.shape)) for n, t in real]
    assert all(t.is_meta for _, t in meta)
    assert ("lm_head.weight" in dict(meta)) is (not tied)


def test_check_against_specs_names_the_bad_parameter() -> None:
    shapes = {n: tuple(t.shape) for n, t in meta_named_parameters(_config())}
    check_against_specs(list(_model().named_parameters()), shapes)
    with pytest.raises(KeyError, match="no parameter named 'model.extra'"):
        check_against_specs([("model.extra", torch.zeros(1))], shapes)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(31,\)"):
        check_against_specs([("model.norm.weight", torch.zeros(31))], shapes)


PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_partial_layers_are_refused_whole_ones_pass() -> None:
    names = [n for n, _ in meta_named_parameters(_config())]
    check_whole_layers(names, names, PACKED)  # everything
    attn = [n for n in names if n.startswith("model.layers.1.self_attn.") and "o_proj" not in n]
    check_whole_layers(attn + ["model.norm.weight"], names, PACKED)  # q, k, v with biases
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.qkv_proj' also needs"):
        check_whole_layers([n for n in attn if "k_proj" not in n], names, PACKED)
    with pytest.raises(ValueError, match=r"mlp.gate_up_proj' also needs \['model.layers.0.mlp"):
        check_whole_layers(["model.layers.0.mlp.gate_proj.weight"], names, PACKED)
    check_whole_layers(["model.layers.0.mlp.down_proj.weight"], names, PACKED)


def _vllm_layout(model: Qwen2ForCausalLM, pad_vocab: int) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters as vLLM holds them: q/k/v and gate/up stacked, the
    vocabulary padded with ``pad_vocab`` rows."""
    sd = dict(model.named_parameters())
    out = []
    for name, tensor in sd.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            parts = [sd[name.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")]
            out.append((name.replace("q_proj", "qkv_proj"), torch.cat(parts)))
        elif ".gate_proj." in name:
            parts = [tensor, sd[name.replace("gate_proj", "up_proj")]]
            out.append((name.replace("gate_proj", "gate_up_proj"), torch.cat(parts)))
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out.append((name, torch.cat([tensor, torch.ones(pad_vocab, tensor.shape[1])])))
        else:
            out.append((name, tensor))
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_vllm_layout_maps_back_to_the_hf_tensors(tied: bool) -> None:
    model = _model(tied)
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    sizes = {}
    for i in range(cfg.num_hidden_layers):
        sizes[f"model.layers.{i}.self_attn.qkv_proj"] = [q, kv, kv]
        sizes[f"model.layers.{i}.mlp.gate_up_proj"] = [cfg.intermediate_size] * 2
    shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
    mapped = to_hf_weights(_vllm_layout(model, pad_vocab=7), PACKED, sizes, shapes)
    assert [n for n, _ in mapped] == list(shapes)
    for (_, got), (_, want) in zip(mapped, model.named_parameters(), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(KeyError, match="no parameter for 'model.norm.weight'"):
        to_hf_weights([], PACKED, sizes, {"model.norm.weight": (32,)})
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(31,\)"):
        to_hf_weights(
            [("model.norm.weight", torch.zeros(31))], PACKED, sizes, {"model.norm.weight": (32,)}
        )


# ---------------------------------------------------------------- chunks and memory


def _mixed_dtype_params() -> list[tuple[str, torch.Tensor]]:
    """The tiny model's parameters, every third one in bf16: two dtype groups."""
    named = []
    for i, (name, p) in enumerate(_model().named_parameters()):
        named.append((name, p.detach().to(torch.bfloat16 if i % 3 == 0 else torch.float32)))
    return named


def test_chunks_of_bucket_views_reassemble_the_parameters() -> None:
    named = _mixed_dtype_params()
    layout = BucketLayout.from_named(named, bucket_mb=1.0)
    buffers = FlatBuffers(layout)
    buffers.pack(named)
    views = buffers.views()
    chunks = chunk_by_bytes(views, max_bytes=3000)
    assert len(chunks) > 3
    assert [n for c in chunks for n, _ in c] == [n for n, _ in views]
    for chunk in chunks:
        assert len(chunk) == 1 or sum(t.numel() * t.element_size() for _, t in chunk) <= 3000


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=500), max_size=40),
    cap=st.integers(min_value=1, max_value=600),
)
def test_chunk_by_bytes_is_ordered_capped_and_bounded(sizes: list[int], cap: int) -> None:
    named = [(f"p{i}", torch.empty(s, dtype=torch.uint8)) for i, s in enumerate(sizes)]
    chunks = chunk_by_bytes(named, cap)
    assert [n for c in chunks for n, _ in c] == [n for n, _ in named]
    sums = [sum(t.numel() for _, t in c) for c in chunks]
    assert all(len(c) >= 1 for c in chunks)
    assert all(s <= cap or len(c) == 1 for s, c in zip(sums, chunks, strict=True))
    assert all(a + b > cap for a, b in zip(sums, sums[1:], strict=False))  # greedy: no merge
    assert len(chunks) <= 2 * sum(sizes) / cap + 1


def test_chunk_by_bytes_rejects_a_zero_cap() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        chunk_by_bytes([], 0)


def test_memory_fraction_leaves_the_reserve_free() -> None:
    gib = 2**30
    assert vllm_memory_fraction(100 * gib, 10 * gib) == pytest.approx(0.8)
    assert vllm_memory_fraction(80 * gib, 0, target=0.85) == pytest.approx(0.85)
    with pytest.raises(ValueError, match="cannot hold vLLM"):
        vllm_memory_fraction(10 * gib, 8 * gib)


# ---------------------------------------------------------------- sampling


def test_logprobs_mode_choice_and_exactness_table() -> None:
    assert choose_logprobs_mode(1.0) == "raw_logprobs"
    assert choose_logprobs_mode(0.6) == "processed_logprobs"
    sp = SamplingParams
    assert logprobs_exact("raw_logprobs", sp(temperature=1.0, top_p=0.7, top_k=20))
    assert not logprobs_exact("raw_logprobs", sp(temperature=0.6))
    assert logprobs_exact("processed_logprobs", sp(temperature=0.6))
    assert not logprobs_exact("processed_logprobs", sp(temperature=1.0, top_p=0.7))
    assert not logprobs_exact("processed_logprobs", sp(temperature=0.6, top_k=5))
    for mode in ("raw_logprobs", "processed_logprobs"):
        assert logprobs_exact(mode, sp(temperature=0.0, top_p=0.5))  # greedy: untempered


def test_plans_are_one_request_per_sample_prompt_major() -> None:
    plans = plan_requests(3, SamplingParams(n=4))
    assert plans == [RequestPlan(i, None) for i in range(3) for _ in range(4)]


def test_seeded_plans_give_every_sample_its_own_seed() -> None:
    plans = plan_requests(3, SamplingParams(n=4, seed=100))
    assert [p.prompt_index for p in plans] == [0] * 4 + [1] * 4 + [2] * 4
    assert [p.seed for p in plans] == list(range(100, 112))


def test_vllm_sampling_kwargs() -> None:
    params = SamplingParams(n=4, temperature=0.8, top_p=0.9, top_k=-1, max_new_tokens=32)
    kwargs = vllm_sampling_kwargs(params, RequestPlan(0, None), eos_token_ids=(7, 2))
    assert kwargs == {
        "n": 1, "temperature": 0.8, "top_p": 0.9, "top_k": 0, "max_tokens": 32, "seed": None,
        "logprobs": 0, "stop_token_ids": [2, 7], "ignore_eos": False, "detokenize": False,
    }  # fmt: skip
    assert vllm_sampling_kwargs(SamplingParams(top_k=5), RequestPlan(0, 3), EOS)["top_k"] == 5


# ---------------------------------------------------------------- outputs


def _entries(tokens: list[int], values: list[float]) -> list[dict[int, float]]:
    """vLLM-style entries: the sampled token plus a higher-ranked decoy (token 63)."""
    return [
        {63: -0.01, tok: lp} if tok != 63 else {tok: lp}
        for tok, lp in zip(tokens, values, strict=True)
    ]


def test_stop_keeps_the_eos_and_aligns_logprobs_with_the_sampled_tokens() -> None:
    tokens, values = [5, 9, 2], [-1.5, -0.25, -3.0]
    c = to_completion(RawSample(tokens, _entries(tokens, values), "stop"), EOS, 8)
    assert c.finish_reason == "stop"
    assert c.token_ids.tolist() == tokens and c.token_ids.dtype == np.int32
    assert c.logprobs.tolist() == values and c.logprobs.dtype == np.float32


def test_length_whose_last_token_is_eos_counts_as_stop() -> None:
    c = to_completion(RawSample([5, 1], [-1.0, -2.0], "length"), EOS, 2)
    assert c.finish_reason == "stop" and c.token_ids.tolist() == [5, 1]


def test_length_without_eos() -> None:
    c = to_completion(RawSample([5, 6, 7], [-1.0, -0.5, -0.125], "length"), EOS, 3)
    assert c.finish_reason == "length" and len(c) == 3
    short = to_completion(RawSample([5, 6], [-1.0, -0.5], "length"), EOS, 3)  # context full
    assert short.finish_reason == "length" and len(short) == 2


@pytest.mark.parametrize("reason", ["abort", None, "error"])
def test_unfinished_samples_raise(reason: str | None) -> None:
    with pytest.raises(GenerationAborted, match=repr(reason)):
        to_completion(RawSample([5], [-1.0], reason), EOS, 4)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (RawSample([5, 6], [-1.0, -1.0], "stop"), "'stop' without a final EOS"),
        (RawSample([5, 2, 6], [-1.0] * 3, "length"), "EOS at position 1 of 3"),
        (RawSample([5, 6, 7, 8], [-1.0] * 4, "length"), "4 tokens, expected 1..3"),
        (RawSample([], [], "length"), "0 tokens"),
        (RawSample([5, 2], None, "stop"), "no log-probs"),
        (RawSample([5, 2], [-1.0], "stop"), "1 log-prob entries for 2 tokens"),
        (RawSample([5, 2], [{5: -1.0}, {6: -1.0}], "stop"), "do not include sampled token 2"),
        (RawSample([5, 2], [-1.0, math.nan], "stop"), "position 1: nan"),
        (RawSample([5, 2], [0.5, -1.0], "stop"), "position 0: 0.5"),
    ],
)
def test_malformed_samples_raise(sample: RawSample, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_completion(sample, EOS, 3)


def test_regroup_collects_seeded_requests_per_prompt() -> None:
    params = SamplingParams(n=2, seed=0, max_new_tokens=4)
    plans = plan_requests(2, params)
    samples = [RawSample([10 + k, 2], [-0.5, -float(k + 1)], "stop") for k in range(4)]
    groups = regroup(plans, samples, 2, params, EOS)
    assert [[c.token_ids[0] for c in g] for g in groups] == [[10, 11], [12, 13]]
    assert groups[1][1].logprobs.tolist() == [-0.5, -4.0]


def test_regroup_rejects_missing_samples() -> None:
    params = SamplingParams(n=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="1 samples for 2 requests"):
        regroup(plan_requests(1, params), [RawSample([2], [-1.0], "stop")], 1, params, EOS)
    plans = [RequestPlan(0, None), RequestPlan(0, None)]
    with pytest.raises(ValueError, match="prompt 1: 0 completions, expected 2"):
        regroup(plans, [RawSample([2], [-1.0], "stop")] * 2, 2, params, EOS)


def test_request_log_places_updates_on_the_unfinished_requests() -> None:
    log = RequestLog(["a", "b", "c"])
    log.record_update(1)  # before the first step: token 0 of every request
    log.absorb("a", [5], [{5: -1.0}], None)
    log.absorb("b", [6], [{6: -0.5}], None)
    log.absorb("c", [2], [{2: -0.25}], "stop")
    log.record_update(2)  # a and b are at token 1; c is done
    log.absorb("a", [7, 2], [{7: -1.0}, {2: -2.0}], "stop")
    log.absorb("b", [8], [{8: -3.0}], None)
    assert log.unfinished == ["b"]
    log.absorb("b", [9], None, "length")
    a, b, c = log.samples()
    assert a == RawSample([5, 7, 2], [{5: -1.0}, {7: -1.0}, {2: -2.0}], "stop", ((0, 1), (1, 2)))
    assert b.logprobs is None and b.token_ids == [6, 8, 9] and b.weight_updates == ((0, 1), (1, 2))
    assert c.weight_updates == ((0, 1),)
    completion = to_completion(a, EOS, 4)
    assert completion.weight_updates == ((0, 1), (1, 2))
    assert completion.version_segments(0) == ([1, 2], [0, 1])


# ---------------------------------------------------------------- generation gate


def _start(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_generations_run_concurrently() -> None:
    gate, barrier = GenerationGate(), threading.Barrier(4, timeout=WAIT)
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            with gate.generating(WAIT):
                barrier.wait()  # only passes when all four are inside at once
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [_start(generate) for _ in range(4)]
    for t in threads:
        t.join(WAIT)
    assert errors == [] and gate.active == 0 and gate.state == "open"


def test_update_waits_for_running_generation_and_holds_new_ones_back() -> None:
    gate = GenerationGate()
    inside, release = threading.Event(), threading.Event()
    updated, late_entered = threading.Event(), threading.Event()
    order: list[str] = []

    def long_generation() -> None:
        with gate.generating(WAIT):
            inside.set()
            release.wait(WAIT)
            order.append("generation done")

    def update() -> None:
        with gate.updating(WAIT):
            order.append(f"update with {gate.active} active")
            updated.set()

    def late_generation() -> None:
        with gate.generating(WAIT):
            order.append("late generation")
            late_entered.set()

    first = _start(long_generation)
    assert inside.wait(WAIT)
    updater = _start(update)
    assert not updated.wait(BLOCKED)  # blocked by the running generation
    assert gate.state == "draining"
    late = _start(late_generation)
    assert not late_entered.wait(BLOCKED)  # held back: the pending update goes first
    release.set()
    for t in (first, updater, late):
        t.join(WAIT)
    assert order == ["generation done", "update with 0 active", "late generation"]
    assert gate.state == "open"


def test_generation_is_blocked_while_weights_load() -> None:
    gate = GenerationGate()
    loading, finish, generated = threading.Event(), threading.Event(), threading.Event()

    def update() -> None:
        with gate.updating(WAIT):
            loading.set()
            finish.wait(WAIT)

    updater = _start(update)
    assert loading.wait(WAIT) and gate.state == "updating"

    def generate() -> None:
        with gate.generating(WAIT):
            generated.set()

    generator = _start(generate)
    assert not generated.wait(BLOCKED)
    finish.set()
    assert generated.wait(WAIT)
    updater.join(WAIT)
    generator.join(WAIT)
    assert gate.state == "open" and gate.active == 0


def test_timeouts_raise_and_a_timed_out_update_withdraws() -> None:
    gate = GenerationGate()
    with gate.generating():
        thread_errors: list[BaseException] = []

        def update() -> None:
            try:
                with gate.updating(0.05):
                    pass
            except GateTimeout as exc:
                thread_errors.append(exc)

        _start(update).join(WAIT)
        assert len(thread_errors) == 1 and "1 generations running" in str(thread_errors[0])
        assert gate.state == "open"
        with gate.generating(0.05):  # nested entry works, and new ones are not held back
            pass
    with gate.updating():
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                with gate.generating(0.05):
                    pass
            except GateTimeout as exc:
                errors.append(exc)

        _start(generate).join(WAIT)
        assert len(errors) == 1
    assert gate.state == "open" and gate.active == 0


def test_generation_held_back_by_a_withdrawn_update_goes_ahead() -> None:
    gate = GenerationGate()
    held_back, entered, timed_out = threading.Event(), threading.Event(), threading.Event()

    def update() -> None:
        with pytest.raises(GateTimeout), gate.updating(0.3):
            pass
        timed_out.set()

    def generate() -> None:
        held_back.set()
        with gate.generating(10 * WAIT):  # far longer than we wait for it below
            entered.set()

    with gate.generating():  # keeps the update waiting until it gives up
        updater = _start(update)
        while gate.state != "draining":
            threading.Event().wait(0.005)
        generator = _start(generate)
        assert held_back.wait(WAIT) and not entered.wait(0.05)
        assert entered.wait(WAIT)  # woken by the withdrawal, while this generation still runs
        assert timed_out.is_set()
    updater.join(WAIT)
    generator.join(WAIT)


def test_nested_generation_passes_a_pending_update() -> None:
    gate, updated = GenerationGate(), threading.Event()

    def update() -> None:
        with gate.updating(WAIT):
            updated.set()

    with gate.generating():
        updater = _start(update)
        while gate.state != "draining":
            threading.Event().wait(0.005)
        with gate.generating(0.2):  # would wait for the drain it blocks
            assert gate.active == 2
        assert not updated.is_set()
    assert updated.wait(WAIT)
    updater.join(WAIT)


def test_exceptions_release_the_gate() -> None:
    gate = GenerationGate()
    with pytest.raises(KeyError), gate.generating():
        raise KeyError("boom")
    with pytest.raises(KeyError), gate.updating():
        raise KeyError("boom")
    assert gate.state == "open" and gate.active == 0
    with gate.updating(0.05):
        pass


def test_same_thread_misuse_raises_instead_of_deadlocking() -> None:
    gate = GenerationGate()
    with gate.generating(), pytest.raises(RuntimeError, match="inside a generation"):
        with gate.updating(0.05):
            pass
    with gate.updating(), pytest.raises(RuntimeError, match="holding a weight update"):
        with gate.generating(0.05):
            pass


def test_random_interleaving_never_overlaps_updates_and_generations() -> None:
    gate, lock = GenerationGate(), threading.Lock()
    state = {"generating": 0, "updating": 0, "violations": 0, "updates": 0}

    def enter(kind: str) -> None:
        with lock:
            state[kind] += 1
            busy_other = state["updating" if kind == "generating" else "generating"]
            if busy_other or (kind == "updating" and state["updating"] > 1):
                state["violations"] += 1

    def leave(kind: str) -> None:
        with lock:
            state[kind] -= 1

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(60):
            kind = "updating" if rng.random() < 0.2 else "generating"
            with gate.updating(WAIT) if kind == "updating" else gate.generating(WAIT):
                enter(kind)
                if kind == "updating":
                    state["updates"] += 1
                leave(kind)

    threads = [_start(lambda s=s: worker(s)) for s in range(6)]
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert state["violations"] == 0 and state["updates"] > 0 and gate.active == 0
