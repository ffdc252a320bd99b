"""Generational genetic algorithm: tournament selection, crossover, mutation, elitism.

Generation 0 is `population_size` random architectures. Each later generation is bred only when
every member of the current one has a result (so `ask` returns [] while tells are outstanding):
the `elitism` best members are carried over unchanged (their results reused, not re-trained),
the rest are children: two tournament winners crossed over with probability `crossover_rate`
(else a copy of the first), then mutated gene by gene: each layer of the child is, with
probability `mutation_rate`, the occasion for one mutation (a parameter, a layer or a skip
connection; see `morphml.mutation.mutate`), so a child of L layers gets L x mutation_rate mutations
on average (the CRD's "probability that each gene of a child is mutated"). A child whose
architecture was already evaluated or is in flight is mutated again (up to a bound) so the budget
goes to new architectures; if it stays a duplicate it joins the population with the reused result.
`num_generations` counts generation 0, so at most population_size * num_generations trials.

Candidate ids: "g{generation}-c{k}", k counting the new candidates of that generation.

Imports: the standard library, `morphml.space`, `morphml.graph`, `morphml.mutation`,
`morphml.optimizers.base`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from morphml.graph import ArchitectureGraph
from morphml.mutation import crossover, mutate
from morphml.optimizers.base import (
    NOVELTY_ATTEMPTS,
    Candidate,
    Optimizer,
    OptimizerError,
    check_setting,
    morphml1_call_forms,
)
from morphml.space import SearchSpace


class GeneticAlgorithm(Optimizer):
    algorithm = "genetic"
    setting_names = (
        "population_size",
        "num_generations",
        "mutation_rate",
        "crossover_rate",
        "elitism",
        "tournament_size",
        "seed",
        "objective",
        "goal",
    )

    @morphml1_call_forms
    def __init__(
        self,
        space: SearchSpace,
        population_size: int = 50,
        num_generations: int = 10,
        mutation_rate: float = 0.2,
        crossover_rate: float = 0.5,
        elitism: int = 2,
        tournament_size: int = 3,
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
        self.num_generations = check_setting("num_generations", num_generations, "int", 1)
        self.mutation_rate = check_setting("mutation_rate", mutation_rate, "number", 0, 1)
        self.crossover_rate = check_setting("crossover_rate", crossover_rate, "number", 0, 1)
        self.elitism = check_setting("elitism", elitism, "int", 0)
        if elitism >= population_size:
            raise OptimizerError(
                f"elitism: {elitism} is not allowed; expected 0 <= elitism < population_size ({population_size})"
            )
        self.tournament_size = check_setting("tournament_size", tournament_size, "int", 1)
        # Current generation: index, member architectures (arch hashes, duplicates allowed), and
        # the ids of its new candidates not yet handed out by ask().
        self.generation = -1
        self._members: list[str] = []
        self._queue: list[str] = []

    # -- ask/tell hooks ---------------------------------------------------------------------

    def _propose(self, n: int) -> list[Candidate]:
        self._advance()
        handed = [self._candidates[i] for i in self._queue[:n]]
        del self._queue[:n]
        for candidate in handed:
            self._status[candidate.id] = "pending"
        return handed

    def _on_result(self, candidate_id: str) -> None:
        self._advance()

    def _generation_complete(self) -> bool:
        return not self._queue and all(self._status[self._by_hash[h]] in ("done", "failed") for h in self._members)

    def _finished(self) -> bool:
        return self.generation >= self.num_generations - 1 and self._generation_complete()

    def _advance(self) -> None:
        """Breed generation 0 on first use, and the next one whenever the current is complete."""
        if self.generation < 0:
            self._breed_initial()
        while self.generation < self.num_generations - 1 and self._generation_complete() and not self._exhausted:
            self._breed_next()

    # -- breeding ---------------------------------------------------------------------------

    def _add_member(
        self,
        graph: ArchitectureGraph,
        parents: tuple[str, ...],
        generation: int,
        members: list[str],
        queue: list[str],
    ) -> None:
        if self._known(graph) is None:
            candidate = Candidate(f"g{generation}-c{len(queue)}", graph, generation, parents)
            self._register(candidate, queued=True)
            queue.append(candidate.id)
        members.append(graph.arch_hash)

    def _install(self, generation: int, members: list[str], queue: list[str]) -> None:
        self.generation, self._members, self._queue = generation, members, queue

    def _breed_initial(self) -> None:
        members: list[str] = []
        queue: list[str] = []
        for _ in range(self.population_size):
            graph = self._sample_novel(avoid=())
            if graph is None:
                # The space is (nearly) exhausted: reuse a known architecture as a member.
                graph = self.space.sample(self.rng)
            self._add_member(graph, (), 0, members, queue)
        self._install(0, members, queue)

    def _tournament(self, pool: list[str]) -> str:
        """Arch hash of a tournament winner among ``pool`` (ties go to the lower index)."""
        size = min(self.tournament_size, len(pool))
        entrants = sorted(self.rng.sample(range(len(pool)), size))
        return pool[max(entrants, key=lambda i: (self._sort_key(self._by_hash[pool[i]]), -i))]

    def _breed_next(self) -> None:
        previous = list(self._members)
        ranked = sorted(range(len(previous)), key=lambda i: (-self._sort_key(self._by_hash[previous[i]]), i))
        generation = self.generation + 1
        members = [previous[i] for i in ranked[: self.elitism]]
        queue: list[str] = []
        while len(members) < self.population_size:
            first = self._tournament(previous)
            second = self._tournament(previous) if self.rng.random() < self.crossover_rate else None
            first_graph = self._candidates[self._by_hash[first]].graph
            parents: tuple[str, ...] = (self._by_hash[first],)
            if second is not None and second != first:
                child = crossover(first_graph, self._candidates[self._by_hash[second]].graph, self.rng)
                parents += (self._by_hash[second],)
            else:
                child = first_graph
            genes = sum(1 for node in child.nodes if node.op not in ("input", "output", "add", "concat"))
            for _ in range(sum(1 for _ in range(max(genes, 1)) if self.rng.random() < self.mutation_rate)):
                child = mutate(child, self.space, self.rng)
            for _ in range(NOVELTY_ATTEMPTS):
                if self._known(child) is None:
                    break
                child = mutate(child, self.space, self.rng)
            self._add_member(child, parents, generation, members, queue)
        self._install(generation, members, queue)

    # -- state ------------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {"generation": self.generation, "members": list(self._members), "queue": list(self._queue)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.generation = int(state["generation"])
        self._members = list(state["members"])
        self._queue = list(state["queue"])
