"""Prometheus metrics read from the task store at scrape time.

Workers are other processes (maybe other machines); the database is what they share, so every value
comes from it and is the same whichever API replica is scraped (scrape one, or use max() across them):
- gauges: tasks queued, tasks by status and tool, finished tasks by outcome and tool, alive workers by state;
- histograms built from the recorded task events, by tool: seconds per denoising step, seconds to make one
  video (task_start to a successful task_postprocess_end), seconds waiting in the queue. Events are read
  incrementally (those newer than the last one read, plus ids seen skipped that a slower transaction may
  still commit), at most `MAX_EVENTS_PER_SCRAPE` per scrape.

The `tool` label is a catalogue slug (`codexq/Particalize`, ...), or `other` for a task of a tool the catalogue no
longer has: its values are bounded by the catalogue, never by what is stored. The queue depth and the running count
stay totals (what an autoscaler reads); `sum without (tool)` gives the others' totals.

GPU memory is not exported: workers do not record it in the workers table.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.store import Store
from server.store.models import ACCEPT, CANCEL, OUTPUT, POSTPROCESS_END, QUEUED, RUNNING, START, TaskEvent
from server.store.reads import TaskReads

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
VIDEO_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400, 3600)
WAIT_BUCKETS = (0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600)
MAX_EVENTS_PER_SCRAPE = 50_000
BATCH = 5_000
GAP_PATIENCE_SECONDS = 30.0
MAX_GAPS = 1_000
ALIVE_STATES = ("loading", "ready", "busy", "paused")


class WeightedHistogram:
    """A cumulative histogram that takes an observation `times` times at once (k steps that shared one
    interval all took its average)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def cumulative(self) -> list[tuple[str, float]]:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        return cumulative


OTHER_TOOL = "other"
"""The label of a task whose tool is not in the catalogue (it changed since the task was run)."""


class ToolLabels:
    """The `tool` label's values: the catalogue's slugs, anything else `other` (bounded cardinality)."""

    def __init__(self, slugs: Sequence[str]) -> None:
        self.slugs = tuple(slugs)
        self._known = frozenset(self.slugs)

    def of(self, tool: str | None) -> str:
        return tool if tool in self._known else OTHER_TOOL


class ToolHistograms:
    """One WeightedHistogram per tool label, made when a tool first observes (every catalogue slug is shown)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = buckets
        self.by_tool: dict[str, WeightedHistogram] = {}

    def observe(self, tool: str, value: float, times: int = 1) -> None:
        if tool not in self.by_tool:
            self.by_tool[tool] = WeightedHistogram(self.buckets)
        self.by_tool[tool].observe(value, times)

    @property
    def count(self) -> int:
        return sum(h.count for h in self.by_tool.values())

    @property
    def sum(self) -> float:
        return sum(h.sum for h in self.by_tool.values())

    def family(self, name: str, documentation: str, labels: ToolLabels) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=["tool"])
        for tool in dict.fromkeys([*labels.slugs, *self.by_tool]):
            histogram = self.by_tool.get(tool) or WeightedHistogram(self.buckets)
            family.add_metric([tool], histogram.cumulative(), sum_value=histogram.sum)
        return family


class EventTimings:
    """Durations from the task events, read incrementally; per-task state is kept only while a task runs."""

    def __init__(self, labels: ToolLabels | None = None) -> None:
        self.labels = labels or ToolLabels(())
        self.cursor = 0
        self.gaps: dict[int, float] = {}
        self.queued_at: dict[int, float] = {}
        self.started_at: dict[int, float] = {}
        self.last_step: dict[int, tuple[float, int]] = {}
        self.step = ToolHistograms(STEP_BUCKETS)
        self.video = ToolHistograms(VIDEO_BUCKETS)
        self.queue_wait = ToolHistograms(WAIT_BUCKETS)
        self.lock = threading.Lock()

    def update(self, store: TaskReads, now: float) -> None:
        """Take the events recorded since the last update (at most MAX_EVENTS_PER_SCRAPE; the rest next time)."""
        with self.lock:
            self.gaps = {i: seen for i, seen in self.gaps.items() if now - seen < GAP_PATIENCE_SECONDS}
            read = 0
            while read < MAX_EVENTS_PER_SCRAPE:
                events = store.events_after(self.cursor, BATCH, also_ids=list(self.gaps))
                tools = store.tools_of({event.task_id for event in events})
                for event in events:
                    if event.id > self.cursor:
                        self._note_gap(event.id, now)
                        self.cursor = event.id
                    elif self.gaps.pop(event.id, None) is None:
                        continue
                    self._take(event, self.labels.of(tools.get(event.task_id)))
                read += len(events)
                if len(events) < BATCH:
                    return

    def _note_gap(self, event_id: int, now: float) -> None:
        """Ids skipped between the cursor and `event_id` may belong to a transaction not committed yet."""
        if self.cursor and event_id > self.cursor + 1:
            for missing in range(self.cursor + 1, min(event_id, self.cursor + 1 + MAX_GAPS)):
                if len(self.gaps) < MAX_GAPS:
                    self.gaps[missing] = now

    def _take(self, event: TaskEvent, tool: str) -> None:
        task = event.task_id
        if event.status == QUEUED:
            self.queued_at[task] = event.at
            self.started_at.pop(task, None)
            self.last_step.pop(task, None)
        elif event.status == ACCEPT:
            queued = self.queued_at.pop(task, None)
            if queued is not None:
                self.queue_wait.observe(tool, max(0.0, event.at - queued))
        elif event.status == START:
            self.started_at[task] = event.at
            self.last_step[task] = (event.at, 0)
        elif event.status == OUTPUT:
            step, previous = event.step, self.last_step.get(task)
            if step is not None and event.total and previous is not None and step > previous[1]:
                done = step - previous[1]
                self.step.observe(tool, max(0.0, event.at - previous[0]) / done, done)
                self.last_step[task] = (event.at, step)
        elif event.status in (POSTPROCESS_END, CANCEL):
            started = self.started_at.pop(task, None)
            if event.status == POSTPROCESS_END and started is not None and _succeeded(event.message):
                self.video.observe(tool, max(0.0, event.at - started))
            self.last_step.pop(task, None)
            self.queued_at.pop(task, None)


def _succeeded(message: str) -> bool:
    """task_postprocess_end events say "pexit 0" on success, "pexit N: reason" otherwise."""
    return message.split(":")[0].strip() == "pexit 0"


OUTCOMES = ("succeeded", "failed", "cancelled")


def outcome_counts(counts: dict[tuple[str, str, str], int], labels: ToolLabels) -> dict[tuple[str, str], int]:
    """Finished tasks by (outcome, tool): succeeded (pexit 0), failed (any other pexit), cancelled (cancelled or
    killed); every catalogue tool's three outcomes are there, at 0 when none."""
    found = {(outcome, tool): 0 for tool in labels.slugs for outcome in OUTCOMES}
    for (status, pexit, tool), count in counts.items():
        outcome = {POSTPROCESS_END: "succeeded" if pexit == "0" else "failed", CANCEL: "cancelled"}.get(status)
        if outcome is not None:
            key = (outcome, labels.of(tool))
            found[key] = found.get(key, 0) + count
    return found


class StoreCollector(Collector):
    def __init__(self, store: Store, tools: Sequence[str] = (), clock: Callable[[], float] = time.time) -> None:
        """`tools`: the catalogue's slugs, the `tool` label's values (any other tool is `other`)."""
        self.store = store
        self.clock = clock
        self.labels = ToolLabels(tools)
        self.timings = EventTimings(self.labels)

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        counts = self.store.reads.status_counts()
        by_status: dict[str, int] = {}
        by_status_tool: dict[tuple[str, str], int] = {}
        for (status, _pexit, tool), count in counts.items():
            by_status[status] = by_status.get(status, 0) + count
            key = (status, self.labels.of(tool))
            by_status_tool[key] = by_status_tool.get(key, 0) + count

        yield GaugeMetricFamily("particalize_queue_depth", "Tasks waiting in the queue (task_queue), all tools.",
                                value=by_status.get(QUEUED, 0))
        yield GaugeMetricFamily("particalize_tasks_running", "Tasks owned by a worker (task_accept up to "
                                "task_postprocess_start), all tools.", value=sum(by_status.get(s, 0) for s in RUNNING))
        status_family = GaugeMetricFamily("particalize_tasks", "Tasks by current status and tool.",
                                          labels=["status", "tool"])
        for (status, tool), count in sorted(by_status_tool.items()):
            status_family.add_metric([status, tool], count)
        yield status_family
        finished = GaugeMetricFamily(
            "particalize_tasks_finished", "Finished tasks by outcome and tool (only grows while tasks are kept).",
            labels=["outcome", "tool"],
        )
        for (outcome, tool), count in outcome_counts(counts, self.labels).items():
            finished.add_metric([outcome, tool], count)
        yield finished
        yield self._workers(now)

        self.timings.update(self.store.reads, now)
        yield self.timings.step.family("particalize_step_seconds", "Seconds per denoising step, by tool.",
                                       self.labels)
        yield self.timings.video.family(
            "particalize_video_seconds", "Seconds from task_start to a successful task_postprocess_end: making "
            "one video (denoising, decoding, encoding, storing), by tool.", self.labels)
        yield self.timings.queue_wait.family("particalize_queue_wait_seconds",
                                             "Seconds from task_queue to task_accept, by tool.", self.labels)

    def _workers(self, now: float) -> GaugeMetricFamily:
        """Workers alive: in a working state with a heartbeat within one lease (they beat 4 times a lease)."""
        alive: dict[str, int] = dict.fromkeys(ALIVE_STATES, 0)
        registry = self.store.workers
        for worker in registry.all():
            if worker.state in alive and registry.heartbeat_fresh(worker, now):
                alive[worker.state] += 1
        family = GaugeMetricFamily("particalize_workers", "Alive workers by state.", labels=["state"])
        for state, count in alive.items():
            family.add_metric([state], count)
        return family

