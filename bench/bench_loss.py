"""Cost of the DAPO loss relative to a plain masked-mean cross-entropy.

Both measurements start from the same leaf logits (B, T, V) = (8, 512, 4096),
float32, and run forward + backward: the DAPO side gathers token log-probs,
then the token-mean loss with Clip-Higher and dual clip (c = 10) and its
metrics; the baseline is masked-mean cross-entropy. The gather dominates both,
so the ratio shows the overhead of the DAPO-specific per-token work.

Figures: ``loss.step_ms`` (median DAPO forward + backward, milliseconds) and
``loss.step_ratio`` (its median over the baseline's median; goal <= 1.1).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dapo.algorithm.loss import loss_normalizer, policy_loss, token_log_probs
from proto.runspec import ActorConfig

B, T, V = 8, 512, 4096
REPEATS = 9


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()  # (B, T)
    with torch.no_grad():
        logp_old = token_log_probs(logits, tokens) + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return {"logits": logits, "tokens": tokens, "mask": mask, "logp_old": logp_old, "adv": adv}


def _dapo_step(x: dict[str, torch.Tensor], cfg: ActorConfig, norm: float) -> None:
    logits = x["logits"].detach().requires_grad_()
    logp = token_log_probs(logits, x["tokens"])  # (B, T)
    loss, _ = policy_loss(logp, x["logp_old"], x["adv"], x["mask"], cfg, normalizer=norm)
    loss.backward()


def _ce_step(x: dict[str, torch.Tensor]) -> None:
    logits = x["logits"].detach().requires_grad_()
    nll = F.cross_entropy(logits.reshape(B * T, V), x["tokens"].reshape(B * T), reduction="none")
    mask = x["mask"].reshape(B * T)
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run() -> dict[str, float]:
    torch.set_num_threads(2)
    x = _inputs()
    cfg = ActorConfig(loss_agg_mode="token-mean", clip_ratio_c=10.0)
    norm = loss_normalizer(x["mask"], cfg.loss_agg_mode)
    dapo, base = [], []
    for i in range(REPEATS + 2):
        # interleaved, so drift in machine load hits both sides alike
        d = _time(lambda: _dapo_step(x, cfg, norm))
        c = _time(lambda: _ce_step(x))
        if i >= 2:  # the first rounds warm up allocator and kernels
            dapo.append(d)
            base.append(c)
    dapo_ms = statistics.median(dapo) * 1e3
    base_ms = statistics.median(base) * 1e3
    return {"loss.step_ms": dapo_ms, "loss.step_ratio": dapo_ms / base_ms}


if __name__ == "__main__":
    print(run())
