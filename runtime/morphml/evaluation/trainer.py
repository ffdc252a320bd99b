"""Training and validation of one built model: the torch half of `evaluate_architecture`.

Failures come out as TrialFailure: a NaN/inf loss -> "nan", past timeoutSeconds (checked between
batches) -> "timeout", accelerator out of memory -> "oom", anything else -> "exception".

After validation the trained model's inference latency is measured on the trial's own device:
`latency_ms` is the median wall time of LATENCY_PASSES forward passes (after LATENCY_WARMUP
untimed ones) of one fixed batch of LATENCY_BATCH validation examples, in eval mode without
gradients, the device synchronised around each pass on CUDA (spec.constraints.maxLatencyMs and
the latency_ms objective read it).

Imports torch at import time; `morphml.evaluation` imports this module only inside functions.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphml.evaluation import checkpoint_file
from morphml.evaluation.datasets import Dataset
from morphml.evaluation.errors import TrialFailure
from morphml.evaluation.segments import Segment
from morphml.evaluation.settings import SGD_MOMENTUM, TrainingSettings

LATENCY_BATCH = 32  # examples in the timed batch (fewer when the validation split is smaller)
LATENCY_WARMUP = 3  # untimed passes first: allocator, cuDNN autotuning, caches
LATENCY_PASSES = 20  # timed passes; latency_ms is their median


def measure_latency_ms(model: nn.Module, batch: torch.Tensor, device: torch.device) -> float:
    """Median milliseconds of one forward pass of `batch` through `model` on `device`."""
    cuda = device.type == "cuda"
    timings = []
    model.eval()
    with torch.no_grad():
        for index in range(LATENCY_WARMUP + LATENCY_PASSES):
            if cuda:
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            model(batch)
            if cuda:
                torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them to finish
            if index >= LATENCY_WARMUP:
                timings.append((time.perf_counter() - begin) * 1000.0)
    return statistics.median(timings)


@functools.cache  # once per process
def configure_threads() -> None:
    """Keep torch to a few CPU threads: OMP_NUM_THREADS when set, else at most 2.

    Several trials (worker processes) share a machine's cores; torch's default of one thread per
    core makes them fight.
    """
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(wanted) if wanted.isdigit() and int(wanted) > 0 else min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)


def select_device(device: str | None) -> torch.device:
    """An explicit device string wins; else the first visible CUDA device; else the CPU.

    CUDA_VISIBLE_DEVICES is honoured by torch itself: "cuda:0" is the first device it lists.
    """
    if device:
        try:
            chosen = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise TrialFailure("invalid", f"device {device!r} is not a torch device string ({exc})") from None
        if chosen.type == "cuda":
            if not torch.cuda.is_available():
                raise TrialFailure("invalid", f"device {device!r} requested but CUDA is not available here")
            index = chosen.index or 0
            if index >= torch.cuda.device_count():
                raise TrialFailure(
                    "invalid",
                    f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible",
                )
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    return torch.device("cpu")


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _make_optimizer(model: nn.Module, settings: TrainingSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=SGD_MOMENTUM, weight_decay=settings.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)


def train_and_validate(
    model: nn.Module,
    dataset: Dataset,
    settings: TrainingSettings,
    device: torch.device,
    seed: int = 0,
    started: float | None = None,
    report: Callable[[int, dict], bool] | None = None,
    segment: Segment | None = None,
) -> dict[str, Any]:
    """Train `model` on the dataset and return validation metrics; raise TrialFailure on failure.

    `segment` (None: all epochs from scratch, no checkpoints) says which epochs to train:
    resume from `segment.resume` (a checkpoint file, checked before use; when it cannot be used
    training starts from 0 and the metrics carry `checkpoint_fallback` saying why), train epochs
    start_epoch+1 .. stop_epoch (0: settings.epochs), and after each epoch in save_epochs write a
    checkpoint into segment.checkpoint_dir and call segment.on_checkpoint(epoch, path, sha256, size).
    Epoch numbers (reports, `epochs`) are absolute, counted from the trial's first epoch.

    `started` (time.monotonic()) is when the trial began, so loading data and building the model
    count against the timeout too; train_seconds counts training and validation only.
    `report(epoch, {epoch, val_accuracy, val_loss, train_loss, seconds})`, when given, is called
    after each epoch (the model is validated then; eval mode draws no random numbers, so the
    trained weights are the same as without it); True from it stops training there, and the
    metrics are those of the last epoch trained (`epochs` says how many).
    """
    started = time.monotonic() if started is None else started
    deadline = started + settings.timeout_seconds
    try:
        return _run(model, dataset, settings, device, seed, started, deadline, report, segment)
    except TrialFailure:
        raise
    except Exception as exc:
        if _is_oom(exc):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise TrialFailure("oom", f"out of memory on {device}: {exc}") from None
        raise TrialFailure("exception", f"{type(exc).__name__}: {exc}") from None


def _check_deadline(deadline: float, settings: TrainingSettings, where: str) -> None:
    if time.monotonic() > deadline:
        raise TrialFailure("timeout", f"trial ran past timeoutSeconds={settings.timeout_seconds:g} ({where})")


def _validate(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, settings: TrainingSettings,
              deadline: float) -> tuple[float, float]:
    """(val_accuracy, val_loss) of the model in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x_val), max(settings.batch_size, 256)):
            _check_deadline(deadline, settings, "validation")
            logits = model(x_val[start:start + max(settings.batch_size, 256)])
            target = y_val[start:start + len(logits)]
            loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == target).sum().item())
    val_loss = loss_sum / len(x_val)
    if not math.isfinite(val_loss):
        raise TrialFailure("nan", f"validation loss is {val_loss}")
    return correct / len(x_val), val_loss


def _resume(segment: Segment, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
            settings: TrainingSettings) -> tuple[int, str | None, float, torch.optim.Optimizer]:
    """(epochs already trained, fallback reason or None, the last train_loss, the optimizer): the
    segment's checkpoint loaded into model, optimizer and RNGs, or, when it cannot be used,
    everything as a fresh start."""
    if segment.fallback:  # the worker could not even fetch it
        return 0, segment.fallback, float("nan"), optimizer
    if segment.start_epoch <= 0 or segment.resume is None:
        return 0, None, float("nan"), optimizer
    label = segment.resume_key or Path(segment.resume).name
    name = f"checkpoint {label}"
    fresh_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fresh_rng, fresh_data = torch.get_rng_state(), generator.get_state()
    try:
        state = checkpoint_file.read_checkpoint(segment.resume, sha256=segment.resume_sha256,
                                                size=segment.resume_size, arch_hash=segment.arch_hash or None,
                                                name=label)
        if state["epoch"] != segment.start_epoch:
            raise checkpoint_file.CheckpointError(f"{name}: key 'epoch' is {state['epoch']}, the lease resumes at "
                                                  f"epoch {segment.start_epoch}")
        if state["epoch"] > settings.epochs:
            raise checkpoint_file.CheckpointError(f"{name}: key 'epoch' is {state['epoch']}, past the "
                                                  f"{settings.epochs} of spec.evaluation.epochs")
        checkpoint_file.check_fits(state, model, name)
        checkpoint_file.restore(state, model=model, optimizer=optimizer, data_generator=generator, name=name)
    except checkpoint_file.CheckpointError as exc:
        # Back to exactly the fresh start (a failed restore may have loaded the model already).
        model.load_state_dict(fresh_model)
        torch.set_rng_state(fresh_rng)
        generator.set_state(fresh_data)
        return 0, str(exc), float("nan"), _make_optimizer(model, settings)
    train_loss = state.get("train_loss")
    return int(state["epoch"]), None, float(train_loss) if isinstance(train_loss, float) else float("nan"), optimizer


def _run(model: nn.Module, dataset: Dataset, settings: TrainingSettings, device: torch.device, seed: int,
         started: float, deadline: float, report: Callable[[int, dict], bool] | None = None,
         segment: Segment | None = None) -> dict[str, Any]:
    train_started = time.monotonic()
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device)
    optimizer = _make_optimizer(model, settings)
    first_epoch, fallback, train_loss = 0, None, float("nan")
    if segment is not None:
        first_epoch, fallback, train_loss, optimizer = _resume(segment, model, optimizer, generator, settings)
    last_epoch = settings.epochs
    save_epochs: frozenset[int] = frozenset()
    if segment is not None:
        if segment.stop_epoch > 0:
            last_epoch = min(segment.stop_epoch, settings.epochs)
        if segment.checkpoint_dir is not None:
            save_epochs = frozenset(segment.save_epochs)
    loss_fn = nn.CrossEntropyLoss()
    x_train = torch.from_numpy(dataset.x_train).to(device)
    y_train = torch.from_numpy(dataset.y_train).to(device)
    x_val = torch.from_numpy(dataset.x_val).to(device)
    y_val = torch.from_numpy(dataset.y_val).to(device)
    n_train = len(x_train)

    epochs_done = first_epoch
    validated: tuple[float, float] | None = None  # the last epoch's validation, when reported
    for epoch in range(first_epoch, last_epoch):
        model.train()
        order = torch.randperm(n_train, generator=generator).to(device)
        total, seen = 0.0, 0
        for start in range(0, n_train, settings.batch_size):
            _check_deadline(deadline, settings, f"epoch {epoch + 1}")
            batch = order[start:start + settings.batch_size]
            if len(batch) < 2 and n_train > 1:
                continue  # batchnorm cannot train on one sample; drop a final batch of one
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            value = loss.item()
            if not math.isfinite(value):
                raise TrialFailure("nan",
                                   f"training loss became {value} in epoch {epoch + 1} (try a lower learningRate)")
            loss.backward()
            optimizer.step()
            total += value * len(batch)
            seen += len(batch)
        train_loss = total / max(seen, 1)
        epochs_done += 1
        stop = False
        if report is not None:
            validated = _validate(model, x_val, y_val, settings, deadline)
            stop = report(epochs_done, {"epoch": epochs_done, "val_accuracy": validated[0], "val_loss": validated[1],
                                        "train_loss": train_loss, "seconds": time.monotonic() - train_started})
        if epochs_done in save_epochs and segment is not None and segment.checkpoint_dir is not None:
            # Saved after the report is answered (journaled): a journaled checkpoint of epoch k
            # implies a journaled curve point k, so a resumed curve has no gap (at worst a lost
            # worker's last epoch is trained and reported again by the next attempt).
            path = Path(segment.checkpoint_dir) / f"{segment.task_id}-{segment.attempt}-epoch-{epochs_done:04d}.pt"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                digest, size = checkpoint_file.save_checkpoint(path, model=model, optimizer=optimizer,
                                                               epoch=epochs_done, arch_hash=segment.arch_hash,
                                                               data_generator=generator, train_loss=train_loss)
            except (OSError, RuntimeError) as exc:
                # A checkpoint is insurance, not the trial: a full or vanished local disk costs
                # this checkpoint (a later loss resumes from an earlier one), never the trial.
                print(f"morphml: checkpoint after epoch {epochs_done} not saved ({type(exc).__name__}: {exc})",
                      file=sys.stderr, flush=True)
            else:
                if segment.on_checkpoint is not None:
                    segment.on_checkpoint(epochs_done, str(path), digest, size)
        if stop:
            break

    val_accuracy, val_loss = validated if validated is not None else _validate(model, x_val, y_val, settings, deadline)
    _check_deadline(deadline, settings, "latency measurement")
    latency_ms = measure_latency_ms(model, x_val[:LATENCY_BATCH], device)
    extra: dict[str, Any] = {}
    if first_epoch:
        extra["resumed_from_epoch"] = first_epoch
    if fallback:
        extra["checkpoint_fallback"] = fallback
    return extra | {
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "train_loss": train_loss,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": time.monotonic() - train_started,
        "epochs": epochs_done,
        "device": str(device),
        "latency_ms": latency_ms,
        "latency_batch": min(LATENCY_BATCH, len(x_val)),
    }
