"""The one worker that owns the model: a bounded queue in front of a single Runtime.

A Runtime context serves one generation at a time, so every request becomes a :class:`Job`
in a bounded queue (full -> :class:`~agent.errors.QueueFull`, the API answers 429). The worker thread
tokenizes (never parsing special tokens out of user text), enforces the token limits, streams
:class:`~edgellm.runtime.TokenEvent` s to the job's sink and stops as soon as the job is
cancelled (client went away). A new model is swapped in between two jobs
(:meth:`Engine.swap`), so requests keep being served through an update.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.errors import QueueFull
from agent.lora_serving import select_adapter
from edgellm.runtime import GenerationParams, PromptTooLongError, Runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelHandle:
    runtime: Runtime
    name: str
    version: str
    slot: str | None = None
    kind: str = ""
    quantization: str | None = None
    defaults: dict = dataclasses.field(default_factory=dict)  # the bundle's generation defaults
    loaded_at: float = dataclasses.field(default_factory=time.time)
    adapters: Any = None  # agent.lora_serving.ServedAdapters: LoRA adapters served on this base

    @property
    def context_length(self) -> int:
        return int(self.runtime.context_length)

    def describe(self, adapter: str | None = None) -> dict:
        return {
            "model": self.name if adapter is None else f"{self.name}:{adapter}",
            "version": self.version,
            "slot": self.slot,
            "runtime": self.kind,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "adapter": adapter,
        }


@dataclasses.dataclass
class JobError:
    status: int
    code: str
    message: str
    type: str = "invalid_request_error"


Sink = Callable[[str, Any], None]  # ("start", dict) ("token", TokenEvent) ("done", dict) ("error", JobError)


class Job:
    def __init__(
        self,
        *,
        params: GenerationParams,
        sink: Sink,
        prompt: str | None = None,
        messages: Sequence[dict] | None = None,
        endpoint: str = "",
        clamp_max_tokens: bool = False,
        adapter: str | None = None,
    ) -> None:
        self.prompt = prompt
        self.adapter = adapter  # a LoRA adapter served on the base ("tiny:kitchen"), None: the base
        self.clamp_max_tokens = clamp_max_tokens  # max_tokens was a default: fit it to the context
        self.messages = messages
        self.params = params
        self.sink = sink
        self.endpoint = endpoint
        self.cancel = threading.Event()
        self.enqueued_at = time.monotonic()


class Engine:
    def __init__(
        self,
        *,
        queue_size: int = 8,
        max_prompt_tokens: int = 4096,
        metrics: Any = None,
        on_inference: Callable[..., None] | None = None,
    ) -> None:
        self.queue_size = queue_size
        self.max_prompt_tokens = max_prompt_tokens
        self.metrics = metrics
        self.on_inference = on_inference or (lambda **kw: None)
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._pending_swap: tuple[ModelHandle | None, threading.Event] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._model: ModelHandle | None = None
        self._busy = False
        self._current: Job | None = None
        self._avg_job_s = 1.0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgellm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._jobs:
                job.cancel.set()
            if self._current is not None:
                self._current.cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in list(self._jobs):
            job.sink("error", JobError(503, "shutting_down", "the agent is shutting down; retry later", "server_error"))
        self._jobs.clear()
        if self._model is not None:
            self._model.runtime.close()
            self._model = None

    # -- API used by the HTTP layer ----------------------------------------------------------------

    @property
    def model(self) -> ModelHandle | None:
        return self._model

    @property
    def queue_depth(self) -> int:
        return len(self._jobs) + (1 if self._busy else 0)

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._avg_job_s * (len(self._jobs) + 1))))

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull(5)
            if len(self._jobs) >= self.queue_size:
                raise QueueFull(self.retry_after())
            self._jobs.append(job)
            self._set_depth()
            self._cond.notify_all()

    def swap(self, handle: ModelHandle | None, *, timeout: float | None = 60.0) -> bool:
        """Make ``handle`` the served model between two jobs; the old runtime is closed."""
        done = threading.Event()
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._do_swap(handle)
                return True
            self._pending_swap = (handle, done)
            self._cond.notify_all()
        return done.wait(timeout)

    # -- worker -----------------------------------------------------------------------------------

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._jobs) + (1 if self._busy else 0))

    def _do_swap(self, handle: ModelHandle | None) -> None:
        old, self._model = self._model, handle
        if self.metrics is not None:
            self.metrics.set_model(handle)
        if old is not None and old is not handle:
            try:
                old.runtime.close()
            except Exception:
                log.exception("closing the previous runtime failed")
        log.info(
            "serving model",
            extra={"model": handle.name if handle else None, "version": handle.version if handle else None},
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self._pending_swap is None and not self._jobs:
                    self._cond.wait()
                if self._stopping:
                    return
                swap, job = self._pending_swap, None
                self._pending_swap = None
                if swap is None:
                    job = self._jobs.popleft()
                    self._busy = True
                    self._current = job
                self._set_depth()
            if swap is not None:
                self._do_swap(swap[0])
                swap[1].set()
                continue
            assert job is not None
            t0 = time.monotonic()
            try:
                self._serve(job)
            except Exception as e:
                log.exception("generation failed")
                job.sink("error", JobError(500, "generation_failed", f"generation failed: {e}", "server_error"))
            finally:
                self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.monotonic() - t0)
                with self._cond:
                    self._busy = False
                    self._current = None
                    self._set_depth()

    def _serve(self, job: Job) -> None:
        if job.cancel.is_set():
            return
        m = self._model
        if m is None:
            job.sink(
                "error", JobError(503, "model_not_loaded", "no model is installed on this device yet", "server_error")
            )
            return
        rt = m.runtime
        problem = select_adapter(m, job.adapter)
        if problem is not None:
            job.sink("error", JobError(404, "model_not_found", problem))
            return
        try:
            ids = (
                rt.chat_token_ids(job.messages)
                if job.messages is not None
                else rt.tokenize(job.prompt or "", add_bos=True, special=False)
            )
        except ValueError as e:
            job.sink("error", JobError(400, "invalid_request", str(e)))
            return
        n_prompt = len(ids)
        ctx = m.context_length
        if job.clamp_max_tokens and n_prompt < ctx and n_prompt + job.params.max_tokens > ctx:
            job.params = dataclasses.replace(job.params, max_tokens=ctx - n_prompt)
        if n_prompt > self.max_prompt_tokens or n_prompt + job.params.max_tokens > ctx:
            job.sink(
                "error",
                JobError(
                    400,
                    "context_length_exceeded",
                    f"prompt has {n_prompt} tokens and max_tokens is {job.params.max_tokens}; this model accepts "
                    f"{min(ctx, self.max_prompt_tokens + job.params.max_tokens)} in total and prompts of at most "
                    f"{min(self.max_prompt_tokens, ctx - 1)} tokens: shorten the prompt or lower max_tokens",
                ),
            )
            return
        job.sink("start", {"prompt_tokens": n_prompt, **m.describe(job.adapter)})
        t0 = time.perf_counter()
        first: float | None = None
        n = 0
        lp_sum, lp_n = 0.0, 0
        finish = None
        gen = rt.generate(ids, job.params)
        try:
            for ev in gen:
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
                if first is None:
                    first = time.perf_counter() - t0
                n += 1
                if ev.logprob is not None and math.isfinite(ev.logprob):
                    lp_sum += ev.logprob
                    lp_n += 1
                job.sink("token", ev)
                if ev.finish_reason:
                    finish = ev.finish_reason
        except PromptTooLongError as e:
            job.sink("error", JobError(400, "context_length_exceeded", str(e)))
            return
        finally:
            close = getattr(gen, "close", None)  # a generator: stop it (and free its native state) now
            if close is not None:
                close()
        dt = time.perf_counter() - t0
        decode_s = dt - (first or 0.0)
        tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else (n / dt if dt > 0 else 0.0)
        stats = {
            "prompt_tokens": n_prompt,
            "completion_tokens": n,
            "finish_reason": finish or "length",
            "duration_s": dt,
            "time_to_first_token_s": first,
            "tokens_per_second": tps,
            "mean_logprob": (lp_sum / lp_n) if lp_n else None,
            "model": m.name,
            "version": m.version,
        }
        if self.metrics is not None:
            self.metrics.observe_generation(stats)
        try:
            self.on_inference(
                latency_ms=dt * 1000.0,
                prompt_tokens=n_prompt,
                completion_tokens=n,
                tokens_per_second=tps,
                mean_logprob=stats["mean_logprob"],
                error=False,
            )
        except Exception:
            log.exception("telemetry hook failed")
        job.sink("done", stats)
