"""What users did with the answers: every ``/recommend`` answer is remembered for a while
under its ``request_id`` (the model version and experiment arm that produced it, the user, the
items in rank order), so that ``POST /feedback`` can count the items shown (impressions) and
chosen (clicks) against that version and arm, each at most once per answer and item, whoever
sends it and however often.

Two stores share one contract, :class:`FeedbackLog`: in process (one process; bounded, the
oldest answers forgotten first) and Redis (every replica and worker). Redis layout, for prefix
``visrec``: ``visrec:{feedback}:answer:<request_id>``, a hash of the answer (``v`` version,
``a`` arm, ``u`` user, ``r:<item>`` its rank from 1), to which counting adds ``i:<item>`` and
``c:<item>`` once an item's impression or click is counted; it expires after the window.
``visrec:{feedback}:counts``, a hash of every count: ``<version>|<arm>|impressions``,
``...|clicks`` and ``...|rank:<r>`` (clicks at rank r). Counting is one Lua script over both
keys (one hash tag, so one slot of a Redis Cluster): an answer's items are marked and counted
together or not at all.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from service.errors import ServiceError
from service.store.redis.client import reaching, redis_client
from service.store.redis.deadline import LoopLag


@dataclass(frozen=True)
class Answer:
    version: str  # of the model that ranked the items
    arm: str  # "<experiment>/<arm>"; "": no experiment ran
    user_id: str | None  # None: a history sent in the body (no profile to add clicks to)
    items: tuple[int, ...]  # best first


@dataclass(frozen=True)
class Counted:
    """What one call of :meth:`FeedbackLog.count` counted for the first time."""

    answer: Answer
    impressions: tuple[int, ...]
    clicks: tuple[tuple[int, int], ...]  # (item, its rank from 1)


@dataclass
class Totals:
    """The counts of one model version and arm, over every process."""

    impressions: int = 0
    clicks: int = 0
    by_rank: dict[int, int] = field(default_factory=dict)  # rank from 1 -> clicks


class UnknownAnswer(ServiceError):
    status = 404
    code = "unknown_request"


class NotInAnswer(ServiceError):
    """Feedback about items the answer did not hold: nothing of the call is counted."""

    status = 422
    code = "items_not_in_answer"

    def __init__(self, request_id: str, items: Sequence[int]) -> None:
        super().__init__(
            f"the answer {request_id} did not hold item(s) {', '.join(map(str, items))}: "
            "nothing of this feedback was counted"
        )
        self.items = list(items)

    def fields(self) -> dict[str, object]:
        return {"items": self.items}


class FeedbackLog(Protocol):
    async def remember(self, request_id: str, answer: Answer) -> None: ...

    async def count(
        self, request_id: str, impressions: Sequence[int], clicks: Sequence[int]
    ) -> Counted:
        """Count the impressions and clicks (a click is an impression too) not counted yet
        for this answer. Raises UnknownAnswer (never remembered, or past the window) and
        NotInAnswer (then nothing is counted)."""
        ...

    async def totals(self) -> dict[tuple[str, str], Totals]:
        """(version, arm) -> their counts."""
        ...

    async def close(self) -> None: ...


def unknown(request_id: str, window_s: float) -> UnknownAnswer:
    return UnknownAnswer(
        f"no answer {request_id} within the last {window_s:.0f} s: it was never given, or it "
        "is older than the feedback window (VISREC_FEEDBACK_WINDOW_S)"
    )


class MemoryFeedback:
    """This process's answers, the last ``max_answers`` of those within ``window_s``."""

    def __init__(
        self, *, window_s: float, max_answers: int = 50_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.window_s = window_s
        self._max = max_answers
        self._clock = clock
        # request_id -> (when, answer, items counted as shown, items counted as clicked)
        self._answers: OrderedDict[str, tuple[float, Answer, set[int], set[int]]] = OrderedDict()
        self._totals: dict[tuple[str, str], Totals] = {}

    async def remember(self, request_id: str, answer: Answer) -> None:
        self._answers[request_id] = (self._clock(), answer, set(), set())
        while len(self._answers) > self._max:
            self._answers.popitem(last=False)

    async def count(
        self, request_id: str, impressions: Sequence[int], clicks: Sequence[int]
    ) -> Counted:
        kept = self._answers.get(request_id)
        if kept is None or kept[0] < self._clock() - self.window_s:
            raise unknown(request_id, self.window_s)
        _, answer, shown, chosen = kept
        ranks = {item: rank for rank, item in enumerate(answer.items, 1)}
        missing = sorted({i for i in (*impressions, *clicks) if i not in ranks})
        if missing:
            raise NotInAnswer(request_id, missing)
        totals = self._totals.setdefault((answer.version, answer.arm), Totals())
        new_shown = _first_times([*impressions, *clicks], shown)
        new_chosen = _first_times(clicks, chosen)
        totals.impressions += len(new_shown)
        totals.clicks += len(new_chosen)
        for item in new_chosen:
            totals.by_rank[ranks[item]] = totals.by_rank.get(ranks[item], 0) + 1
        return Counted(answer, tuple(new_shown), tuple((i, ranks[i]) for i in new_chosen))

    async def totals(self) -> dict[tuple[str, str], Totals]:
        return {
            k: Totals(t.impressions, t.clicks, dict(t.by_rank)) for k, t in self._totals.items()
        }

    async def close(self) -> None:
        pass


def _first_times(items: Sequence[int], done: set[int]) -> list[int]:
    """The items of ``items`` not in ``done``, each once, added to ``done``."""
    new = [i for i in dict.fromkeys(items) if i not in done]
    done.update(new)
    return new


# KEYS: the answer, the counts. ARGV: how many impressions, then the impressions, then the
# clicks. Returns false (no answer), {"missing", items...}, or {"ok", version, arm, user,
# new impressions as JSON, new clicks as JSON [[item, rank], ...]}.
COUNT = """
local answer, counts = KEYS[1], KEYS[2]
if redis.call('EXISTS', answer) == 0 then return false end
local shown = tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  if not redis.call('HGET', answer, 'r:' .. ARGV[i]) then missing[#missing + 1] = ARGV[i] end
end
if #missing > 0 then
  table.insert(missing, 1, 'missing')
  return missing
end
local head = redis.call('HMGET', answer, 'v', 'a', 'u')
local label = head[1] .. '|' .. head[2] .. '|'
local new_shown, new_chosen = {}, {}
for i = 2, #ARGV do
  local item = ARGV[i]
  if redis.call('HSETNX', answer, 'i:' .. item, 1) == 1 then
    redis.call('HINCRBY', counts, label .. 'impressions', 1)
    new_shown[#new_shown + 1] = tonumber(item)
  end
  if i > shown + 1 and redis.call('HSETNX', answer, 'c:' .. item, 1) == 1 then
    local rank = redis.call('HGET', answer, 'r:' .. item)
    redis.call('HINCRBY', counts, label .. 'clicks', 1)
    redis.call('HINCRBY', counts, label .. 'rank:' .. rank, 1)
    new_chosen[#new_chosen + 1] = {tonumber(item), tonumber(rank)}
  end
end
return {'ok', head[1], head[2], head[3] or '',
        cjson.encode(new_shown), cjson.encode(new_chosen)}
"""


class RedisFeedback:
    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        *,
        prefix: str,
        window_s: float,
        deadline_s: float,
    ) -> None:
        self._client = client
        self._tag = f"{prefix}:{{feedback}}"
        self.window_s = window_s
        self._deadline_s = deadline_s
        self._lag = LoopLag()
        self._count = client.register_script(COUNT)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str, window_s: float, deadline_s: float
    ) -> RedisFeedback:
        return cls(redis_client(url), prefix=prefix, window_s=window_s, deadline_s=deadline_s)

    def _answer(self, request_id: str) -> str:
        return f"{self._tag}:answer:{request_id}"

    async def remember(self, request_id: str, answer: Answer) -> None:
        key = self._answer(request_id)
        fields: dict[FieldT, EncodableT] = {
            "v": answer.version,
            "a": answer.arm,
            "u": answer.user_id or "",
            **{f"r:{item}": rank for rank, item in enumerate(answer.items, 1)},
        }
        async with reaching(self._deadline_s, self._lag), self._client.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, max(1, round(self.window_s)))
            await pipe.execute()

    async def count(
        self, request_id: str, impressions: Sequence[int], clicks: Sequence[int]
    ) -> Counted:
        keys = [self._answer(request_id), f"{self._tag}:counts"]
        args = [len(impressions), *impressions, *clicks]
        async with reaching(self._deadline_s, self._lag):
            reply = await self._count(keys=keys, args=args)
        if not reply:
            raise unknown(request_id, self.window_s)
        status, *rest = [_text(v) for v in reply]
        if status == "missing":
            raise NotInAnswer(request_id, sorted({int(i) for i in rest}))
        version, arm, user, shown, chosen = rest
        answer = Answer(version, arm, user or None, ())  # the items are not read back
        return Counted(
            answer,
            tuple(json.loads(shown) or ()),  # cjson writes an empty table as {}
            tuple((int(i), int(r)) for i, r in json.loads(chosen) or ()),
        )

    async def totals(self) -> dict[tuple[str, str], Totals]:
        async with reaching(self._deadline_s, self._lag):
            stored = await self._client.hgetall(f"{self._tag}:counts")
        out: dict[tuple[str, str], Totals] = {}
        for name, value in stored.items():
            version, arm, what = _text(name).rsplit("|", 2)
            totals = out.setdefault((version, arm), Totals())
            if what == "impressions":
                totals.impressions = int(value)
            elif what == "clicks":
                totals.clicks = int(value)
            else:
                totals.by_rank[int(what.removeprefix("rank:"))] = int(value)
        return out

    async def close(self) -> None:
        await self._lag.stop()
        await self._client.aclose()


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
