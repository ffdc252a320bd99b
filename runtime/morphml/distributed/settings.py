"""The one mapping from what a NASExperiment says to the coordinator's `ExperimentSettings`.

`experiment_settings(...)` is the only place that turns manifest values (budget, fault tolerance,
objective, evaluation, optimizer seed) into `ExperimentSettings`, and the only place that applies
the run-time overrides a command line or a test may add (sub-second heartbeats, restart hold,
minimum workers, prefetch). Its callers only gather inputs:

- `settings_for_experiment(experiment, ...)`: a loaded manifest (`morphml run` and
  `morphml master` both come through here, via `morphml.cli.search_from_args`);
- `settings_for_master_config(config, optimizer, ...)`: the seed's `MasterNode(optimizer, {...})`
  dict (snake_case keys), whose missing keys take the same defaults the CRD gives a manifest
  (the `Budget` / `FaultTolerance` / `Objective` dataclasses of `morphml.experiment`).

Imports: the standard library, `morphml.experiment` (the typed views of a manifest) and
`morphml.distributed.coordinator` (`ExperimentSettings`). No grpc, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from morphml.distributed.checkpoints import ArtifactSettings
from morphml.distributed.coordinator import DEFAULT_EPOCHS, ExperimentSettings
from morphml.distributed.schedulers import EarlyStoppingSettings
from morphml.experiment import Budget, Experiment, FaultTolerance, Objective

# What a MasterNode runs when neither `max_trials` nor the optimizer's population and
# generations say how many trials.
MASTER_NODE_DEFAULT_MAX_TRIALS = 100


def experiment_settings(
    *,
    name: str,
    budget: Budget,
    fault_tolerance: FaultTolerance,
    objective: Objective,
    evaluation: Mapping[str, Any],
    seed: int | None,
    heartbeat_interval: float | None = None,
    missed_heartbeats: int | None = None,
    restart_hold_seconds: float | None = None,
    min_workers: int = 0,
    prefetch: int | None = 0,
    early_stopping: Mapping[str, Any] | None = None,
    artifacts: Mapping[str, Any] | None = None,
) -> ExperimentSettings:
    """`ExperimentSettings` for one experiment.

    ``early_stopping``: spec.earlyStopping (None or absent: type none); its minResource and
    maxResource are checked against ``evaluation``'s epochs. ``artifacts``: spec.artifacts (None:
    the defaults). ``budget.max_epochs``: spec.budget.maxEpochs (None: no limit).

    ``heartbeat_interval`` / ``missed_heartbeats``: None (or 0) keeps ``fault_tolerance``'s; a value
    overrides it (sub-second intervals are for tests and benchmarks: the CRD takes whole seconds).
    ``seed``: the optimizer's seed, None meaning 0 (the seed trials are trained with).
    """
    return ExperimentSettings(
        name=name,
        max_trials=budget.max_trials,
        max_failed_trials=budget.max_failed_trials,
        max_task_retries=fault_tolerance.max_task_retries,
        max_task_losses=fault_tolerance.max_task_losses,
        heartbeat_interval=float(heartbeat_interval or fault_tolerance.heartbeat_interval_seconds),
        missed_heartbeats=int(missed_heartbeats or fault_tolerance.missed_heartbeats),
        evaluation=dict(evaluation),
        metric=objective.metric,
        goal=objective.goal,
        seed=int(seed or 0),
        restart_hold_seconds=restart_hold_seconds,
        min_workers=min_workers,
        prefetch=prefetch,
        early_stopping=EarlyStoppingSettings.from_spec(early_stopping,
                                                       epochs=int(evaluation.get("epochs", DEFAULT_EPOCHS))),
        artifacts=ArtifactSettings.from_spec(artifacts),
        max_epochs=budget.max_epochs,
    )


def settings_for_experiment(
    experiment: Experiment,
    *,
    heartbeat_interval: float | None = None,
    missed_heartbeats: int | None = None,
    restart_hold_seconds: float | None = None,
    min_workers: int = 0,
    prefetch: int | None = 0,
) -> ExperimentSettings:
    """`ExperimentSettings` for a loaded manifest, with the command's run-time overrides."""
    return experiment_settings(
        name=experiment.name,
        budget=experiment.budget,
        fault_tolerance=experiment.fault_tolerance,
        objective=experiment.objective,
        evaluation=experiment.evaluation,
        seed=experiment.optimizer_spec.get("seed"),
        heartbeat_interval=heartbeat_interval,
        missed_heartbeats=missed_heartbeats,
        restart_hold_seconds=restart_hold_seconds,
        min_workers=min_workers,
        prefetch=prefetch,
        early_stopping=experiment.spec.get("earlyStopping"),
        artifacts=experiment.spec.get("artifacts"),
    )


def settings_for_master_config(
    config: Mapping[str, Any], optimizer: Any, num_generations: int | None = None
) -> ExperimentSettings:
    """`ExperimentSettings` for the seed's `MasterNode(optimizer, config)`.

    Keys (all optional): name, max_trials (default population_size x num_generations when the
    optimizer has them, else 100), max_failed_trials, max_task_retries, max_task_losses, heartbeat_interval,
    missed_heartbeats, evaluation, metric, goal, seed, num_workers (= min_workers), prefetch,
    early_stopping (spec.earlyStopping's camelCase object), artifacts (spec.artifacts'), max_epochs.
    """
    max_trials = config.get("max_trials")
    if max_trials is None:
        population = getattr(optimizer, "population_size", None)
        generations = num_generations or getattr(optimizer, "num_generations", None)
        max_trials = population * generations if population and generations else MASTER_NODE_DEFAULT_MAX_TRIALS
    budget, faults, objective = Budget(), FaultTolerance(), Objective()
    return experiment_settings(
        name=config.get("name", "experiment"),
        budget=Budget(
            max_trials=int(max_trials),
            max_failed_trials=int(config.get("max_failed_trials", budget.max_failed_trials)),
            max_epochs=config.get("max_epochs"),
        ),
        fault_tolerance=FaultTolerance(
            heartbeat_interval_seconds=faults.heartbeat_interval_seconds,
            missed_heartbeats=faults.missed_heartbeats,
            max_task_retries=int(config.get("max_task_retries", faults.max_task_retries)),
            max_task_losses=int(config.get("max_task_losses", faults.max_task_losses)),
        ),
        objective=Objective(metric=config.get("metric", objective.metric), goal=config.get("goal", objective.goal)),
        evaluation=dict(config.get("evaluation", {})),
        seed=config.get("seed"),
        heartbeat_interval=config.get("heartbeat_interval"),
        missed_heartbeats=config.get("missed_heartbeats"),
        min_workers=int(config.get("num_workers", 0)),
        prefetch=config.get("prefetch"),
        early_stopping=config.get("early_stopping"),
        artifacts=config.get("artifacts"),
    )
