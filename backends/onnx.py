"""ONNX Runtime in process.

A run that is tiny runs inline, on the event loop: handing a 30 µs run to a thread costs more CPU
than the run itself (a queue, a thread wake-up, a future, a loop wake-up). Longer runs go to a
dedicated thread pool (``pool_threads``) so the event loop never blocks for long. The choice is
made per model and per call (``run_inline``): ``auto`` fits each model's run time as
``base + per_element x input elements`` from probe runs at load, keeps refining the per-element
cost from every real run (a moving average), and runs a call inline when its estimate is at most
``inline_max_us``; a large batch of the same model goes to the pool.
Providers come from config, so the CUDA provider is configuration only. When a caller's deadline
passes during a pool run, the run is told to stop (``RunOptions.terminate``) and the caller gets
DEADLINE_EXCEEDED at once; an inline run is short by construction and is not interrupted.
A file whose variant names a ``sha256`` is hashed before ONNX Runtime reads it (in the pool, off
the loop) and refused with ``ArtifactRejected`` when the digest differs; ONNX Runtime then loads the
very bytes that were hashed (so such a model keeps its weights inside the file, not in external
data files).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infergate.backends.base import Backend, ModelSignature, TensorSpec
from infergate.backends.datatypes import NUMPY_DTYPES
from infergate.gateway.config import OnnxBackendConfig
from infergate.gateway.errors import ArtifactRejected, DeadlineExceeded, Internal, InvalidArgument, NotFound

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


_EWMA_WEIGHT = 0.05
"""Weight of the newest run in a model's moving average of its per-element cost."""
_PROBE_RUNS = 12
_PROBE_SCALE = 8
"""The second probe has this many times the rows of the first (when the first dimension is free)."""


class _LoadedModel:
    """A session and how its runs are placed (inline or in the pool)."""

    __slots__ = ("session", "mode", "base_us", "element_us")

    def __init__(self, session: ort.InferenceSession, mode: str, base_us: float, element_us: float) -> None:
        self.session = session
        self.mode = mode
        """``auto``, ``always`` or ``never`` (run_inline)."""
        self.base_us = base_us
        """Fixed cost of one run, in µs (from the probe)."""
        self.element_us = element_us
        """Cost per input element, in µs (probe, then a moving average of real runs)."""

    def estimate_us(self, elements: int) -> float:
        return self.base_us + self.element_us * elements

    def observe(self, run_us: float, elements: int) -> None:
        if elements:
            sample = max(run_us - self.base_us, 0.0) / elements
            self.element_us += _EWMA_WEIGHT * (sample - self.element_us)


class OnnxBackend(Backend):
    def __init__(
        self,
        name: str,
        config: OnnxBackendConfig,
        clock: Callable[[], float] = time.monotonic,
        digests: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, clock)
        self._config = config
        self._models: dict[str, _LoadedModel] = {}
        self._digests = dict(digests or {})
        """Expected SHA-256 (lower-case hex) per model path; a path not named here is not checked."""
        self._pool: ThreadPoolExecutor | None = None
        self._inline_max_us = float(config.inline_max_us)

    @property
    def kind(self) -> str:
        return "onnx"

    @property
    def providers(self) -> list[str]:
        """The providers sessions were asked to use, in order."""
        return list(self._config.providers)

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(self._config.pool_threads, thread_name_prefix=f"onnx-{self.name}")

    async def close(self) -> None:
        self._models.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def load(self, model: str) -> ModelSignature:
        loaded = self._models.get(model)
        if loaded is None:
            if not Path(model).is_file():
                raise NotFound(f"ONNX model file not found: {model}")
            loop = asyncio.get_running_loop()
            session = await loop.run_in_executor(self._pool, self._open, model)
            mode = self._config.run_inline
            base_us, element_us = (0.0, 0.0)
            if mode == "auto":
                base_us, element_us = await loop.run_in_executor(self._pool, _probe_cost, session)
            loaded = self._models[model] = _LoadedModel(session, mode, base_us, element_us)
            log.info(
                "backend %s: %s costs %.0f µs + %.3f µs per input element a run (run_inline %s)",
                self.name, Path(model).name, base_us, element_us, mode,
            )
        return _signature(loaded.session)

    def runs_inline(self, model: str, elements: int) -> bool:
        """Whether a run of ``model`` on ``elements`` input elements would run on the event loop now."""
        loaded = self._models[model]
        if loaded.mode == "auto":
            return loaded.estimate_us(elements) <= self._inline_max_us
        return loaded.mode == "always"

    def _open(self, path: str) -> ort.InferenceSession:
        source: str | bytes = path
        expected = self._digests.get(path)
        if expected is not None:
            # Hash the bytes ONNX Runtime is given, so a file swapped after the check is never run.
            source = Path(path).read_bytes()
            actual = hashlib.sha256(source).hexdigest()
            if actual != expected:
                raise ArtifactRejected(f"refused {path}: its sha256 is {actual}, the config names {expected}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._config.intra_op_threads
        options.inter_op_num_threads = 1
        available = set(ort.get_available_providers())
        providers = [p for p in self._config.providers if p in available]
        missing = [p for p in self._config.providers if p not in available]
        if missing:
            log.warning("backend %s: providers %s not available here; using %s", self.name, missing, providers)
        if not providers:
            raise Internal(f"backend {self.name}: none of the providers {list(self._config.providers)} is available")
        try:
            return ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise Internal(f"cannot load ONNX model {Path(path).name}: {exc}") from exc

    def session_providers(self, model: str) -> list[str]:
        """The providers a loaded session actually runs on."""
        return self._models[model].session.get_providers()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        loaded = self._models.get(model)
        if loaded is None or self._pool is None:
            raise Internal(f"backend {self.name}: model {Path(model).name} is not loaded")
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the ONNX run started")
        feeds = {name: _to_ort(array) for name, array in inputs.items()}
        names = list(outputs)
        mode = loaded.mode
        if mode != "never":
            elements = sum(array.size for array in feeds.values())
        if mode == "always" or (mode == "auto" and loaded.estimate_us(elements) <= self._inline_max_us):
            started = time.perf_counter()
            results = _run(loaded.session, names, feeds, None)
            loaded.observe((time.perf_counter() - started) * 1e6, elements)
        else:
            run_options = ort.RunOptions()
            future = asyncio.get_running_loop().run_in_executor(
                self._pool, _timed_run, loaded.session, names, feeds, run_options
            )
            try:
                async with asyncio.timeout(remaining):
                    results, run_us = await future
            except TimeoutError:
                run_options.terminate = True  # the abandoned run stops; its outcome is dropped with the future
                raise DeadlineExceeded("deadline passed during the ONNX run") from None
            except asyncio.CancelledError:
                run_options.terminate = True
                raise
            if mode == "auto":
                loaded.observe(run_us, elements)
        return {name: _from_ort(value) for name, value in zip(names, results)}

    async def ready(self, model: str) -> bool:
        return self._pool is not None and model in self._models


def _run(session: ort.InferenceSession, outputs: list[str], feeds: dict, run_options: ort.RunOptions | None) -> list:
    try:
        return session.run(outputs, feeds, run_options)
    except Exception as exc:
        message = str(exc).splitlines()[0][:300]
        if type(exc).__name__ == "InvalidArgument":  # onnxruntime's pybind exception for bad feeds
            raise InvalidArgument(f"model rejected the input: {message}") from exc
        raise Internal(f"ONNX Runtime failed: {message}") from exc


def _timed_run(session: ort.InferenceSession, outputs: list[str], feeds: dict, run_options: ort.RunOptions) -> tuple[list, float]:
    """``_run`` in a pool thread, with its duration in µs."""
    started = time.perf_counter()
    results = _run(session, outputs, feeds, run_options)
    return results, (time.perf_counter() - started) * 1e6


def _probe_cost(session: ort.InferenceSession) -> tuple[float, float]:
    """``(base µs, µs per input element)`` of runs on zeros: one row (free dimensions set to 1), then
    ``_PROBE_SCALE`` rows. A model that cannot run on zeros gets an infinite cost: it runs in the
    pool (its real runs then teach the per-element cost)."""
    inputs = session.get_inputs()
    free_first = all(arg.shape and not (isinstance(arg.shape[0], int) and arg.shape[0] > 0) for arg in inputs)
    try:
        one, elements = _median_run_us(session, inputs, 1)
        if not free_first or not elements:
            return 0.0, one / max(elements, 1)
        many, many_elements = _median_run_us(session, inputs, _PROBE_SCALE)
    except Exception:  # a model that needs real input; not the gateway's error
        log.debug("probe run failed", exc_info=True)
        return float("inf"), 0.0
    element_us = max(many - one, 0.0) / max(many_elements - elements, 1)
    return max(one - element_us * elements, 0.0), element_us


def _median_run_us(session: ort.InferenceSession, inputs, rows: int) -> tuple[float, int]:
    feeds = {}
    for arg in inputs:
        shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in arg.shape]
        if shape and not (isinstance(arg.shape[0], int) and arg.shape[0] > 0):
            shape[0] = rows
        datatype = _ORT_TYPES.get(arg.type)
        if datatype is None:
            raise Internal(f"unsupported type {arg.type}")
        feeds[arg.name] = np.full(shape, "", dtype=object) if datatype == "BYTES" else np.zeros(shape, NUMPY_DTYPES[datatype])
    times = []
    for _ in range(_PROBE_RUNS):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return float(np.median(times[_PROBE_RUNS // 3 :])) * 1e6, sum(a.size for a in feeds.values())


def _signature(session: ort.InferenceSession) -> ModelSignature:
    inputs = tuple(_spec(arg) for arg in session.get_inputs())
    outputs = tuple(_spec(arg) for arg in session.get_outputs())
    # A model is batched when every tensor has a free leading dimension (symbolic or -1).
    batched = all(spec.shape and spec.shape[0] == -1 for spec in inputs + outputs)
    return ModelSignature(inputs=inputs, outputs=outputs, batched=batched, max_batch_size=0, platform="onnxruntime_onnx")


def _spec(arg) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise Internal(f"ONNX tensor {arg.name}: unsupported type {arg.type}")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


def _to_ort(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.object_:
        # ONNX Runtime string tensors want str; BYTES elements are bytes.
        return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b), otypes=[object])(array)
    return array


def _from_ort(value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind in ("U", "O"):
        return np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else bytes(s), otypes=[object])(array)
    return array
