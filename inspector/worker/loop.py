"""`inspector run`: consume -> decode -> batch -> score -> publish -> ack, for months.

Threads, one job each:
- the broker thread (consumer.Consumer) owns the pika connection;
- a pool decodes and prepares captures (CPU), overlapping with inference;
- the scoring thread forms micro-batches per model version and runs the plugin on its device;
- the reloader takes up new model versions in the background.
Every capture is answered: a score, or an error result plus a dead letter. Nothing here
raises into a thread's loop: a bad frame or a failing batch becomes error results, a bug in
the loop itself becomes `internal_error` answers, and when even an error result cannot be
built the capture is handed to the broker's dead-lettering. A thread that dies or stops making
progress anyway is caught by the watchdog: /healthz fails and the process exits 1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from inspector import __version__
from inspector.config import Settings
from inspector.devices import describe_device, resolve_device
from inspector.errors import FrameError, InspectorError
from inspector.messages import (
    Capture,
    encode,
    frame_id_for,
    parse_capture,
    printable,
    result_body,
    result_routing_key,
)
from inspector.plugin import decode_size
from inspector.stores import Store, open_store
from inspector.timestamps import utc_now
from inspector.worker.batcher import Batcher
from inspector.worker.consumer import Consumer, Delivery, Outcome
from inspector.worker.decode import DecodeLimits, decode_capture_kind
from inspector.worker.evidence import Evidence
from inspector.worker.hooks import StageHooks, staged, tell, timed, watch, watched
from inspector.worker.ledger import Ledger
from inspector.worker.locate import frame_regions
from inspector.worker.metrics import Metrics, configured_label_values
from inspector.worker.sdnotify import Notifier
from inspector.worker.serving import ModelSet, Reloader, ServedModel, explain_batch
from inspector.worker.watchdog import Watchdog

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 64 * 1024  # an announcement is a few hundred bytes; anything larger is not one
CONSUMING_LIMIT_S = 60.0  # connected, under budget and taking no captures this long: a bug, made loud
EXIT_MARGIN_S = 15.0  # an unhealthy worker that has not exited this long after its grace period is ended


class WorkerUnhealthy(InspectorError):
    """A core thread died or stopped making progress: exit so that the supervisor restarts the worker."""

    code = "worker_unhealthy"


@dataclass(frozen=True)
class _Record:
    """What the metrics need of a frame once its result is confirmed."""

    line: str
    camera: str
    model: str
    verdict: str
    probability: float | None
    reason: str | None
    captured_at: float  # seconds since the epoch; the receipt time when the camera sent none
    queue_wait_s: float | None
    redelivered: bool


@dataclass(eq=False)
class _Prepared:
    delivery: Delivery
    capture: Capture
    model: ServedModel
    tensor: torch.Tensor
    size: tuple[int, int] | None = None  # (width, height) as decoded: where an anomaly map is drawn


ConsumerFactory = Callable[..., Any]  # called as Consumer is: (settings, on_delivery, on_settled, on_control,
# on_connection, *, on_unroutable, on_budget, on_refused, hooks); consumer.Consumer or stubconsumer.StubConsumer


class Worker:
    """The running worker. `start()` loads models and connects; `stop()` drains and closes.

    Built from its parts, each given or else made from `settings` as `inspector run` makes it: the consumer
    (`consumer_factory`, called with the worker's callbacks; stubconsumer.StubConsumer runs it without a
    broker), the model store, the device, the evidence archive, the watchdog, the decode pool, and the stage
    `hooks` a profiler or a test watches the frame path through (hooks.py; None: nobody watches)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, *,
                 consumer_factory: ConsumerFactory = Consumer, store: Store | None = None,
                 device: torch.device | None = None, evidence: Evidence | None = None,
                 watchdog: Watchdog | None = None, decoders: Executor | None = None,
                 hooks: StageHooks | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.metrics)
        self.hooks = hooks
        watch(self, hooks)  # before the consumer is given the callbacks: they are stages too
        self._parse_capture = watched(hooks, "parse", parse_capture)
        self._decode_capture = watched(hooks, "decode", decode_capture_kind)
        self._explain_batch = watched(hooks, "score", explain_batch)
        self.device = device if device is not None else resolve_device(settings.device)
        self.store = store if store is not None else open_store(settings.store)
        self.models = ModelSet(settings.models, settings.default_model, settings.worker.routes)
        self.limits = DecodeLimits.from_settings(settings.worker)
        threads = settings.worker.decode_threads or max(1, os.cpu_count() or 1)
        self._decoders = decoders or ThreadPoolExecutor(threads, thread_name_prefix="inspector-decode")
        self._prepared: queue.Queue[_Prepared | None] = queue.Queue()
        self._scorer = threading.Thread(target=self._score_loop, name="inspector-score", daemon=True)
        self._reloader = Reloader(self.store, self.models, self.device, settings.worker.store_poll_s,
                                  on_loaded=self._model_in_service, on_outcome=self.metrics.model_reload,
                                  plugin_settings=settings.plugin_settings)
        self.consumer = consumer_factory(settings, self._on_delivery, self._on_settled, self._on_control,
                                         self._on_connection, on_unroutable=self.metrics.result_unroutable,
                                         on_budget=self._on_budget, on_refused=self.metrics.result_refused,
                                         hooks=hooks)
        for name in settings.models:
            self.metrics.expect_model(name)
        for label, values in configured_label_values(settings).items():
            self.metrics.reserve(label, values)  # named in the configuration: never pushed into "other"
        self._decoding = 0  # received and not yet prepared: the batcher waits for these
        self._decoding_lock = threading.Lock()
        self._decodes: dict[int, float] = {}  # decode thread -> when its capture's decode began (monotonic)
        self._said_unlike_fit: set[tuple[str, str, str]] = set()  # (model, version, decode kind) warned of
        self._scoring = False  # a batch is being scored now
        self.scored = 0
        self.watchdog = watchdog or Watchdog()
        limit = settings.worker.watchdog_s
        self.watchdog.watch("broker", self.consumer.is_alive, lambda: not self.consumer.stopped.is_set(),
                            limit_s=min(limit, 60.0), progress=lambda: self.consumer.last_tick)
        self.watchdog.watch("scoring", self._scorer.is_alive,
                            lambda: self._scoring or self._prepared.qsize() > 0, limit_s=limit)
        self.watchdog.watch("decode", lambda: True, lambda: bool(self._decodes), limit_s=limit,
                            progress=self._oldest_decode)  # each decode on its own clock: one hung read is seen
        self.watchdog.watch("consuming", lambda: True, lambda: self.consumer.stuck_for() > 0, limit_s=CONSUMING_LIMIT_S,
                            progress=lambda: time.monotonic() - self.consumer.stuck_for())
        self._reloader.watch(self.watchdog, limit)
        self.metrics.models_problem = self._reloader.describe_problems
        self.evidence = evidence or Evidence(settings.evidence, self.metrics)
        self.evidence.watch(self.watchdog, limit)
        self.metrics.health = lambda: self.watchdog.problem
        self.metrics.thread_stalls = self.watchdog.stalls

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, cancel: threading.Event | None = None) -> None:
        """Load every model's current version (or its last good one), start the threads and connect; raises
        InspectorError when RabbitMQ cannot be reached within worker.start_timeout_s. Returns early,
        unconnected, when `cancel` is set (a signal while waiting for the broker)."""
        self._load_models()
        self._scorer.start()
        self._reloader.start()
        self.evidence.start()
        self.consumer.start()
        self.watchdog.start()
        while not self.consumer.connected.wait(0.1):
            if cancel is not None and cancel.is_set():
                return
            if self.consumer.stopped.is_set():
                self._stop_threads()
                raise self.consumer.failure or InspectorError("the broker thread stopped before connecting")
        log.info("worker %s ready: queue %s bound to %s (%s); batches of up to %d, waiting %g ms at most",
                 __version__, self.settings.worker.queue, self.settings.broker.exchanges.captures,
                 ", ".join(self.settings.worker.binding_keys), self.settings.worker.batch_size,
                 self.settings.worker.max_batch_wait_ms)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking captures, finish and confirm those held, close; returns within the grace period."""
        grace = self.settings.worker.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        log.info("stopping: finishing %d held captures (grace %g s)", self.consumer.ledger.frames, grace)
        self.watchdog.stop()
        self.consumer.stop_consuming(max(0.0, grace - 1.0))
        self.consumer.stopped.wait(grace)
        self._stop_threads(deadline)
        log.info("stopped")

    def wait(self, stop: threading.Event) -> None:
        """Block until `stop` is set, the broker thread gives up, or the watchdog finds the worker unhealthy."""
        while not stop.wait(0.5):
            if self.watchdog.problem is not None:
                raise WorkerUnhealthy(f"unhealthy: {self.watchdog.problem}")
            if self.consumer.stopped.is_set():
                raise self.consumer.failure or WorkerUnhealthy("the broker thread stopped")

    def _stop_threads(self, deadline: float | None = None) -> None:
        """Stop the scoring, decoding and reload threads, within `deadline` (time.monotonic) when given."""
        def left() -> float:
            return 10.0 if deadline is None else max(0.1, deadline - time.monotonic())

        self.watchdog.stop()
        self._prepared.put(None)
        self._decoders.shutdown(wait=False, cancel_futures=True)
        self._scorer.join(timeout=left())
        self._reloader.stop(timeout=left())
        self.evidence.stop(timeout=left())

    def _load_models(self) -> None:
        """Put each model's current version in service, or its last good one (serving.Reloader.load_at_start).
        A model with none does not stop the worker: it starts, /readyz says why while no model serves, that
        model's frames are answered `model_unavailable`, and the reloader takes up a good version when one
        appears. Exiting instead would only restart into the same refusal, for ever."""
        for name in self.settings.models:
            self._reloader.load_at_start(name)
            if self.models.get(name) is None:
                log.error("model %s: no version can serve (%s): its frames get model_unavailable errors until a "
                          "good version is stored (`inspector refit --model %s`, or `inspector models rollback`)",
                          name, self._reloader.problems.get(name, "no version in the store"), name,
                          extra={"model": name})
        in_service = self.models.in_service()
        if not in_service:
            log.error("no model can serve from the store at %s: the worker runs not ready until one can "
                      "(models configured: %s)", self.store.root, ", ".join(sorted(self.settings.models)))
        for served in in_service:
            log.info("model %s: %s version %s on %s, threshold %g", served.name, served.plugin_name,
                     served.version, describe_device(self.device), served.threshold,
                     extra={"model": served.name, "version": served.version})

    def _model_in_service(self, served: ServedModel) -> None:
        self.metrics.set_model(served.name, served.plugin_name, served.version, served.threshold)

    # -- broker-thread callbacks (quick, never block) ------------------------------------------

    @staged("hand-off")
    def _on_delivery(self, delivery: Delivery) -> None:
        self._count_decoding(+1)
        try:
            self._decoders.submit(self._decode, delivery)
        except BaseException:
            self._count_decoding(-1)
            raise

    def _on_budget(self, ledger: Ledger) -> None:
        """The consumer's books changed: what is held, and whether consuming is paused, in the metrics."""
        self.metrics.set_inflight(ledger.frames)
        self.metrics.set_inflight_bytes(ledger.bytes)
        self.metrics.set_consumer_paused(self.consumer.pause_reason())

    def _on_connection(self, connected: bool) -> None:
        tell(self.hooks, "connection", connected, self.consumer.generation)
        self.metrics.set_broker_connected(connected)
        if connected:
            if self.consumer.generation > 1:
                self.metrics.broker_reconnected()
            self._reloader.request_all()  # announcements missed while away

    def _on_control(self, routing_key: str, body: bytes) -> None:
        """An announcement only says "look at the store": the store's current version is what loads, so a
        forged or garbled message can at most cause a needless look."""
        where = printable(routing_key)
        if len(body) > MAX_CONTROL_BYTES:
            log.warning("ignoring a control message of %d bytes on %s: an announcement is far smaller", len(body),
                        where)
            return
        try:
            message = json.loads(body)
            name = message["model"]
            if not isinstance(name, str):
                raise TypeError("model is not a string")
        except Exception as exc:  # noqa: BLE001 - ValueError, KeyError, TypeError, RecursionError: all ignored
            log.warning("ignoring a malformed announcement on %s: %s", where, printable(repr(exc)))
            return
        if name not in self.settings.models:
            log.info("announcement for model %s, which this worker does not serve; ignored", printable(name),
                     extra={"model": printable(name)})
            return
        log.info("announcement: model %s version %s (%s)", name, printable(str(message.get("version"))),
                 printable(str(message.get("reason"))),
                 extra={"model": name, "version": printable(str(message.get("version")))})
        self._reloader.request(name)

    @staged("settled")
    def _on_settled(self, outcome: Outcome, acked: bool) -> None:
        if not acked:
            return
        record: _Record | None = outcome.record
        if record is None:
            self.metrics.frame_error("internal_error")
            self.metrics.dead_lettered("internal_error")
            return
        now = time.time()
        self.metrics.stage("publish", time.perf_counter() - outcome.submitted_at)
        self.metrics.frame_done(
            line=record.line, camera=record.camera, model=record.model, verdict=record.verdict,
            probability=record.probability, latency_s=now - record.captured_at,
            queue_wait_s=record.queue_wait_s, redelivered=record.redelivered,
        )
        if record.reason is not None:
            self.metrics.frame_error(record.reason)
            self.metrics.dead_lettered(record.reason)

    def _count_decoding(self, delta: int) -> None:
        with self._decoding_lock:
            self._decoding += delta

    def _oldest_decode(self) -> float:
        """When the longest-running decode now began (its thread's last progress); now when none runs."""
        return min(list(self._decodes.values()), default=time.monotonic())  # list(): one atomic copy

    # -- decode threads ----------------------------------------------------------------------

    def _decode(self, delivery: Delivery) -> None:
        thread = threading.get_ident()
        self._decodes[thread] = time.monotonic()
        try:
            self._decode_one(delivery)
        except BaseException as exc:  # noqa: BLE001 - a decode task must answer its capture, whatever happens
            log.exception("decoding a capture failed outside every guard")
            self._answer_error(delivery, None, "internal_error", f"unexpected failure: {exc!r}")
        finally:
            self._decodes.pop(thread, None)
            self._count_decoding(-1)

    def _decode_one(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        try:
            capture = self._parse_capture(delivery.routing_key, delivery.properties, delivery.body,
                                          delivery.redelivered)
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave the frame unanswered
            log.exception("parsing a capture on %s failed", printable(delivery.routing_key))
            self._answer_error(delivery, None, "internal_error", f"the capture could not be parsed: {exc!r}")
            return
        undecodable = getattr(delivery.properties, "decode_error", None)
        if undecodable is not None:
            self._answer_error(delivery, capture, "headers_undecodable",
                               f"its AMQP properties cannot be decoded ({undecodable}); resend it with plain headers")
            return
        model = None
        try:
            self._check_age(capture)
            model = self.models.choose(capture)
            image, decoded = self._decode_capture(capture.body, capture.content_type, capture.headers, self.limits,
                                                  decode_size(model.plugin))
            if model.fitted_decodes is not None and decoded not in model.fitted_decodes:
                self._unlike_fit(model, decoded)
            try:
                hooks = self.hooks
                tensor = model.plugin.prepare(image) if hooks is None else timed(hooks, "prepare", model.plugin.prepare,
                                                                                 image)
            except Exception as exc:  # noqa: BLE001 - a plugin's failure on one frame is that frame's error
                raise FrameError("scoring_failed", f"{model.plugin_name} could not prepare the image: {exc}") from exc
        except FrameError as exc:
            self._answer_error(delivery, capture, exc.code, str(exc), model)
            return
        except Exception as exc:  # noqa: BLE001 - never lose a frame to a bug: answer it and log loudly
            log.exception("frame %s: unexpected failure while decoding", capture.frame_id,
                          extra={"frame_id": capture.frame_id, "line": capture.line_id, "camera": capture.camera_id})
            self._answer_error(delivery, capture, "image_undecodable", f"unexpected failure: {exc!r}", model)
            return
        self.metrics.stage("decode", time.perf_counter() - started)
        self._prepared.put(_Prepared(delivery, capture, model, tensor, (image.shape[1], image.shape[0])))

    def _unlike_fit(self, model: ServedModel, decoded: str) -> None:
        """A frame decoded as no image of its version's fit was: counted, and said once per version and kind.
        It is scored (the line keeps moving) but its verdict is not calibrated: a line that sends PNG to a
        model fitted on JPEG frames rejected 66% of its good parts in bench/components_calibration.py."""
        self.metrics.frame_unlike_fit(model.name, decoded)
        said = (model.name, model.version, decoded)
        if said in self._said_unlike_fit:
            return
        self._said_unlike_fit.add(said)
        fitted = " and ".join(sorted(model.fitted_decodes or ()))
        log.warning("model %s version %s was fitted on %s-decoded images only, but frames arrive that decode %s "
                    "(%s): their scores are not the ones it was calibrated on, expect false rejects; refit from "
                    "frames as the cameras send them, or send the format it was fitted on",
                    model.name, model.version, fitted, decoded,
                    "a JPEG" if decoded == "jpeg" else "in full: PNG, BMP, TIFF, WebP or raw pixels",
                    extra={"model": model.name, "version": model.version})

    def _check_age(self, capture: Capture) -> None:
        limit = self.settings.worker.max_frame_age_s
        if limit <= 0 or capture.captured_at is None:
            return
        age = time.time() - capture.captured_at.timestamp()
        if age > limit:
            raise FrameError("stale", f"captured {age:.1f} s ago, over worker.max_frame_age_s ({limit:g} s); "
                                      "not scored")

    def _answer_error(self, delivery: Delivery, capture: Capture | None, code: str, message: str,
                      model: ServedModel | None = None) -> None:
        """An error result and a dead letter for the capture; never raises. `capture` None: it could not be
        parsed. When even this answer cannot be built, the broker dead-letters the capture untouched."""
        try:
            outcome = self._error_outcome(delivery, capture, code, message, model)
        except Exception:  # noqa: BLE001
            log.exception("building the error result of a capture failed; the broker dead-letters it as it came")
            outcome = Outcome(delivery=delivery, routing_key="", result=None,
                              frame_id=capture.frame_id if capture is not None else "unknown")
        self.consumer.submit([outcome])

    def _error_outcome(self, delivery: Delivery, capture: Capture | None, code: str, message: str,
                       model: ServedModel | None) -> Outcome:
        if capture is None:
            capture = Capture(frame_id=frame_id_for(delivery.body), line_id="unknown", camera_id="unknown",
                              model=None, routing_key="unknown.unknown", content_type=None, headers={}, body=b"",
                              captured_at=None, redelivered=delivery.redelivered)
        message = printable(message)
        log.warning("frame %s from %s.%s: %s: %s", capture.frame_id, capture.line_id, capture.camera_id, code, message,
                    extra={"frame_id": capture.frame_id, "line": capture.line_id, "camera": capture.camera_id,
                           "error_code": code, **({"model": model.name, "version": model.version} if model else {})})
        inspected_at = utc_now()
        kept = self.evidence.ticket(capture, "error", inspected_at, delivery.body)
        routing_key, result = self._result(capture, verdict="error", error=(code, message), inspected_at=inspected_at,
                                           model=model.identity() if model else None,
                                           threshold=model.threshold if model else None, evidence=kept and kept.where)
        outcome = Outcome(
            delivery=delivery, routing_key=routing_key, result=result, frame_id=capture.frame_id,
            dead_letter=(code, message),
            record=self._record(delivery, capture, model.name if model else "none", "error",
                                None, code, None),
        )
        if kept is not None:
            kept.send(outcome.result)
        return outcome

    @staged("result encode")
    def _result(self, capture: Capture, verdict: str, **fields: Any) -> tuple[str, bytes]:
        """A result's routing key and its encoded body (messages.result_body has the fields)."""
        body = result_body(capture, verdict=verdict, **fields)
        return result_routing_key(verdict, capture.line_id, capture.camera_id), encode(body)

    def _record(self, delivery: Delivery, capture: Capture, model: str, verdict: str, probability: float | None,
                reason: str | None, queue_wait_s: float | None) -> _Record:
        captured = capture.captured_at.timestamp() if capture.captured_at else delivery.received_at
        return _Record(line=capture.line_id, camera=capture.camera_id, model=model, verdict=verdict,
                       probability=probability, reason=reason, captured_at=captured, queue_wait_s=queue_wait_s,
                       redelivered=capture.redelivered)

    # -- the scoring thread ----------------------------------------------------------------------

    def _score_loop(self) -> None:
        worker = self.settings.worker
        batcher = Batcher(worker.batch_size, worker.max_batch_wait_ms / 1000, worker.max_batch_hold_ms / 1000)
        while True:
            self.watchdog.beat("scoring")
            try:
                if not self._score_step(batcher):
                    return
            except Exception as exc:  # noqa: BLE001 - the loop outlives its own bugs; what it held is answered
                log.exception("the scoring loop failed; answering the frames it held")
                for batch in batcher.drain():
                    for prepared in batch:
                        self._answer_error(prepared.delivery, prepared.capture, "internal_error",
                                           f"unexpected failure: {exc!r}", prepared.model)

    def _score_step(self, batcher: Batcher) -> bool:
        """Wait for a frame or a batch deadline, then score what is due; False once told to stop."""
        deadline = batcher.next_deadline(self._decoding > 0)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if timeout is None:
            timeout = self.settings.worker.watchdog_s / 4  # idle: wake now and then to beat
        try:
            item = self._prepared.get(timeout=timeout)
        except queue.Empty:
            item = False
        if item is None:
            for batch in batcher.drain():
                self._score_safely(batch)
            return False
        batches = batcher.due(time.monotonic(), self._decoding > 0)
        if item:
            full = batcher.add(id(item.model), item, time.monotonic())
            if full:
                batches.append(full)
        for batch in batches:
            self._score_safely(batch)
        return True

    def _score_safely(self, batch: list[_Prepared]) -> None:
        """The scoring thread must outlive any bug: a batch that fails outside the plugin is answered
        with errors (and dead letters, to replay), never left unanswered."""
        self._scoring = True
        answered: set[int] = set()  # the batch's deliveries already handed over (by id), never answered twice
        try:
            self._score(batch, answered)
        except Exception as exc:  # noqa: BLE001
            log.exception("scoring a batch of %d failed outside the plugin", len(batch))
            for prepared in batch:
                if id(prepared.delivery) in answered:
                    continue
                self._answer_error(prepared.delivery, prepared.capture, "internal_error",
                                   f"unexpected failure: {exc!r}", prepared.model)
        finally:
            self._scoring = False
            self.watchdog.beat("scoring")

    def _score(self, batch: list[_Prepared], answered: set[int]) -> None:
        """Score one batch and hand its results to the broker thread, noting in `answered` each delivery handed
        over (the results of frames that want no regions go first, so they never wait for a batch-mate's map)."""
        generation = self.consumer.generation
        stale = [p for p in batch if p.delivery.generation != generation]
        if stale:  # from a lost connection: the broker redelivers them, so scoring them now is wasted
            self.consumer.submit([Outcome(p.delivery, "", b"", p.capture.frame_id) for p in stale])
            answered.update(id(p.delivery) for p in stale)
            batch = [p for p in batch if p.delivery.generation == generation]
            if not batch:
                return
        model = batch[0].model
        started = time.perf_counter()
        waits = [self._queue_wait(p) for p in batch]
        keep_maps, locate = self.evidence.wants_maps, model.region_level is not None
        probability, raw, failures, maps = self._explain_batch(model, [p.tensor for p in batch],  # drawn only if asked
                                                               functools.partial(stack_for, self.device),
                                                               maps=keep_maps or locate)
        self.metrics.stage("infer", time.perf_counter() - started)
        self.metrics.batch(model.name, len(batch))
        inspected_at = utc_now()
        outcomes, located = [], []
        for prepared, p, r, failure, wait, draw in zip(batch, probability, raw, failures, waits, maps):
            if failure is not None:
                self._answer_error(prepared.delivery, prepared.capture, "scoring_failed", failure, model)
                answered.add(id(prepared.delivery))
                continue
            verdict = "fail" if p >= model.threshold else "pass"
            scored = (prepared, verdict, float(p), float(r), wait, draw)
            if locate and verdict in model.region_verdicts and draw is not None and prepared.size is not None:
                located.append(scored)
            else:
                outcomes.append(self._outcome(model, inspected_at, keep_maps, *scored, regions=None))
        self.scored += len(outcomes) + len(located)
        if outcomes:  # before any region is drawn: a frame that wants none never waits for a batch-mate's map
            self.consumer.submit(outcomes)
            answered.update(id(outcome.delivery) for outcome in outcomes)
        drawn = []
        for prepared, verdict, probability, raw, wait, draw in located:
            regions = frame_regions(draw, model.region_level, prepared.delivery.body, prepared.size,
                                    prepared.capture.frame_id)
            drawn.append(self._outcome(model, inspected_at, keep_maps, prepared, verdict, probability, raw, wait, draw,
                                       regions=regions))
        if drawn:
            self.consumer.submit(drawn)

    def _outcome(self, model: ServedModel, inspected_at: str, keep_maps: bool, prepared: _Prepared, verdict: str,
                 probability: float, raw: float, wait: float | None, draw: Callable | None,
                 regions: list[dict] | None) -> Outcome:
        """One scored frame's outcome: its result (with its regions, when drawn) and its evidence ticket."""
        capture = prepared.capture
        kept = self.evidence.ticket(capture, verdict, inspected_at, prepared.delivery.body,
                                    draw if keep_maps else None, prepared.size)
        routing_key, result = self._result(capture, verdict=verdict, probability=probability, score=raw,
                                           threshold=model.threshold, model=model.identity(),
                                           inspected_at=inspected_at, evidence=kept and kept.where, regions=regions)
        outcome = Outcome(delivery=prepared.delivery, routing_key=routing_key, result=result,
                          frame_id=capture.frame_id,
                          record=self._record(prepared.delivery, capture, model.name, verdict, probability, None, wait))
        if kept is not None:
            kept.send(outcome.result)
        return outcome

    @staticmethod
    def _queue_wait(prepared: _Prepared) -> float | None:
        captured = prepared.capture.captured_at
        if captured is None:
            return None
        return time.time() - captured.timestamp()  # a negative or absurd age: Metrics.frame_done sorts it out


def stack_for(device: torch.device, tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch tensor; for CUDA in page-locked memory, so the plugin's `.to(device, non_blocking=True)`
    is a real asynchronous copy instead of a staged, synchronous one."""
    if device.type != "cuda":
        return torch.stack(tensors)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    return torch.stack(tensors, out=out)


def _exit_hard_after(seconds: float) -> None:
    """End the process if an orderly exit has not happened within `seconds`: a thread stuck in a native
    call (a hung GPU, a decoder in a loop) would otherwise keep an unhealthy worker alive for ever."""
    def end() -> None:
        log.critical("the worker did not stop within %.0f s of becoming unhealthy; ending the process", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


def run_worker(settings: Settings) -> int:
    """The `inspector run` command: serve until SIGTERM or SIGINT, then drain and exit 0.

    A second signal cuts the grace period short; captures not yet settled are redelivered.
    """
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            log.warning("second %s: closing now; unsettled captures will be redelivered", signal.Signals(signum).name)
            worker.consumer.close_now()
        else:
            log.info("%s received", signal.Signals(signum).name)
        stop.set()

    metrics = Metrics(settings.metrics)
    worker = Worker(settings, metrics)
    systemd = Notifier.from_environment(os.environ)  # Type=notify and WatchdogSec under systemd; else inert
    worker.watchdog.on_healthy = systemd.watchdog
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if settings.metrics.enabled:
            metrics.serve()
        worker.start(cancel=stop)
        if not stop.is_set():
            systemd.ready(f"serving: consuming {settings.worker.queue}")
        try:
            worker.wait(stop)
        except WorkerUnhealthy as exc:
            grace = min(settings.worker.shutdown_grace_s, 10.0)
            _exit_hard_after(grace + EXIT_MARGIN_S)
            systemd.stopping(f"stopping: {exc}")
            worker.stop(grace_s=grace)
            raise
        else:
            systemd.stopping("stopping: finishing the captures held")
            worker.stop()
    finally:
        metrics.close()
        systemd.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0

