"""Chunked response log-probs (``services.learner.logprobs``) against the full-logits path
they replace: same log-probs and entropies, same gradients, whatever the chunk size."""

from __future__ import annotations

import copy

import pytest
import torch

from dapo.algorithm.loss import entropy_from_logits, token_log_probs
from services.learner.batching import pack_batch
from services.learner.logprobs import response_log_probs
from services.learner.trainer import Trainer
from tests.services.learner.test_trainer import rollout_batch, spec, tiny_model

torch.set_num_threads(1)


def full_logits_path(model, mb, temperature: float):
    """The learner's former path: every position's logits (B, S, V), the response positions
    gathered (B, T, V), upcast, divided by the temperature, then log-softmax."""
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
    rows = torch.arange(len(mb))[:, None]
    logits = out.logits[rows, mb.resp_pos]  # (B, T, V)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    logits = logits / temperature
    return token_log_probs(logits, mb.resp_ids), entropy_from_logits(logits)


def chunked(model, mb, temperature: float, chunk: int, entropy_grad: bool = True):
    return response_log_probs(
        model,
        mb.input_ids,
        mb.attention_mask,
        mb.resp_pos,
        mb.resp_ids,
        temperature=temperature,
        chunk=chunk,
        with_entropy=True,
        entropy_grad=entropy_grad,
    )


@pytest.fixture(scope="module")
def packed():
    batch = rollout_batch(tiny_model())
    return pack_batch(batch, pad_id=0, norm_adv_by_std=True)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 3, 5, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_log_probs_and_gradients_match_the_full_path(packed, chunk, dtype):
    base = tiny_model(dtype).eval()
    mb = packed.select(torch.arange(len(packed)))
    weights = torch.randn(mb.mask.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for fn in (lambda m: full_logits_path(m, mb, 0.7), lambda m: chunked(m, mb, 0.7, chunk)):
        model = copy.deepcopy(base)
        logp, entropy = fn(model)
        ((logp * weights).sum() + (entropy * weights).sum()).backward()
        results.append((logp.detach(), entropy.detach(), _grads(model)))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert lp_a.shape == lp_b.shape == mb.mask.shape
    torch.testing.assert_close(lp_b, lp_a, atol=tol, rtol=0)
    torch.testing.assert_close(ent_b, ent_a, atol=tol, rtol=0)
    for name in g_a:  # the gradient reaches every weight, head and embedding included
        torch.testing.assert_close(g_b[name], g_a[name], atol=tol * 10, rtol=tol * 10)


def test_entropy_carries_a_gradient_only_for_a_bonus(packed):
    model = tiny_model().eval()
    mb = packed.select(torch.arange(4))
    logp, entropy = chunked(model, mb, 1.0, 4, entropy_grad=False)
    assert logp.requires_grad and not entropy.requires_grad
    with torch.no_grad():
        logp, entropy = chunked(model, mb, 1.0, 4)
    assert not logp.requires_grad and not entropy.requires_grad


def test_bf16_autocast_logits_are_upcast_like_the_full_path(packed):
    model = tiny_model().eval()
    mb = packed.select(torch.arange(len(packed)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = full_logits_path(model, mb, 1.0)
        part, _ = chunked(model, mb, 1.0, 5)
    assert part.dtype == full.dtype == torch.float32
    torch.testing.assert_close(part, full, atol=1e-6, rtol=0)


def test_trainer_figures_do_not_depend_on_the_chunk():
    batch = rollout_batch(tiny_model())
    figures = []
    for chunk in (2, 512):
        model = tiny_model(torch.float64)
        trainer = Trainer(model, spec(entropy_coeff=0.01), "cpu", pad_id=0, logprob_chunk=chunk)
        figures.append(trainer.train_batch(batch))
    for k in ("loss", "grad_norm", "entropy", "ppo_kl"):
        assert figures[0][k] == pytest.approx(figures[1][k], abs=1e-12), k


def test_a_scaled_head_is_refused(packed):
    model = tiny_model().eval()
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits are not lm_head(h)
    mb = packed.select(torch.arange(2))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        chunked(model, mb, 1.0, 4)
