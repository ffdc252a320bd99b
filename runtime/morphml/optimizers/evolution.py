"""Regularized (aging) evolution (Real et al., 2019), steady state and asynchronous.

The first `population_size` candidates are random. After that, each ask draws `sample_size`
members of the population at random, takes the best as parent, and proposes a mutation of it
(mutated again while it is a duplicate of an evaluated or in-flight architecture). Each result
joins the population at the young end; beyond `population_size` the OLDEST member leaves, however
good it is (the "aging" that regularizes the search). Children can be proposed as soon as one
result is in, so workers are not idle while the first population is still training; with nothing
told yet and the random phase done, ask returns [] (wait).

`max_trials` (None: unlimited, the caller's budget decides) bounds the candidates asked.
Candidate ids: "c{k}", k counting asks; generation = 0 for random ones, parent's + 1 for children.

Imports: the standard library, `morphml.space`, `morphml.mutation`, `morphml.optimizers.base`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from morphml.mutation import mutate
from morphml.optimizers.base import NOVELTY_ATTEMPTS, Candidate, Optimizer, check_setting, morphml1_call_forms
from morphml.space import SearchSpace


class RegularizedEvolution(Optimizer):
    algorithm = "regularizedEvolution"
    setting_names: tuple[str, ...] = ("population_size", "sample_size", "max_trials", "seed", "objective", "goal")

    @morphml1_call_forms
    def __init__(
        self,
        space: SearchSpace,
        population_size: int = 50,
        sample_size: int = 10,
        max_trials: int | None = None,
        seed: int | None = None,
        objective: str = "val_accuracy",
        goal: str = "maximize",
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(
            space, seed=seed, objective=objective, goal=goal, input_shape=input_shape, num_classes=num_classes
        )
        self.population_size = check_setting("population_size", population_size, "int", 1)
        self.sample_size = check_setting("sample_size", sample_size, "int", 1)
        self.max_trials = None if max_trials is None else check_setting("max_trials", max_trials, "int", 1)
        # Ids of told candidates currently alive, oldest first.
        self._population: list[str] = []

    def _finished(self) -> bool:
        return self.max_trials is not None and self.num_asked >= self.max_trials and not self.outstanding()

    def _room(self) -> int | None:
        return None if self.max_trials is None else self.max_trials - self.num_asked

    def _propose(self, n: int) -> list[Candidate]:
        proposed: list[Candidate] = []
        parents: tuple[str, ...]
        while len(proposed) < n:
            room = self._room()
            if room is not None and room <= 0:
                break
            if self.num_asked < self.population_size:
                graph = self._sample_novel()
                generation, parents = 0, ()
            elif self._population:
                size = min(self.sample_size, len(self._population))
                contenders = sorted(self.rng.sample(range(len(self._population)), size))
                parent_id = self._select_parent(contenders)
                parent = self._candidates[parent_id]
                graph = mutate(parent.graph, self.space, self.rng)
                for _ in range(NOVELTY_ATTEMPTS):
                    if self._known(graph) is None:
                        break
                    graph = mutate(graph, self.space, self.rng)
                generation, parents = parent.generation + 1, (parent_id,)
                if self._known(graph) is not None:
                    # The parent's neighbourhood is used up; explore elsewhere instead.
                    graph = self._sample_novel()
                    generation, parents = 0, ()
            else:
                break  # wait: nothing told yet to breed from
            if graph is None or self._known(graph) is not None:
                if not self.outstanding() and not proposed:
                    # Nothing new found and nothing to wait for: the reachable space is used up.
                    self._exhausted = True
                break
            candidate = Candidate(f"c{self.num_asked}", graph, generation, parents)
            proposed.append(self._register(candidate))
        return proposed

    def _select_parent(self, contenders: Sequence[int]) -> str:
        """The parent among the sampled population positions: the fittest, the oldest on a tie
        (MultiObjectiveEvolution ranks by Pareto front instead)."""
        return self._population[max(contenders, key=lambda i: (self._sort_key(self._population[i]), -i))]

    def _on_result(self, candidate_id: str) -> None:
        self._population.append(candidate_id)
        if len(self._population) > self.population_size:
            self._population.pop(0)

    def _extra_state(self) -> dict[str, Any]:
        return {"population": list(self._population)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._population = list(state["population"])
