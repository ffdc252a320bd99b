"""An example custom evaluator for `spec.evaluation.evaluator: digits_evaluator:evaluate`.

MorphML proposes an architecture (canonical graph JSON); this function trains and scores it
with its own loop (SGD with momentum, a cosine learning-rate schedule, label smoothing) instead
of the built-in trainer, and reports each epoch so an early-stopping rule can stop it.

Two call forms exist; MorphML picks by the signature:
- `fn(arch_json, evaluation_spec, device) -> dict`: three arguments, no progress reports;
- `fn(arch_json, evaluation_spec, device, report)` (a fourth parameter, or one named `report`):
  `report(step, metrics)` returns "continue" or "stop" (`morphml.evaluation.ReportDecision`);
  on "stop" return the metrics you have.

The returned dict must hold the objective's metric (val_accuracy here); other keys become columns
of trials.csv. Run it: `PYTHONPATH=examples morphml run examples/custom-evaluator.yaml`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from morphml.evaluation import ReportDecision, build_model, load_dataset


def evaluate(arch_json: dict, evaluation_spec: dict, device: str | None,
             report: Callable[[int, dict], str] | None = None) -> dict:
    """Train the architecture on spec.evaluation.dataset; report every epoch; return metrics."""
    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    epochs = int(evaluation_spec.get("epochs") or 5)
    batch_size = int(evaluation_spec.get("batchSize") or 32)
    learning_rate = float(evaluation_spec.get("learningRate") or 0.05)
    data = load_dataset(evaluation_spec["dataset"])  # the same datasets as the built-in trainer
    torch.manual_seed(0)
    model = build_model(arch_json).to(device)
    x_train, y_train = torch.from_numpy(data.x_train).to(device), torch.from_numpy(data.y_train).to(device)
    x_val, y_val = torch.from_numpy(data.x_val).to(device), torch.from_numpy(data.y_val).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9, nesterov=True)
    steps_per_epoch = max(1, math.ceil(len(x_train) / batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    metrics: dict = {}
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), device=device)
        for start in range(0, len(x_train), batch_size):
            index = order[start:start + batch_size]
            if len(index) < 2:  # batchnorm cannot train on a batch of one
                continue
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            metrics = {"val_accuracy": (logits.argmax(1) == y_val).float().mean().item(),
                       "val_loss": nn.functional.cross_entropy(logits, y_val).item(), "epochs": epoch}
        if report is not None and report(epoch, metrics) == ReportDecision.STOP:
            break  # an early-stopping rule ended this trial: return what we have
    metrics["params"] = sum(p.numel() for p in model.parameters())
    return metrics


def evaluate_quietly(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    """The three-argument form (`digits_evaluator:evaluate_quietly`): the same training, no reports."""
    return evaluate(arch_json, evaluation_spec, device)
