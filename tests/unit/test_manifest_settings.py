"""One mapping from a manifest to the coordinator's ExperimentSettings: `morphml run` and
`morphml master` (the master pod's entrypoint) get the same settings and the same optimizer from
the same manifest, every mapped field comes from the manifest, the seed's MasterNode config takes
the CRD's defaults, and nothing else in the runtime builds ExperimentSettings itself."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from morphml import cli
from morphml.distributed.settings import settings_for_experiment
from morphml.experiment import load_manifest

pytestmark = pytest.mark.unit

RUNTIME = Path(__file__).resolve().parents[2] / "runtime" / "morphml"

# Every field the mapping reads is set to a value that is not its default.
MANIFEST = {
    "apiVersion": "morphml.io/v1alpha1",
    "kind": "NASExperiment",
    "metadata": {"name": "mapped"},
    "spec": {
        "searchSpace": {"layers": [{"type": "dense", "units": [8, 16]}, {"type": "dropout", "rate": [0.0, 0.2]}]},
        "optimizer": {"algorithm": "genetic", "populationSize": 4, "generations": 2, "elitism": 1, "seed": 7},
        "objective": {"metric": "val_loss", "goal": "minimize"},
        "budget": {"maxTrials": 13, "maxFailedTrials": 4},
        "faultTolerance": {"heartbeatIntervalSeconds": 4, "missedHeartbeats": 5, "maxTaskRetries": 1,
                           "maxTaskLosses": 7},
        "evaluation": {"dataset": {"name": "synthetic"}, "epochs": 2},
    },
}


@pytest.fixture
def manifest_file(tmp_path: Path) -> str:
    path = tmp_path / "mapped.yaml"
    path.write_text(yaml.safe_dump(MANIFEST))
    return str(path)


def command_search(argv: list[str]):
    """What the command would serve: its parsed arguments through the CLI's own path."""
    args = cli.build_parser().parse_args(argv)
    return cli.search_from_args(args)


def test_run_and_master_get_identical_settings_and_optimizer_from_one_manifest(manifest_file, tmp_path):
    _, run_optimizer, run_settings = command_search(["run", manifest_file])
    _, master_optimizer, master_settings = command_search(
        ["master", manifest_file, "--journal", str(tmp_path / "j.db")]
    )
    run_fields, master_fields = dataclasses.asdict(run_settings), dataclasses.asdict(master_settings)
    # The one documented difference: a local run's workers are all new processes, so a restarted
    # run holds no leases for old ones; the master pod holds them one heartbeat timeout (None).
    assert run_fields.pop("restart_hold_seconds") == 0
    assert master_fields.pop("restart_hold_seconds") is None
    assert run_fields == master_fields
    # The same optimizer too: same algorithm, settings, space fingerprint and random state.
    assert run_optimizer.state_dict() == master_optimizer.state_dict()
    assert [c.graph.arch_hash for c in run_optimizer.ask(4)] == [c.graph.arch_hash for c in master_optimizer.ask(4)]


def test_run_and_master_apply_the_same_overrides(manifest_file, tmp_path):
    overrides = ["--heartbeat-interval", "0.25", "--missed-heartbeats", "7", "--prefetch", "1"]
    _, _, run_settings = command_search(["run", manifest_file, *overrides])
    _, _, master_settings = command_search(["master", manifest_file, "--journal", str(tmp_path / "j.db"), *overrides])
    for settings in (run_settings, master_settings):
        assert (settings.heartbeat_interval, settings.missed_heartbeats, settings.prefetch) == (0.25, 7, 1)


def test_every_mapped_field_comes_from_the_manifest(manifest_file, tmp_path):
    _, _, settings = command_search(
        ["master", manifest_file, "--journal", str(tmp_path / "j.db"), "--min-workers", "3"]
    )
    assert settings.name == "mapped"
    assert (settings.max_trials, settings.max_failed_trials) == (13, 4)
    assert (settings.heartbeat_interval, settings.missed_heartbeats, settings.max_task_retries) == (4.0, 5, 1)
    assert settings.max_task_losses == 7
    assert (settings.metric, settings.goal) == ("val_loss", "minimize")
    assert settings.seed == 7
    assert settings.evaluation["dataset"] == {"name": "synthetic"} and settings.evaluation["epochs"] == 2
    assert settings.min_workers == 3
    # The library call gives the same as the command with no overrides.
    assert settings_for_experiment(load_manifest(manifest_file), min_workers=3, prefetch=None) == settings


def test_the_seed_master_node_takes_the_crd_defaults(tmp_path):
    from morphml.distributed.master import MasterNode

    minimal = dict(MANIFEST)
    minimal["spec"] = {"searchSpace": MANIFEST["spec"]["searchSpace"], "evaluation": MANIFEST["spec"]["evaluation"]}
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump(minimal))
    experiment, optimizer, manifest_settings = command_search(
        ["master", str(path), "--journal", str(tmp_path / "j.db")]
    )
    node = MasterNode(
        optimizer, {"name": "mapped", "max_trials": experiment.budget.max_trials, "evaluation": experiment.evaluation}
    )
    # Budget, fault tolerance, objective and seed defaults: the CRD's, through the same mapping.
    assert node._settings() == manifest_settings
    # Without max_trials the seed API runs population x generations.
    assert MasterNode(optimizer, {})._settings().max_trials == optimizer.population_size * optimizer.num_generations


def test_nothing_else_in_the_runtime_builds_experiment_settings():
    builders = []
    for path in sorted(RUNTIME.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name == "ExperimentSettings":
                    builders.append(f"{path.relative_to(RUNTIME)}:{node.lineno}")
    assert builders and all(b.startswith("distributed/settings.py:") for b in builders), builders
