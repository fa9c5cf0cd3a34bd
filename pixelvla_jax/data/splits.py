"""Held-out episodes: split a step source by episode, so validation never sees training
episodes (steps of one episode are near-duplicates, a step-level split would leak)."""

from __future__ import annotations

from typing import Any

import numpy as np


class EpisodeSubset:
    """The steps of every `every`-th episode (held_out=True) or of all others (False).

    Wraps a StepDataset-like source (`len`, `[i]`, `.index.step_episode`, `.statistics()`);
    statistics stay those of the whole dataset, so train and validation normalise alike.
    """

    def __init__(self, source: Any, every: int, held_out: bool):
        if every < 2:
            raise ValueError(f"hold out every k-th episode needs k >= 2, got {every}")
        step_episode = np.asarray(source.index.step_episode)
        chosen = step_episode % every == every - 1
        self.indices = np.nonzero(chosen if held_out else ~chosen)[0]
        if len(self.indices) == 0:
            num_episodes = int(step_episode.max()) + 1 if len(step_episode) else 0
            raise ValueError(
                f"holding out every {every}-th episode of {source.dataset_name!r} "
                f"({num_episodes} episodes) leaves no {'validation' if held_out else 'training'} "
                "steps; change config.train.holdout_every."
            )
        self.source = source
        self.dataset_name = source.dataset_name

    def statistics(self) -> dict:
        return self.source.statistics()

    def __len__(self) -> int:
        return int(len(self.indices))

    def __getitem__(self, i: int) -> dict:
        return self.source[int(self.indices[int(i)])]
