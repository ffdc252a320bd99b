"""evaluate_architecture end to end on real data: training reaches a useful accuracy, results are
reproducible, and every failure leaves as TrialFailure with the right kind (nan, timeout, invalid,
exception) and a message naming the field."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from morphml.evaluation import (  # noqa: E402
    EvaluationSpecError,
    TrialFailure,
    evaluate_architecture,
    load_user_evaluator,
    training_settings,
)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def small_cnn(input_shape=(1, 8, 8), num_classes=10):
    nodes = [
        {"id": "in", "op": "input", "params": {}},
        {"id": "conv", "op": "conv2d", "params": {"filters": 16, "kernel_size": 3, "stride": 1, "activation": "relu"}},
        {"id": "pool", "op": "maxpool", "params": {"pool_size": 2}},
        {"id": "flat", "op": "flatten", "params": {}},
        {"id": "fc", "op": "dense", "params": {"units": 64, "activation": "relu"}},
        {"id": "out", "op": "output", "params": {"units": num_classes}},
    ]
    edges = [["in", "conv"], ["conv", "pool"], ["pool", "flat"], ["flat", "fc"], ["fc", "out"]]
    return {"input_shape": list(input_shape), "num_classes": num_classes, "nodes": nodes, "edges": edges}


def mlp(features, num_classes):
    return {
        "input_shape": [features], "num_classes": num_classes,
        "nodes": [{"id": "in", "op": "input", "params": {}},
                  {"id": "fc", "op": "dense", "params": {"units": 32, "activation": "relu"}},
                  {"id": "out", "op": "output", "params": {"units": num_classes}}],
        "edges": [["in", "fc"], ["fc", "out"]],
    }


DIGITS = {"dataset": {"name": "digits"}, "epochs": 6, "batchSize": 64, "learningRate": 0.005, "optimizer": "adam"}


@pytest.mark.timeout(60)
def test_small_cnn_learns_digits_to_90_percent_with_all_metrics():
    metrics = evaluate_architecture(small_cnn(), DIGITS, device="cpu", seed=0)
    assert metrics["val_accuracy"] >= 0.9
    assert metrics["epochs"] == 6
    assert metrics["device"] == "cpu"
    assert metrics["params"] == 16 * 9 + 16 + (16 * 4 * 4) * 64 + 64 + 64 * 10 + 10
    assert metrics["flops"] > 0
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] > 0
    assert 0 < metrics["train_seconds"] < 60


@pytest.mark.timeout(60)
def test_same_seed_gives_the_same_metrics_and_another_seed_differs():
    spec = {"dataset": {"name": "synthetic", "shape": [16], "classes": 4, "size": 400}, "epochs": 2, "batchSize": 32}
    first = evaluate_architecture(mlp(16, 4), spec, device="cpu", seed=3)
    second = evaluate_architecture(mlp(16, 4), spec, device="cpu", seed=3)
    other = evaluate_architecture(mlp(16, 4), spec, device="cpu", seed=4)
    assert first["val_loss"] == second["val_loss"] and first["val_accuracy"] == second["val_accuracy"]
    assert other["val_loss"] != first["val_loss"]


@pytest.mark.timeout(60)
def test_synthetic_data_is_learnable_quickly_with_sgd():
    spec = {"dataset": {"name": "synthetic", "shape": [1, 6, 6], "classes": 5, "size": 500, "seed": 0},
            "epochs": 3, "batchSize": 32, "learningRate": 0.05, "optimizer": "sgd", "weightDecay": 1e-4}
    metrics = evaluate_architecture(small_cnn((1, 6, 6), 5), spec, device="cpu")
    assert metrics["val_accuracy"] >= 0.8


@pytest.mark.timeout(60)
def test_exploding_learning_rate_is_a_nan_failure():
    spec = {**DIGITS, "learningRate": 1e10, "optimizer": "sgd", "epochs": 3}
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), spec, device="cpu")
    assert info.value.kind == "nan"
    assert "learningRate" in info.value.message


@pytest.mark.timeout(60)
def test_trial_past_its_timeout_stops_between_batches():
    spec = {"dataset": {"name": "synthetic", "shape": [16], "classes": 4, "size": 4000},
            "epochs": 10000, "batchSize": 8, "timeoutSeconds": 0.5}
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(mlp(16, 4), spec, device="cpu")
    assert info.value.kind == "timeout"
    assert "timeoutSeconds=0.5" in info.value.message


def test_invalid_graph_is_an_invalid_failure_before_any_training():
    arch = small_cnn()
    arch["nodes"][2]["params"]["pool_size"] = 9
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(arch, DIGITS, device="cpu")
    assert info.value.kind == "invalid"
    assert "node pool (maxpool): pool_size 9 on a 8x8 input shrinks a dimension below 1" in info.value.message


def test_graph_for_another_dataset_shape_is_invalid():
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn((3, 8, 8)), DIGITS, device="cpu")
    assert info.value.kind == "invalid"
    assert "input_shape [3, 8, 8]" in info.value.message and "[1, 8, 8]" in info.value.message


def test_bad_dataset_in_a_trial_is_invalid_naming_the_field():
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), {**DIGITS, "dataset": {"name": "npz", "path": "/missing.npz"}})
    assert info.value.kind == "invalid"
    assert info.value.message.startswith("spec.evaluation.dataset.path:")


def test_cuda_device_requested_without_cuda_is_invalid():
    if torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # one past the last visible device
    else:
        device = "cuda:0"
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), {**DIGITS, "epochs": 1}, device=device)
    assert info.value.kind == "invalid"
    assert repr(device) in info.value.message


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("epochs", 0, "must be an integer >= 1"),
        ("epochs", 2.5, "must be an integer >= 1"),
        ("batchSize", -1, "must be an integer >= 1"),
        ("learningRate", 0, "must be > 0"),
        ("learningRate", "fast", "must be a finite number"),
        ("optimizer", "rmsprop", "'rmsprop' is not one of adam, sgd"),
        ("weightDecay", -0.1, "must be >= 0"),
        ("timeoutSeconds", 0, "must be > 0"),
    ],
)
def test_bad_trainer_setting_names_the_field(field, value, words):
    with pytest.raises(EvaluationSpecError) as info:
        training_settings({field: value})
    assert str(info.value).startswith(f"spec.evaluation.{field}:")
    assert words in str(info.value)
    with pytest.raises(TrialFailure, match=f"spec.evaluation.{field}"):
        evaluate_architecture(small_cnn(), {**DIGITS, field: value}, device="cpu")


def test_defaults_fill_missing_trainer_settings():
    settings = training_settings({})
    assert (settings.epochs, settings.batch_size, settings.optimizer) == (5, 64, "adam")


# --- user evaluators -------------------------------------------------------------------------

USER_MODULE = '''
import math

calls = []

def good(arch_json, evaluation_spec, device):
    calls.append(device)
    return {"val_accuracy": len(arch_json["nodes"]) / 100, "custom": evaluation_spec["custom"]}

def nan_metric(arch_json, evaluation_spec, device):
    return {"val_accuracy": math.nan}

def not_a_dict(arch_json, evaluation_spec, device):
    return 0.5

def broken(arch_json, evaluation_spec, device):
    raise KeyError("no such layer")

class Trainer:
    @staticmethod
    def run(arch_json, evaluation_spec, device):
        return {"val_accuracy": 0.5}

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "b2_user_evaluators.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "b2_user_evaluators"
    sys.modules.pop("b2_user_evaluators", None)


def test_user_evaluator_gets_arch_json_spec_and_device(user_module):
    spec = {"evaluator": f"{user_module}:good", "custom": 7}
    metrics = evaluate_architecture(small_cnn(), spec, device="cuda:3")
    assert metrics == {"val_accuracy": 0.06, "custom": 7}
    assert sys.modules[user_module].calls == ["cuda:3"]


def test_user_evaluator_dotted_attribute(user_module):
    assert evaluate_architecture(small_cnn(), {"evaluator": f"{user_module}:Trainer.run"}) == {"val_accuracy": 0.5}


def test_user_evaluator_nan_metric_is_a_nan_failure(user_module):
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), {"evaluator": f"{user_module}:nan_metric"})
    assert info.value.kind == "nan" and "val_accuracy=nan" in info.value.message


def test_user_evaluator_exception_and_bad_return_are_exception_failures(user_module):
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), {"evaluator": f"{user_module}:broken"})
    assert info.value.kind == "exception"
    assert "KeyError: 'no such layer'" in info.value.message and "in broken" in info.value.message
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), {"evaluator": f"{user_module}:not_a_dict"})
    assert info.value.kind == "exception" and "returned float, expected a dict" in info.value.message


@pytest.mark.parametrize(
    "path,words",
    [
        ("no_colon_here", "must look like 'module:function'"),
        ("a:b:c", "must look like 'module:function'"),
        ("b2_no_such_module_xyz:fn", "module 'b2_no_such_module_xyz' could not be imported (ModuleNotFoundError"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:NOT_CALLABLE", "is a int, not a callable"),
    ],
)
def test_bad_evaluator_path_names_the_field(user_module, path, words):
    path = path.format(mod=user_module)
    with pytest.raises(EvaluationSpecError) as info:
        load_user_evaluator(path)
    assert str(info.value).startswith("spec.evaluation.evaluator:")
    assert words in str(info.value)
    with pytest.raises(TrialFailure) as failure:
        evaluate_architecture(small_cnn(), {"evaluator": path})
    assert failure.value.kind == "invalid" and failure.value.message.startswith("spec.evaluation.evaluator:")


@pytest.mark.timeout(60)
def test_user_evaluator_runs_in_a_process_that_never_imports_torch(tmp_path):
    (tmp_path / "b2_plain_eval.py").write_text(
        "def evaluate(arch_json, evaluation_spec, device):\n    return {'val_accuracy': 0.25}\n"
    )
    code = textwrap.dedent(
        """
        import sys
        from morphml.evaluation import evaluate_architecture
        arch = {"input_shape": [4], "num_classes": 2, "nodes": [], "edges": []}
        assert evaluate_architecture(arch, {"evaluator": "b2_plain_eval:evaluate"}) == {"val_accuracy": 0.25}
        assert "torch" not in sys.modules
        print("no torch")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no torch" in done.stdout


# --- failure classification inside the trainer ----------------------------------------------


class RaisingModel(torch.nn.Module):
    """A model whose forward pass fails the way a real one can (allocation failure, shape bug)."""

    def __init__(self, error: Exception):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.error = error

    def forward(self, x):
        raise self.error


@pytest.mark.parametrize(
    "error,kind,words",
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom", "out of memory on cpu"),
        (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"), "oom", "can't allocate memory"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "oom", "out of memory"),
        (ValueError("mat1 and mat2 shapes cannot be multiplied"), "exception", "ValueError: mat1 and mat2"),
    ],
)
def test_trainer_classifies_failures(error, kind, words):
    from morphml.evaluation import load_dataset
    from morphml.evaluation.trainer import train_and_validate

    with pytest.raises(TrialFailure) as info:
        train_and_validate(RaisingModel(error), load_dataset({"name": "digits"}), training_settings({}),
                           torch.device("cpu"))
    assert info.value.kind == kind
    assert words in info.value.message


def test_user_evaluator_memory_error_is_oom(tmp_path, monkeypatch):
    (tmp_path / "b2_oom_eval.py").write_text("def evaluate(a, s, d):\n    raise MemoryError('no room')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), {"evaluator": "b2_oom_eval:evaluate"})
    assert info.value.kind == "oom"


def test_user_evaluator_may_raise_its_own_trial_failure(tmp_path, monkeypatch):
    (tmp_path / "b2_own_failure.py").write_text(
        "from morphml.evaluation import TrialFailure\n"
        "def evaluate(a, s, d):\n    raise TrialFailure('timeout', 'my own budget ran out')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), {"evaluator": "b2_own_failure:evaluate"})
    assert (info.value.kind, info.value.message) == ("timeout", "my own budget ran out")


def test_trial_failure_refuses_unknown_kinds_and_serialises():
    with pytest.raises(ValueError, match="not one of exception, nan, timeout, oom, invalid"):
        TrialFailure("crashed", "x")
    assert TrialFailure("nan", "loss nan").to_json() == {"kind": "nan", "message": "loss nan"}


def test_evaluation_spec_that_is_not_an_object_is_invalid():
    with pytest.raises(TrialFailure) as info:
        evaluate_architecture(small_cnn(), ["digits"])
    assert info.value.kind == "invalid" and info.value.message.startswith("spec.evaluation: must be an object")


@pytest.mark.timeout(60)
def test_builtin_trainer_without_torch_is_a_trial_failure_saying_so():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # what a worker image without torch looks like to an import
        from morphml.evaluation import TrialFailure, evaluate_architecture
        arch = {"input_shape": [4], "num_classes": 2, "edges": [["in", "out"]],
                "nodes": [{"id": "in", "op": "input", "params": {}},
                          {"id": "out", "op": "output", "params": {"units": 2}}]}
        try:
            evaluate_architecture(arch, {"dataset": {"name": "synthetic", "shape": [4], "classes": 2, "size": 40}})
        except TrialFailure as failure:
            print(failure.kind, "|", failure.message)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("exception | the built-in trainer needs torch"), done.stdout
