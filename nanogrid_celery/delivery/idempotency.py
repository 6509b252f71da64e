"""One run per request id, however often SQS delivers its message.

Before a run, the request id is *claimed* in Redis (``SET NX`` with a short
TTL and the owner's host, pid and process start time); the process's keeper
thread (delivery/claim_keeper.py) keeps the claim alive while the run lasts,
and the finished result is copied to Redis before the claim is released (one
pipelined round trip). A delivery then finds one of four things:

* a stored result -> return it (Celery stores the same dict again); no run;
* no claim -> claim it and run;
* a live claim -> the request is running elsewhere: the message is re-sent
  with an SQS delay and this one acked, so the slot is free and the request
  is looked at again later (the running owner still holds its own message,
  so nothing is lost if it dies);
* a dead claim -> its worker was killed (SIGKILL, OOM, host lost): a claim
  of a dead process on this host is taken over at once, one on another host
  when its TTL runs out.

Every claim taken counts a *start*; a request that has started
``max_starts`` times and never finished is poison (it kills its worker) and
is dead-lettered with an ``internal_error`` result instead of run again.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import redis
from celery.exceptions import Ignore, Reject

from nanogrid_celery.common.identity import ProcessIdentity
from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.common.perprocess import PerProcess
from nanogrid_celery.common.redis import get_redis
from nanogrid_celery.config import Settings, get_settings
from nanogrid_celery.delivery.claim_keeper import ClaimKeeper
from nanogrid_celery.result import ExecutionResult, Status

log = get_logger(__name__)

CLAIM = "nanogrid:claim:{}"
RESULT = "nanogrid:result:{}"
STARTS = "nanogrid:starts:{}"

# compare-and-set scripts: a claim is only ever changed by its owner (or taker-over)
_REFRESH = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
# the common case in one round trip (it was four: GET result, SET NX, INCR + EXPIRE, GET
# result; 2.2 ms p50 of a 21 ms task on a -c 1 worker with 2 clients, a qemu VM running):
# {1, result} / {2, starts} (claimed) / {3, holder} (held; holder absent if it just went)
_CLAIM = """
local done = redis.call('GET', KEYS[1])
if done then return {1, done} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local n = redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  return {2, n}
end
return {3, redis.call('GET', KEYS[2])}
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1
end
return 0
"""


class RedisUnavailable(Exception):
    """Redis did not answer within the retry budget; the message must come back later."""


def owner_id() -> str:
    """host|pid|process start|nonce: enough to tell a dead owner on this host from a live one."""
    me = ProcessIdentity.current()
    return f"{me.host}|{me.pid}|{me.start}|{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str) -> bool:
    """False only when we can be sure: the owner ran on this host and its process is gone."""
    try:
        host, pid_s, pstart, _ = owner.split("|", 3)
        pid = int(pid_s)
    except ValueError:
        return False
    who = ProcessIdentity(host, pid, pstart)
    if not who.on_this_host():
        return True  # cannot see it; its claim's TTL decides
    return who.alive()


@dataclass
class Verdict:
    """What to do with this delivery: ``run`` (with a claim), ``done`` (a result), ``busy``."""

    action: str
    claim: Claim | None = None
    result: dict[str, Any] | None = None
    holder: str | None = None


class Claim:
    """The right to run one request; keeps itself alive until :meth:`finish` or :meth:`abandon`."""

    def __init__(self, store: ClaimStore, request_id: str, owner: str, starts: int) -> None:
        self.store = store
        self.request_id = request_id
        self.owner = owner
        self.starts = starts

    @contextmanager
    def kept_alive(self) -> Iterator[Claim]:
        """Refresh the TTL every third of it while the body runs (and re-take it after a flush).

        The refreshing is done by the store's one keeper thread (delivery/claim_keeper.py).
        """
        self.store.keeper.add(self)
        try:
            yield self
        finally:
            self.store.keeper.discard(self)

    def refresh(self) -> None:
        """One TTL refresh; called by the keeper thread (errors are logged, not raised)."""
        try:
            state = self.store.redis.eval(_REFRESH, 1, self.key, self.owner, self.store.ttl_ms)
        except redis.RedisError as exc:
            log.warning("could not refresh the claim: %s", exc)
            return
        if state == 0:
            log.warning("claim taken over by another worker while running")
        elif state == 2:
            log.info("claim re-taken (Redis lost it)")

    @property
    def key(self) -> str:
        return CLAIM.format(self.request_id)

    def finish(self, result: dict[str, Any]) -> None:
        """Store the result, then release: a later delivery finds the result, never a gap."""
        pipe = self.store.redis.pipeline(transaction=False)  # one round trip, in this order
        pipe.set(RESULT.format(self.request_id), json.dumps(result), ex=self.store.result_ttl)
        pipe.eval(_RELEASE, 1, self.key, self.owner)
        pipe.execute()

    def abandon(self) -> None:
        """Release without a result (the run could not happen here); errors are ignored."""
        with suppress(redis.RedisError):
            self.store.redis.eval(_RELEASE, 1, self.key, self.owner)


class ClaimStore:
    """Claims, starts and result copies in Redis; one per worker process (made after fork)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.ttl_ms = settings.claim_ttl_s * 1000
        self.result_ttl = settings.result_expires
        # a Redis restart takes a second or two: ride it out (~30 s) instead of failing
        self.redis = client or get_redis(settings.redis_url, "durable")
        self.keeper = ClaimKeeper(Claim.refresh, self.ttl_ms / 3000)

    def stored_result(self, request_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(RESULT.format(request_id))
        return json.loads(raw) if raw else None

    def starts(self, request_id: str) -> int:
        return int(self.redis.get(STARTS.format(request_id)) or 0)

    def acquire(self, request_id: str) -> Verdict:
        try:
            return self._acquire(request_id)
        except redis.RedisError as exc:
            raise RedisUnavailable(str(exc)) from exc

    def _acquire(self, request_id: str) -> Verdict:
        key = CLAIM.format(request_id)
        keys = (RESULT.format(request_id), key, STARTS.format(request_id))
        for _ in range(5):
            owner = owner_id()
            state, *rest = self.redis.eval(_CLAIM, 3, *keys, owner, self.ttl_ms, self.result_ttl)
            if state == 1:
                return Verdict("done", result=json.loads(rest[0]))
            if state == 2:  # atomic: no result can have appeared meanwhile
                return Verdict("run", claim=Claim(self, request_id, owner, int(rest[0])))
            holder = rest[0] if rest else None
            if holder is None:
                continue  # released between the SET NX and the GET: look again
            holder = holder.decode() if isinstance(holder, bytes) else holder
            if owner_alive(holder):
                return Verdict("busy", holder=holder)
            if self.redis.eval(_TAKE_OVER, 1, key, holder, owner, self.ttl_ms):
                log.warning(
                    "took over the claim of a dead worker",
                    dead_owner=holder,
                )
                return self._claimed(request_id, owner)
        return Verdict("busy", holder="(contended)")

    def _claimed(self, request_id: str, owner: str) -> Verdict:
        key = STARTS.format(request_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.result_ttl)
        starts = int(pipe.execute()[0])
        claim = Claim(self, request_id, owner, starts)
        done = self.stored_result(request_id)  # it may have finished while we were claiming
        if done is not None:
            self.redis.decr(key)  # not a start after all: the counter means "runs begun"
            claim.abandon()
            return Verdict("done", result=done)
        return Verdict("run", claim=claim)


_stores: PerProcess[str, ClaimStore] = PerProcess(lambda _: ClaimStore(get_settings()))


def get_store() -> ClaimStore:
    """This process's store; rebuilt after a fork (a Redis socket must not be shared)."""
    return _stores.get("claims")


def run_once(
    task: Any, request_id: str, runtime: str, execute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``execute`` for ``request_id`` at most once to completion; see the module doc.

    ``task`` is the bound Celery task (for re-sending a busy duplicate).
    Raises ``Ignore`` (message acked, nothing stored) after re-sending a
    duplicate, ``Reject(requeue=True)`` when Redis is unreachable.
    """
    store = get_store()
    try:
        verdict = store.acquire(request_id)
    except RedisUnavailable as exc:
        log.error("Redis unavailable; the message will be redelivered: %s", exc)
        raise Reject(f"redis unavailable: {exc}", requeue=True) from exc
    if verdict.action == "done":
        log.info("duplicate delivery of a finished request: returning its stored result")
        return verdict.result or {}
    if verdict.action == "busy":
        _defer(task, request_id, verdict.holder or "?")
    claim = verdict.claim
    assert claim is not None
    if claim.starts > store.settings.max_starts:
        return _dead_letter(task, claim, runtime)
    if claim.starts > 1:
        log.warning("running again after a lost run", start=claim.starts)
    try:
        with claim.kept_alive():
            result = execute()
    except BaseException:
        claim.abandon()
        raise
    _finish(claim, result)
    return result


def _finish(claim: Claim, result: dict[str, Any]) -> None:
    try:
        claim.finish(result)
    except redis.RedisError as exc:  # Celery's backend retries on its own; the claim expires
        log.error("could not store the result copy: %s", exc)


def _defer(task: Any, request_id: str, holder: str) -> None:
    """Send the same task again, delayed, and ack this copy (the running owner has its own)."""
    settings = get_settings()
    req = task.request
    queue = (req.delivery_info or {}).get("routing_key") or settings.queue
    kwargs = dict(req.kwargs or {})
    kwargs["deferrals"] = int(kwargs.get("deferrals") or 0) + 1
    log.info(
        "request is running elsewhere; checking again later",
        holder=holder,
        delay_s=settings.duplicate_delay_s,
        deferrals=kwargs["deferrals"],
    )
    try:
        task.apply_async(
            args=req.args or (),
            kwargs=kwargs,
            task_id=request_id,
            queue=queue,
            delay_seconds=settings.duplicate_delay_s,
        )
    except Exception as exc:
        log.warning("could not re-send the duplicate; requeueing it instead: %s", exc)
        raise Reject(f"re-send failed: {exc}", requeue=True) from exc
    raise Ignore()


def _dead_letter(task: Any, claim: Claim, runtime: str) -> dict[str, Any]:
    """Poison: it started ``max_starts`` times and never finished. Answer, and park it."""
    from nanogrid_celery.delivery.deadletter import (
        send_to_dlq,  # the DLQ is only needed on this rare path
    )

    settings = get_settings()
    reason = (
        f"dead-lettered: started {claim.starts - 1} times and never finished "
        "(the worker process died during every run)"
    )
    body = json.dumps(
        {
            "task": task.name,
            "id": claim.request_id,
            "kwargs": task.request.kwargs or {},
            "reason": reason,
        },
        default=str,
    )
    send_to_dlq(settings, body, reason, claim.request_id)
    result = ExecutionResult(
        request_id=claim.request_id,
        runtime=runtime,
        status=Status.INTERNAL_ERROR,
        message=reason,
        attempts=claim.starts - 1,
    ).to_dict()
    _finish(claim, result)
    return result
