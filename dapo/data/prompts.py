"""Prompts in dispatch order: dataset rows, shuffled per epoch, rendered and tokenised."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dapo.data.dataset import DatasetError, PromptRow, render_prompt
from proto.runspec import DataConfig


@dataclass(frozen=True)
class PromptItem:
    prompt_id: str
    epoch: int
    text: str
    token_ids: np.ndarray  # (P,) int32
    ground_truth: str
    data_source: str


class PromptSource:
    """``item(seq)`` is the seq-th prompt ever dispatched: epoch = seq // N, shuffled per epoch.

    The order depends only on (seed, seq), so a restarted sampler that knows
    how many prompts it dispatched continues exactly where it stopped.
    """

    def __init__(self, rows: list[PromptRow], tokenizer, cfg: DataConfig) -> None:
        if not rows:
            raise ValueError("the training dataset is empty")
        self.rows, self.tokenizer, self.cfg = rows, tokenizer, cfg
        self._encode = lru_cache(maxsize=65536)(self._encode_row)

    def __len__(self) -> int:
        return len(self.rows)

    @lru_cache(maxsize=4)  # noqa: B019 (a handful of epochs alive at once; the source lives as long as the service)
    def order(self, epoch: int) -> np.ndarray:
        n = len(self.rows)
        if not self.cfg.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(n)

    def _encode_row(self, index: int) -> tuple[str, np.ndarray]:
        row = self.rows[index]
        text = render_prompt(
            row,
            self.tokenizer,
            template=self.cfg.prompt_template,
            apply_chat_template=self.cfg.apply_chat_template,
        )
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
        if ids.size > self.cfg.max_prompt_length:
            raise DatasetError(
                f"row {row.index}: prompt is {ids.size} tokens, over data.max_prompt_length "
                f"({self.cfg.max_prompt_length})"
            )
        return text, ids

    def check_all(self) -> None:
        """Render and tokenise every row now, so an over-long prompt stops the run before it
        starts (naming its row) instead of in the middle; the results stay cached."""
        for index in range(len(self.rows)):
            self._encode(index)

    def item(self, seq: int) -> PromptItem:
        epoch, pos = divmod(seq, len(self.rows))
        index = int(self.order(epoch)[pos])
        row = self.rows[index]
        text, ids = self._encode(index)
        return PromptItem(
            prompt_id=f"{row.data_source}:{row.index}",
            epoch=epoch,
            text=text,
            token_ids=ids,
            ground_truth=row.ground_truth,
            data_source=row.data_source,
        )
