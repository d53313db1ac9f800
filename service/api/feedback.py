"""Answers named for feedback: each ``/recommend`` answer gets a ``request_id`` and is kept in
the feedback log (:mod:`service.store.feedback`) off the request's path, and what
``POST /feedback`` counts is added to this process's metrics."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from service.api.metrics import Metrics
from service.errors import Refused
from service.recommender import Recommendation
from service.store.feedback import (
    Answer,
    Counted,
    FeedbackLog,
    Totals,
    UnknownAnswer,
)
from service.store.profiles import StoreUnavailable

log = logging.getLogger("visrec.feedback")
RANKS_NAMED = 20  # clicks below rank 20 share one label, so /metrics stays small
# An answer is kept after its reply has left (so the reply waits for no store): feedback that
# arrives first, on any replica, waits up to this long for it before it is unknown.
KEEPING_WAIT_S = 1.0


@dataclass
class Feedback:
    log: FeedbackLog | None  # None: feedback is off (VISREC_FEEDBACK_WINDOW_S=0)
    metrics: Metrics
    _keeping: set[asyncio.Task[None]] = field(default_factory=set)

    def name(self, user_id: str | None, rec: Recommendation) -> str | None:
        """A new answer's request_id (None when feedback is off), its answer kept in the
        background: the reply does not wait for the store, and a store that cannot answer
        only makes feedback on this answer unknown (counted in /metrics)."""
        if self.log is None:
            return None
        request_id = secrets.token_hex(16)
        answer = Answer(rec.version, rec.arm, user_id, tuple(rec.items))
        task = asyncio.create_task(self._keep(self.log, request_id, answer))
        self._keeping.add(task)
        task.add_done_callback(self._keeping.discard)
        return request_id

    async def _keep(self, feedback: FeedbackLog, request_id: str, answer: Answer) -> None:
        try:
            await feedback.remember(request_id, answer)
        except StoreUnavailable as err:
            self.metrics.answers_unkept.inc()
            log.debug("answer %s not kept for feedback: %s", request_id, err)

    async def count(self, request_id: str, impressions: list[int], clicks: list[int]) -> Counted:
        """:meth:`FeedbackLog.count`, waiting for an answer still being kept; added to this
        process's metrics."""
        feedback = self._log()
        until = time.monotonic() + KEEPING_WAIT_S
        while True:
            try:
                counted = await feedback.count(request_id, impressions, clicks)
                break
            except StoreUnavailable as err:
                raise err.of("feedback") from err
            except UnknownAnswer:
                if time.monotonic() > until:
                    raise
                await asyncio.sleep(0.02)
        self._note(counted)
        return counted

    async def totals(self) -> dict[tuple[str, str], Totals]:
        return await self._log().totals()

    def _log(self) -> FeedbackLog:
        if self.log is None:
            raise Refused(
                404, "feedback_off", "feedback is off on this server (VISREC_FEEDBACK_WINDOW_S=0)"
            )
        return self.log

    def _note(self, counted: Counted) -> None:
        """This process's share of the counts, for /metrics."""
        version, arm = counted.answer.version, counted.answer.arm or "none"
        if counted.impressions:
            self.metrics.impressions.labels(version, arm).inc(len(counted.impressions))
        for _, rank in counted.clicks:
            label = str(rank) if rank <= RANKS_NAMED else f"{RANKS_NAMED + 1}+"
            self.metrics.clicks.labels(version, arm, label).inc()

    async def close(self) -> None:
        await asyncio.gather(*self._keeping, return_exceptions=True)
        if self.log is not None:
            await self.log.close()
