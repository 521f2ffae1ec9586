"""Rate-limit state shared by all replicas in Redis, checked and updated atomically by Lua scripts.

The scripts mirror `deepseek_server.limits.gcra` and use Redis's own clock (TIME), so replicas with skewed clocks
still agree. Parallel requests are members of a sorted set scored by a lease expiry. Leases are short and renewed
(`renew`, every third of a lease) while their request runs, so a stream may run for hours, while a replica that dies
with requests in flight, or a release lost in a Redis blip, holds the slots for one lease at most.
"""

from __future__ import annotations

import uuid
from typing import Any

from deepseek_server.limits.decision import Decision
from deepseek_server.limits.gcra import SLACK_S
from deepseek_server.limits.policy import KeyLimits

# The token state is "<TAT>:<seconds per token it was written under>", under its own key (`:tokens`): tokens
# outstanding under another budget are carried over as tokens, as gcra.rescale_token_tat does, so a changed
# tokens-per-minute limit applies from the next request on. Servers of the version before kept a bare TAT under `:tok`
# (their scripts cannot read the new form, hence the new key): it is read, as written under the current rate, while
# `:tokens` does not exist yet, and deleted when `:tokens` is written, so its debt is carried over once.
READ_TOKEN_TAT = """
local function read_token_tat(stored, now, per_token)
  if not stored then return now end
  local tat_text, per_text = string.match(stored, '^([^:]+):?(.*)$')
  local tat = tonumber(tat_text) or now
  local stored_per = tonumber(per_text)
  if tat <= now then return now end
  if stored_per and stored_per > 0 and per_token > 0 and stored_per ~= per_token then
    tat = now + (tat - now) * per_token / stored_per
  end
  return tat
end
"""

ACQUIRE = READ_TOKEN_TAT + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local per_token = tonumber(ARGV[3])
local parallel = tonumber(ARGV[4])
local member = ARGV[5]
local lease = tonumber(ARGV[6])
local reserve = tonumber(ARGV[7])
local hold = tonumber(ARGV[8])
local tolerance = capacity * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local token_tat = read_token_tat(redis.call('GET', KEYS[2]) or redis.call('GET', KEYS[4]), now, per_token)
local token_out = token_tat - now
local new_tat = tat + interval
if new_tat - now > tolerance + 1e-6 then  -- gcra.SLACK_S
  return {0, 'requests', tostring(new_tat - tolerance - now), tostring(tat - now), tostring(token_out)}
end
if per_token > 0 and token_out > 60 - per_token + 1e-6 then
  return {0, 'tokens', tostring(token_out - (60 - per_token)), tostring(tat - now), tostring(token_out)}
end
if parallel > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= parallel then
    return {0, 'parallel', '1', tostring(tat - now), tostring(token_out)}
  end
  if hold == 1 then
    redis.call('ZADD', KEYS[3], now + lease, member)
    redis.call('PEXPIRE', KEYS[3], math.ceil(lease * 1000) + 1000)
  end
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
if per_token > 0 and reserve > 0 then
  token_tat = token_tat + reserve * per_token
  token_out = token_tat - now
  redis.call('SET', KEYS[2], string.format('%.17g', token_tat) .. ':' .. ARGV[3], 'PX',
             math.ceil(token_out * 1000) + 1000)
  redis.call('DEL', KEYS[4])
end
return {1, '', '0', tostring(new_tat - now), tostring(token_out)}
"""

# ARGV[5] '1': only a lease still held (a retried release, or one whose admission's answer was lost) settles its
# tokens, so running it twice, or for an admission that never ran, changes nothing.
RELEASE = READ_TOKEN_TAT + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 and ARGV[5] == '1' then
  return 0
end
local delta = tonumber(ARGV[2]) - tonumber(ARGV[4])
local per_token = tonumber(ARGV[3])
if delta ~= 0 and per_token > 0 then
  local token_tat = read_token_tat(redis.call('GET', KEYS[1]) or redis.call('GET', KEYS[3]), now, per_token)
  token_tat = token_tat + delta * per_token
  if token_tat > now then
    redis.call('SET', KEYS[1], string.format('%.17g', token_tat) .. ':' .. ARGV[3], 'PX',
               math.ceil((token_tat - now) * 1000) + 1000)
  else
    redis.call('DEL', KEYS[1])
  end
  redis.call('DEL', KEYS[3])
end
return 1
"""

RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[2])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000) + 1000)
return 1
"""


class RedisLimitStore:
    """The same contract as MemoryLimitStore, over a `redis.asyncio.Redis` client."""

    def __init__(self, client: Any, prefix: str = "deepseek:rl", lease_s: float = 30.0) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_s = lease_s
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._renew = client.register_script(RENEW)

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3

    def _keys(self, uid: str) -> list[str]:
        # one hash tag per key uid keeps its keys in one Redis Cluster slot: requests, tokens, parallel leases, and
        # the token state as the version before wrote it (read while `:tokens` is missing; see READ_TOKEN_TAT)
        tag = f"{self.prefix}:{{{uid}}}"
        return [f"{tag}:req", f"{tag}:tokens", f"{tag}:par", f"{tag}:tok"]

    async def acquire(self, uid: str, limits: KeyLimits, reserve_tokens: int = 0, hold: bool = True,
                      lease_id: str | None = None) -> Decision:
        """Admit one request (one round trip) and reserve `reserve_tokens` of its tokens-per-minute budget; with
        `hold=False` (an answer given at once, from the cache) no parallel slot is taken, so none is released.
        `lease_id` names the slot (default: a new one), so a caller that loses the answer can still free it."""
        lease_id = lease_id or uuid.uuid4().hex
        per_token = 60.0 / limits.tpm if limits.tpm else 0.0
        reply = await self._acquire(
            keys=self._keys(uid),
            args=[1.0 / limits.rps, limits.capacity, per_token, limits.parallel or 0, lease_id, self.lease_s,
                  reserve_tokens, 1 if hold else 0],
        )
        allowed, kind, retry, request_out, token_out = (
            int(reply[0]), _text(reply[1]), float(reply[2]), float(reply[3]), float(reply[4])
        )
        interval = 1.0 / limits.rps
        remaining = max(int((limits.capacity * interval - request_out + SLACK_S) / interval), 0)
        remaining_tokens = max(int((60.0 - token_out) / per_token), 0) if per_token else None
        return Decision(
            allowed=bool(allowed),
            limits=limits,
            kind=kind or None,  # type: ignore[arg-type]
            retry_after_s=retry,
            remaining_requests=remaining,
            reset_requests_s=request_out,
            remaining_tokens=remaining_tokens,
            reset_tokens_s=token_out,
            backend="redis",
            lease_id=lease_id if allowed else "",
        )

    async def release(self, uid: str, limits: KeyLimits, lease_id: str, tokens_used: int, reserved: int = 0,
                      only_if_held: bool = False) -> bool:
        """Free the parallel slot; charge the tokens used beyond the reservation, or refund the unused rest.
        `only_if_held`: do it only while the slot is still taken (False when it is not); safe to repeat."""
        keys = self._keys(uid)
        per_token = 60.0 / limits.tpm if limits.tpm else 0.0
        return bool(await self._release(keys=[keys[1], keys[2], keys[3]],
                                        args=[lease_id, tokens_used, per_token, reserved, 1 if only_if_held else 0]))

    async def renew(self, uid: str, lease_id: str) -> bool:
        """Extend a running request's parallel lease by `lease_s`; False when it is gone (expired meanwhile)."""
        return bool(await self._renew(keys=[self._keys(uid)[2]], args=[lease_id, self.lease_s]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
