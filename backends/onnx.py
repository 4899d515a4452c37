"""ONNX Runtime in process.

Sessions run in a dedicated thread pool (``pool_threads``) so the event loop never blocks;
providers come from config, so the CUDA provider is configuration only. When a caller's deadline
passes during a run, the run is told to stop (``RunOptions.terminate``) and the caller gets
DEADLINE_EXCEEDED at once. A file whose variant names a ``sha256`` is hashed before ONNX Runtime
reads it (in the pool, off the loop) and refused with ``ArtifactRejected`` when the digest differs;
ONNX Runtime then loads the very bytes that were hashed (so such a model keeps its weights inside the
file, not in external data files).
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
        self._digests = dict(digests or {})
        """Expected SHA-256 (lower-case hex) per model path; a path not named here is not checked."""
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._pool: ThreadPoolExecutor | None = None

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
        self._sessions.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def load(self, model: str) -> ModelSignature:
        session = self._sessions.get(model)
        if session is None:
            if not Path(model).is_file():
                raise NotFound(f"ONNX model file not found: {model}")
            session = await asyncio.get_running_loop().run_in_executor(self._pool, self._open, model)
            self._sessions[model] = session
        return _signature(session)

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
        return self._sessions[model].get_providers()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        session = self._sessions.get(model)
        if session is None or self._pool is None:
            raise Internal(f"backend {self.name}: model {Path(model).name} is not loaded")
        remaining = self.remaining_s(deadline)
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the ONNX run started")
        feeds = {name: _to_ort(array) for name, array in inputs.items()}
        run_options = ort.RunOptions()
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, self._run, session, list(outputs), feeds, run_options
        )
        try:
            results = await asyncio.wait_for(asyncio.shield(future), remaining)
        except TimeoutError:
            run_options.terminate = True
            future.add_done_callback(_discard_outcome)
            raise DeadlineExceeded("deadline passed during the ONNX run") from None
        except asyncio.CancelledError:
            run_options.terminate = True
            future.add_done_callback(_discard_outcome)
            raise
        return {name: _from_ort(value) for name, value in zip(outputs, results)}

    @staticmethod
    def _run(session: ort.InferenceSession, outputs: list[str], feeds: dict, run_options: ort.RunOptions) -> list:
        try:
            return session.run(outputs, feeds, run_options)
        except Exception as exc:
            message = str(exc).splitlines()[0][:300]
            if type(exc).__name__ == "InvalidArgument":  # onnxruntime's pybind exception for bad feeds
                raise InvalidArgument(f"model rejected the input: {message}") from exc
            raise Internal(f"ONNX Runtime failed: {message}") from exc

    async def ready(self, model: str) -> bool:
        return self._pool is not None and model in self._sessions


def _discard_outcome(future: asyncio.Future) -> None:
    """Nobody awaits an abandoned run; take its result so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


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
