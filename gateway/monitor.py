"""Model monitoring in the request path: input and output drift, class shares, feedback accuracy.

``ModelMonitor`` is a pipeline call observer (``CallObserver``): the pipeline calls ``observe``
after every call, on the event loop. It must stay cheap, so most calls cost one random draw:

- **Drift.** A share of calls (``monitoring.sample_ratio``) is sampled. The rows of every numeric
  input (after online features were added) and every output, flattened to ``[rows, features]``,
  are counted into fixed-bucket histograms, one per model, variant, tensor and feature index (the
  first ``max_indexes`` features only). The bucket edges are the reference's quantiles, so each
  bucket held about ``1/bins`` of the reference. Each time a variant's window of ``window_rows``
  sampled rows fills, the population stability index of each feature against the reference,
  ``sum((live - ref) * ln(live / ref))`` over the buckets, is exported as
  ``infergate_drift_psi{model,variant,tensor,index}`` and the window starts again. Rule of thumb:
  below 0.1 no shift, 0.1 to 0.25 a moderate one, above 0.25 a large one.
- **Reference.** A model's ``monitoring.models.<m>.profile`` file, written by ``infergate monitor
  profile MODEL DATA.csv``; without one, the first ``reference_rows`` rows the model serves (every
  call, not sampled) are captured and become the reference.
- **Class shares.** For a model with a ``class_output``, the sampled calls' predicted classes are
  counted per variant; at each window the shares are exported (``infergate_class_share``) and, for
  every other variant, the total variation distance to the baseline's shares
  (``infergate_class_share_shift``): with shadow divergence, how a canary is watched without labels.
- **Feedback.** For such a model every call with a request ``id`` has its predicted classes kept
  (a bounded store, the oldest dropped first). A label reported later (``Report`` of
  ``infergate.feedback.v1``) is joined to it; the share of correct predictions among the last
  ``accuracy_window`` labels of a variant is ``infergate_accuracy{model,variant}``, and label
  listeners (the canary controller) hear of each one.

Cardinality is bounded by the config: tensors x ``max_indexes`` drift series per variant,
``max_classes`` + 1 class series. With several workers each keeps its own windows and its own
prediction store: a label must reach the worker that served the call (its ``NOT_FOUND`` says so).
"""

from __future__ import annotations

import json
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infergate.gateway import metrics
from infergate.gateway.config import ModelMonitorConfig, MonitoringConfig
from infergate.gateway.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from infergate.gateway.identity import Identity
from infergate.gateway.pipeline import CallRecord, ModelEndpoint
from infergate.router.canary import CanaryController

log = logging.getLogger(__name__)

PROFILE_FORMAT = "infergate-profile-v1"
_SHARE_FLOOR = 1e-4
"""Empty buckets count as this share in PSI (the usual smoothing: ln(0) is not a number)."""
OTHER_CLASS = "other"

LabelListener = Callable[[str, str, bool], None]
"""Called with (model, variant, correct) for each joined label."""


# -- reference profiles ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorProfile:
    """The reference distribution of some features of one tensor."""

    indexes: tuple[int, ...]
    """Feature indexes (columns of the flattened tensor) this profile covers."""
    edges: np.ndarray
    """Inner bucket edges, ``[len(indexes), bins - 1]``, increasing per row."""
    shares: np.ndarray
    """Share of reference rows per bucket, ``[len(indexes), bins]``, rows summing to 1."""

    @property
    def bins(self) -> int:
        return self.shares.shape[1]


@dataclass(frozen=True)
class Profile:
    model: str
    rows: int
    tensors: dict[str, TensorProfile]


def build_profile(model: str, columns: Mapping[str, tuple[tuple[int, ...], np.ndarray]], bins: int) -> Profile:
    """A profile from reference data: per tensor, its feature indexes and values ``[rows, len(indexes)]``.

    Edges are the reference's quantiles, so each bucket holds about ``1 / bins`` of it (fewer
    distinct values than buckets leave some empty; that is fine).
    """
    tensors = {}
    rows = 0
    for tensor, (indexes, values) in columns.items():
        values = np.asarray(values, dtype=np.float64).reshape(len(values), len(indexes))
        if len(values) == 0:
            raise ValueError(f"no reference rows for tensor {tensor!r}")
        rows = max(rows, len(values))
        edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1], axis=0).T.copy()
        counts = bucket_counts(values, edges, bins)
        tensors[tensor] = TensorProfile(tuple(indexes), edges, counts / len(values))
    return Profile(model, rows, tensors)


def bucket_counts(values: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    """Rows per bucket for each feature: ``values [rows, k]`` against ``edges [k, bins - 1]`` -> ``[k, bins]``.

    A value equal to an edge goes to the bucket above it; NaN goes to the top bucket.
    """
    bucket = (values[:, :, None] >= edges[None, :, :]).sum(axis=2)  # [rows, k]
    bucket[np.isnan(values)] = bins - 1
    k = values.shape[1]
    flat = bucket + np.arange(k)[None, :] * bins
    return np.bincount(flat.ravel(), minlength=k * bins).reshape(k, bins).astype(np.float64)


def psi(reference_shares: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Population stability index per feature of live ``counts [k, bins]`` against ``reference_shares``."""
    totals = counts.sum(axis=1, keepdims=True)
    live = np.maximum(counts / np.maximum(totals, 1), _SHARE_FLOOR)
    reference = np.maximum(reference_shares, _SHARE_FLOOR)
    return ((live - reference) * np.log(live / reference)).sum(axis=1)


def profile_to_json(profile: Profile) -> dict:
    return {
        "format": PROFILE_FORMAT,
        "model": profile.model,
        "rows": profile.rows,
        "tensors": {
            name: {"indexes": list(t.indexes), "edges": t.edges.tolist(), "shares": t.shares.tolist()}
            for name, t in profile.tensors.items()
        },
    }


def profile_from_json(data: dict) -> Profile:
    """Parse a profile file's content; ``ValueError`` naming what is wrong."""
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"not an infergate profile (format is not {PROFILE_FORMAT!r})")
    tensors = {}
    for name, item in data["tensors"].items():
        indexes = tuple(int(i) for i in item["indexes"])
        shares = np.asarray(item["shares"], dtype=np.float64)
        edges = np.asarray(item["edges"], dtype=np.float64).reshape(len(indexes), shares.shape[1] - 1)
        if shares.shape[0] != len(indexes):
            raise ValueError(f"tensor {name!r}: {len(indexes)} indexes but {shares.shape[0]} share rows")
        tensors[name] = TensorProfile(indexes, edges, shares)
    return Profile(str(data["model"]), int(data["rows"]), tensors)


def read_profile(path: Path) -> Profile:
    try:
        return profile_from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read profile {path}: {exc}") from exc


def write_profile(profile: Profile, path: Path) -> None:
    path.write_text(json.dumps(profile_to_json(profile)), encoding="utf-8")


# -- live state ----------------------------------------------------------------------------------


def feature_table(array: np.ndarray, batched: bool) -> np.ndarray | None:
    """A tensor as ``[rows, features]`` float64 (None for non-numeric tensors)."""
    if array.dtype.kind not in "biuf" or array.size == 0:
        return None
    if batched and array.ndim >= 1:
        return array.reshape(array.shape[0], -1)
    return array.reshape(1, -1)


def predicted_classes(array: np.ndarray, batched: bool) -> np.ndarray:
    """Class index per row: argmax of ``[N, C]`` scores (C > 1), else the value of a ``[N]``/``[N, 1]`` tensor."""
    if batched and array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind in "iuf":
        return array.argmax(axis=1)  # the usual case, without the general reshaping below
    table = feature_table(array, batched)
    if table is None:
        raise ValueError(f"class output has non-numeric dtype {array.dtype}")
    if table.shape[1] > 1:
        return table.argmax(axis=1)
    return table[:, 0].astype(np.int64)


@dataclass
class _Window:
    """Live bucket counts of one tensor of one variant, since the window began."""

    counts: np.ndarray
    rows: int = 0
    above: set[int] = field(default_factory=set)
    """Indexes whose last PSI was above the warning threshold (warn once per crossing)."""


@dataclass
class _Prediction:
    model: str
    variant: str
    classes: np.ndarray
    labelled: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class FeedbackOutcome:
    model: str
    variant: str
    predicted: str
    correct: bool


class _ModelState:
    """What the monitor keeps for one model."""

    def __init__(self, endpoint: ModelEndpoint, config: MonitoringConfig, model_config: ModelMonitorConfig) -> None:
        self.name = endpoint.name
        self.baseline = endpoint.config.baseline
        self.batched = endpoint.signature.batched
        self.class_output = model_config.class_output
        self.class_names = model_config.class_names
        self.config = config
        self.profile: Profile | None = None
        self._capture: dict[str, list[np.ndarray]] = {}
        self._captured_rows = 0
        self.windows: dict[tuple[str, str], _Window] = {}
        self.class_counts: dict[str, np.ndarray] = {}
        self.class_rows: dict[str, int] = {}
        self.class_shares: dict[str, np.ndarray] = {}
        self.classes_seen: dict[str, set[int]] = {}
        self._skipped: set[str] = set()
        if model_config.profile is not None:
            self.profile = read_profile(model_config.profile)
            if self.profile.model != self.name:
                log.warning("model %s: profile %s was made for model %s", self.name, model_config.profile, self.profile.model)

    def class_name(self, index: int) -> str:
        if index >= self.config.max_classes:
            return OTHER_CLASS
        if index < len(self.class_names):
            return self.class_names[index]
        return str(index)

    # -- reference capture

    def capture(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Keep the rows of the model's first calls until ``reference_rows``; then build the reference."""
        rows = 0
        for name, array in tensors.items():
            table = feature_table(array, self.batched)
            if table is None:
                continue
            self._capture.setdefault(name, []).append(np.array(table[:, : self.config.max_indexes], dtype=np.float64))
            rows = max(rows, len(table))
        self._captured_rows += rows
        if self._captured_rows >= self.config.reference_rows:
            columns = {}
            for name, parts in self._capture.items():
                width = min(part.shape[1] for part in parts)
                values = np.concatenate([part[:, :width] for part in parts])
                columns[name] = (tuple(range(width)), values)
            self.profile = build_profile(self.name, columns, self.config.bins)
            self._capture.clear()
            log.info("model %s: drift reference captured from its first %d rows", self.name, self.profile.rows)

    # -- drift

    def sample(self, variant: str, tensors: Mapping[str, np.ndarray]) -> int:
        """Count one sampled call's rows into the variant's windows; returns the rows taken."""
        assert self.profile is not None
        taken = 0
        for name, reference in self.profile.tensors.items():
            array = tensors.get(name)
            if array is None or name in self._skipped:
                continue
            table = feature_table(array, self.batched)
            if table is None:
                continue
            if table.shape[1] <= reference.indexes[-1]:
                self._skipped.add(name)
                log.warning("model %s: tensor %s has %d features, the profile names index %d; not watched",
                            self.name, name, table.shape[1], reference.indexes[-1])
                continue
            values = table[:, list(reference.indexes)].astype(np.float64, copy=False)
            window = self.windows.get((variant, name))
            if window is None:
                window = self.windows[(variant, name)] = _Window(np.zeros_like(reference.shares))
            window.counts += bucket_counts(values, reference.edges, reference.bins)
            window.rows += len(values)
            taken = max(taken, len(values))
            if window.rows >= self.config.window_rows:
                self._close_window(variant, name, reference, window)
        return taken

    def _close_window(self, variant: str, tensor: str, reference: TensorProfile, window: _Window) -> None:
        values = psi(reference.shares, window.counts)
        for index, value in zip(reference.indexes, values):
            metrics.DRIFT_PSI.labels(self.name, variant, tensor, str(index)).set(float(value))
            above = value > self.config.psi_warn_threshold
            if above and index not in window.above:
                log.warning("model %s variant %s: drift on %s[%d], PSI %.3f over %d sampled rows",
                            self.name, variant, tensor, index, value, window.rows)
            if above:
                window.above.add(index)
            else:
                window.above.discard(index)
        window.counts[:] = 0
        window.rows = 0

    # -- class shares

    def count_classes(self, variant: str, classes: np.ndarray) -> None:
        limit = self.config.max_classes
        counts = self.class_counts.get(variant)
        if counts is None:
            counts = self.class_counts[variant] = np.zeros(limit + 1)
        counts += np.bincount(np.clip(classes, 0, limit), minlength=limit + 1)[: limit + 1]
        self.class_rows[variant] = self.class_rows.get(variant, 0) + len(classes)
        if self.class_rows[variant] >= self.config.window_rows:
            shares = self.class_shares[variant] = counts / counts.sum()
            seen = self.classes_seen.setdefault(variant, set())
            seen.update(int(index) for index in np.flatnonzero(shares))
            for index in sorted(seen):  # a class seen before and absent now reads 0, not its old share
                metrics.CLASS_SHARE.labels(self.name, variant, self.class_name(index)).set(float(shares[index]))
            counts[:] = 0
            self.class_rows[variant] = 0
            self._update_shifts()

    def _update_shifts(self) -> None:
        base = self.class_shares.get(self.baseline)
        if base is None:
            return
        for variant, shares in self.class_shares.items():
            if variant != self.baseline:
                metrics.CLASS_SHARE_SHIFT.labels(self.name, variant).set(float(0.5 * np.abs(shares - base).sum()))


class ModelMonitor:
    """Drift, class shares and feedback accuracy for every model; see the module docstring."""

    def __init__(
        self,
        config: MonitoringConfig,
        endpoints: Mapping[str, ModelEndpoint],
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._random = (rng or random.Random()).random
        self._models: dict[str, _ModelState] = {}
        for name, endpoint in endpoints.items():
            model_config = config.models.get(name, ModelMonitorConfig())
            if model_config.class_output and endpoint.signature.output(model_config.class_output) is None:
                raise ValueError(f"monitoring.models.{name}.class_output: model has no output {model_config.class_output!r}")
            self._models[name] = _ModelState(endpoint, config, model_config)
        self._predictions: OrderedDict[str, _Prediction] = OrderedDict()
        self._outcomes: dict[tuple[str, str], deque[bool]] = {}
        self._label_listeners: list[LabelListener] = []

    def add_label_listener(self, listener: LabelListener) -> None:
        self._label_listeners.append(listener)

    def reference(self, model: str) -> Profile | None:
        """The model's reference profile (None while it is still being captured)."""
        return self._models[model].profile

    # -- the call observer (hot path)

    def observe(self, record: CallRecord) -> None:
        result = record.result
        if result is None:
            return
        state = self._models.get(record.endpoint.name)
        if state is None:
            return
        classes = None
        if state.class_output:
            request_id = record.context.request_id if record.context is not None else ""
            if request_id:
                classes = self._predict(state, result.outputs)
                if classes is not None:
                    self._keep_prediction(request_id, state.name, result.variant, classes)
        if state.profile is None:
            state.capture({**record.inputs, **result.outputs})
            return
        if self._random() >= self.config.sample_ratio:
            return
        taken = state.sample(result.variant, {**record.inputs, **result.outputs})
        if taken:
            metrics.MONITOR_SAMPLED_ROWS.labels(state.name, result.variant).inc(taken)
        if state.class_output:
            if classes is None:
                classes = self._predict(state, result.outputs)
            if classes is not None:
                state.count_classes(result.variant, classes)

    def _predict(self, state: _ModelState, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        array = outputs.get(state.class_output)
        if array is None:
            return None
        return predicted_classes(array, state.batched)

    def _keep_prediction(self, request_id: str, model: str, variant: str, classes: np.ndarray) -> None:
        store = self._predictions
        store[request_id] = _Prediction(model, variant, classes[: self.config.max_rows_per_prediction])
        store.move_to_end(request_id)
        while len(store) > self.config.prediction_store_size:
            store.popitem(last=False)

    # -- feedback

    def report(self, request_id: str, label: str, row: int, identity: Identity) -> FeedbackOutcome:
        """Join a label to the prediction logged for ``request_id`` (its ``row``-th row).

        NOT_FOUND when no prediction is kept under that id (never served, dropped from the bounded
        store, served by another worker or replica, or a model without ``class_output``);
        PERMISSION_DENIED when the caller may not call the model; FAILED_PRECONDITION when that
        row already has a label; INVALID_ARGUMENT for a row the request did not have.
        """
        if not request_id:
            raise InvalidArgument("request_id is required")
        prediction = self._predictions.get(request_id)
        if prediction is None or not identity.may_infer(prediction.model):
            metrics.FEEDBACK.labels("", "", "unmatched").inc()
            if prediction is None:
                raise NotFound(f"no prediction kept for request id {request_id!r} (unknown, expired, or served elsewhere)")
            raise PermissionDenied(f"feedback for model {prediction.model!r} needs the infer:{prediction.model} scope")
        if not 0 <= row < len(prediction.classes):
            raise InvalidArgument(f"row {row} out of range: request {request_id!r} kept {len(prediction.classes)} row(s)")
        if row in prediction.labelled:
            raise FailedPrecondition(f"request {request_id!r} row {row} already has a label")
        prediction.labelled.add(row)
        state = self._models[prediction.model]
        predicted = state.class_name(int(prediction.classes[row]))
        correct = label == predicted
        key = (prediction.model, prediction.variant)
        outcomes = self._outcomes.get(key)
        if outcomes is None:
            outcomes = self._outcomes[key] = deque(maxlen=self.config.accuracy_window)
        outcomes.append(correct)
        metrics.ACCURACY.labels(*key).set(sum(outcomes) / len(outcomes))
        metrics.FEEDBACK.labels(*key, "correct" if correct else "incorrect").inc()
        for listener in self._label_listeners:
            try:
                listener(prediction.model, prediction.variant, correct)
            except Exception:
                log.exception("feedback label listener failed")
        return FeedbackOutcome(prediction.model, prediction.variant, predicted, correct)

    def accuracy(self, model: str, variant: str) -> tuple[float, int] | None:
        """(share correct, labels) over the variant's last labels; None before the first label."""
        outcomes = self._outcomes.get((model, variant))
        if not outcomes:
            return None
        return sum(outcomes) / len(outcomes), len(outcomes)


def build_monitor(
    config: MonitoringConfig, endpoints: Mapping[str, ModelEndpoint], canaries: Mapping[str, CanaryController]
) -> ModelMonitor:
    """The monitor of a gateway, with each model's canary controller listening to its labels.

    Raises ``ValueError`` naming the config key when a profile cannot be read or a
    ``class_output`` is not an output of the model.
    """
    monitor = ModelMonitor(config, endpoints)  # ValueError: a bad profile or class_output

    def to_canary(model: str, variant: str, correct: bool) -> None:
        controller = canaries.get(model)
        if controller is not None:
            controller.observe_label(variant, correct)

    monitor.add_label_listener(to_canary)
    return monitor
