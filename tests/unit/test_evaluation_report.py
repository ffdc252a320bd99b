"""Progress reports out of evaluate_architecture: the built-in trainer reports each epoch and
stops when told; a custom evaluator gets report() only if its signature takes it."""

from __future__ import annotations

import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from morphml.evaluation import ReportDecision, TrialFailure, evaluate_architecture  # noqa: E402
from morphml.evaluation.evaluate import takes_report  # noqa: E402

pytestmark = pytest.mark.unit

SPEC = {"dataset": {"name": "synthetic", "shape": [16], "classes": 4, "size": 400}, "epochs": 4, "batchSize": 32}
MLP = {"input_shape": [16], "num_classes": 4,
       "nodes": [{"id": "in", "op": "input", "params": {}},
                 {"id": "fc", "op": "dense", "params": {"units": 32, "activation": "relu"}},
                 {"id": "out", "op": "output", "params": {"units": 4}}],
       "edges": [["in", "fc"], ["fc", "out"]]}


@pytest.mark.timeout(60)
def test_builtin_trainer_reports_each_epoch_and_a_stop_ends_training_there():
    torch.set_num_threads(1)
    seen = []
    full = evaluate_architecture(MLP, SPEC, device="cpu", seed=3,
                                 progress=lambda step, m: seen.append((step, m)) or False)
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    assert all(set(m) == {"epoch", "val_accuracy", "val_loss", "train_loss", "seconds"} for _, m in seen)
    # reporting validates each epoch but changes nothing in training: the same metrics as without it
    plain = evaluate_architecture(MLP, SPEC, device="cpu", seed=3)
    last = seen[-1][1]
    assert (plain["val_accuracy"], plain["val_loss"], plain["epochs"]) == \
        (full["val_accuracy"], full["val_loss"], full["epochs"]) == (last["val_accuracy"], last["val_loss"], 4)
    stopped = evaluate_architecture(MLP, SPEC, device="cpu", seed=3, progress=lambda step, m: step == 2)
    assert stopped["epochs"] == 2 and stopped["val_accuracy"] == seen[1][1]["val_accuracy"]


def test_signature_decides_whether_an_evaluator_gets_report():
    def three(a, s, d): ...
    def four(a, s, d, report): ...
    def keyword(a, s, d, *, report=None): ...
    def star(*args): ...
    assert (takes_report(three), takes_report(four), takes_report(keyword), takes_report(star)) == \
        (False, True, True, True)


def test_custom_evaluators_old_and_new(tmp_path, monkeypatch):
    (tmp_path / "my_evals.py").write_text(textwrap.dedent("""
        def old(arch, spec, device):
            return {"val_accuracy": 0.5}

        def new(arch, spec, device, report):
            for step in range(1, 6):
                if report(step, {"val_accuracy": step / 10}) == "stop":
                    return {"val_accuracy": step / 10, "epochs": step}
            return {"val_accuracy": 0.5, "epochs": 5}

        def bad_step(arch, spec, device, report):
            report(0, {})
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_evals", raising=False)
    calls = []
    assert evaluate_architecture(MLP, {"evaluator": "my_evals:old"}, progress=lambda *a: calls.append(a)) == \
        {"val_accuracy": 0.5} and calls == []
    assert evaluate_architecture(MLP, {"evaluator": "my_evals:new"}) == {"val_accuracy": 0.5, "epochs": 5}
    assert evaluate_architecture(MLP, {"evaluator": "my_evals:new"}, progress=lambda step, m: step == 3) == \
        {"val_accuracy": 0.3, "epochs": 3}
    assert ReportDecision.STOP == "stop"
    with pytest.raises(TrialFailure, match=r"report\(step=0, \.\.\.\): step must be an integer >= 1"):
        evaluate_architecture(MLP, {"evaluator": "my_evals:bad_step"})
