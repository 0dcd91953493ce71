"""From a training batch message to padded tensors, mini-batches and micro-batches.

Layout: each sample is ``prompt_ids + response_ids``, right-padded to S. The
response of row i starts at position ``P_i``; its token t is predicted by the
logits at position ``P_i - 1 + t``, which ``resp_pos`` (B, T) records so the
learner can gather exactly the response log-probs, T being the longest
response of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dapo.algorithm.advantages import group_advantages
from proto.messages import TrainingBatch


@dataclass
class PackedSamples:
    input_ids: torch.Tensor  # (B, S) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, S) long
    resp_pos: torch.Tensor  # (B, T) long: logits position predicting response token t
    resp_ids: torch.Tensor  # (B, T) long: response tokens (0 where masked)
    mask: torch.Tensor  # (B, T) float: 1 for response tokens that count (real ones at first)
    old_logp_rollout: torch.Tensor  # (B, T) float: behaviour log-probs recorded at rollout
    versions: torch.Tensor  # (B, T) long: policy version that generated each response token
    advantages: torch.Tensor  # (B,) float
    truncated: torch.Tensor  # (B,) bool
    lengths: torch.Tensor  # (B,) long: response length (the mask may have holes: rejection)
    group_index: torch.Tensor  # (B,) long: which group (prompt) each row belongs to

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | slice) -> PackedSamples:
        """Rows of every tensor, trimmed to the longest sequence/response among them."""
        sub = {k: getattr(self, k)[rows] for k in self.__dataclass_fields__}
        s = int(sub["attention_mask"].sum(1).max())
        t = max(int(sub["lengths"].max()) if sub["lengths"].numel() else 0, 1)
        for k in ("input_ids", "attention_mask"):
            sub[k] = sub[k][:, :s]
        for k in ("resp_pos", "resp_ids", "mask", "old_logp_rollout", "versions"):
            sub[k] = sub[k][:, :t]
        return PackedSamples(**sub)

    def to(self, device: str | torch.device) -> PackedSamples:
        return PackedSamples(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


def pack_batch(batch: TrainingBatch, pad_id: int, norm_adv_by_std: bool) -> PackedSamples:
    """All samples of all groups, in group order (rows g*G .. g*G+G-1 are group g)."""
    rows, advs, group_idx = [], [], []
    for gi, group in enumerate(batch.groups):
        scores = torch.tensor([[s.score for s in group.samples]], dtype=torch.float64)
        adv = group_advantages(scores, norm_by_std=norm_adv_by_std)[0]  # (G,)
        for si, sample in enumerate(group.samples):
            rows.append((group.prompt_ids, sample))
            advs.append(float(adv[si]))
            group_idx.append(gi)
    b = len(rows)
    s_len = max(p.size + smp.response_ids.size for p, smp in rows)
    t_len = max(smp.response_ids.size for _, smp in rows)
    input_ids = torch.full((b, s_len), pad_id, dtype=torch.long)
    attn = torch.zeros((b, s_len), dtype=torch.long)
    resp_pos = torch.zeros((b, t_len), dtype=torch.long)
    resp_ids = torch.zeros((b, t_len), dtype=torch.long)
    mask = torch.zeros((b, t_len), dtype=torch.float32)
    old = torch.zeros((b, t_len), dtype=torch.float32)
    versions = torch.zeros((b, t_len), dtype=torch.long)
    truncated = torch.zeros(b, dtype=torch.bool)
    lengths = torch.zeros(b, dtype=torch.long)
    for i, (prompt, sample) in enumerate(rows):
        p, n = prompt.size, sample.response_ids.size
        input_ids[i, :p] = torch.from_numpy(prompt.astype("int64"))
        input_ids[i, p : p + n] = torch.from_numpy(sample.response_ids.astype("int64"))
        attn[i, : p + n] = 1
        resp_pos[i, :n] = torch.arange(p - 1, p - 1 + n)
        resp_ids[i, :n] = input_ids[i, p : p + n]
        mask[i, :n] = 1.0
        old[i, :n] = torch.from_numpy(sample.logprobs.astype("float32"))
        versions[i, :n] = torch.from_numpy(sample.token_versions())
        truncated[i] = sample.finish_reason == "length"
        lengths[i] = n
    return PackedSamples(
        input_ids,
        attn,
        resp_pos,
        resp_ids,
        mask,
        old,
        versions,
        torch.tensor(advs, dtype=torch.float32),
        truncated,
        lengths,
        torch.tensor(group_idx),
    )


def mini_batches(packed: PackedSamples, groups_per_mini: int) -> list[torch.Tensor]:
    """Row indices of each mini-batch: ``groups_per_mini`` whole groups each."""
    n_groups = int(packed.group_index.max()) + 1
    out = []
    for start in range(0, n_groups, groups_per_mini):
        sel = (packed.group_index >= start) & (packed.group_index < start + groups_per_mini)
        out.append(torch.nonzero(sel).flatten())
    return out


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[i : i + size] for i in range(0, rows.numel(), size)]
