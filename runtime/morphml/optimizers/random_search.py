"""Random search: independent samples from the space, never the same architecture twice.

`max_trials` (None: unlimited, the caller's budget decides) bounds the candidates asked.
Candidate ids: "c{k}", k counting asks.

Imports: the standard library, `morphml.space`, `morphml.optimizers.base`.
"""

from __future__ import annotations

from collections.abc import Sequence

from morphml.optimizers.base import Candidate, Optimizer, check_setting, morphml1_call_forms
from morphml.space import SearchSpace


class RandomSearch(Optimizer):
    algorithm = "random"
    setting_names = ("max_trials", "seed", "objective", "goal")

    @morphml1_call_forms
    def __init__(
        self,
        space: SearchSpace,
        seed: int | None = None,
        max_trials: int | None = None,
        objective: str = "val_accuracy",
        goal: str = "maximize",
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(
            space, seed=seed, objective=objective, goal=goal, input_shape=input_shape, num_classes=num_classes
        )
        self.max_trials = None if max_trials is None else check_setting("max_trials", max_trials, "int", 1)

    def _finished(self) -> bool:
        return self.max_trials is not None and self.num_asked >= self.max_trials and not self.outstanding()

    def _propose(self, n: int) -> list[Candidate]:
        proposed: list[Candidate] = []
        while len(proposed) < n and (self.max_trials is None or self.num_asked < self.max_trials):
            graph = self._sample_novel()
            if graph is None:
                if not self.outstanding() and not proposed:
                    self._exhausted = True
                break
            proposed.append(self._register(Candidate(f"c{self.num_asked}", graph, 0)))
        return proposed
