"""The cluster's shared state, and every change to it, as Lua run inside Redis.

Redis runs a script alone, start to end: that is what makes a chat request,
an answer or a takeover one step for the whole cluster, with no lock and no
second round trip. A script changes the records and, in the same step,
PUBLISHes what each affected node must tell its users; so the order in which
nodes hear of changes is the order in which they happened.

Keys (``selchat:`` prefixed):

``node:<id>``      a node's lease (SET PX, renewed every second); gone = dead.
``nodes``          the ids of nodes that joined and were not reaped yet.
``nu:<id>``        the account keys with a session on that node.
``fence:<key>``    the account's fencing counter: INCR at every login.
``u:<key>``        the session record: name, node, epoch (its fence value),
                   v2, partner, req_to, req_from, req_id.
``online``         key -> node, for WHO.
``gen``            a random value set by the first node: if it vanishes,
                   Redis lost its data ("history lost").

Node channels: ``n:<id>``. A message is one header line and a payload:
``<kind> <dst_key> <dst_epoch> [fields...]\\n<payload>`` (see ``node.py``).

Epochs fence: every script that acts for a session takes its (key, epoch) and
does nothing if the record's epoch is another (the session was taken over),
and ``relay`` publishes a node's message only while its sender's epoch is
still current. A node that was paused or cut off cannot act after a takeover.
"""

from __future__ import annotations

PRELUDE = r"""
local P = 'selchat:'
local function u(k) return P .. 'u:' .. k end
local function pub(node, msg) redis.call('PUBLISH', P .. 'n:' .. node, msg) end
local function rec(k)
  local h = redis.call('HMGET', u(k), 'name', 'node', 'epoch', 'v2', 'partner', 'req_to', 'req_from', 'req_id')
  if not h[1] then return nil end
  return {name=h[1], node=h[2], epoch=h[3], v2=h[4], partner=h[5] or '', req_to=h[6] or '',
          req_from=h[7] or '', req_id=h[8] or ''}
end
local function current(k, epoch)
  local r = rec(k)
  if r and r.epoch == epoch then return r end
  return nil
end
local function alive(node) return redis.call('EXISTS', P .. 'node:' .. node) == 1 end
-- tell: an event line for a session ('E'), or one that also ends its chat ('X')
local function tell(kind, k, r, line) pub(r.node, kind .. ' ' .. k .. ' ' .. r.epoch .. '\n' .. line) end
-- The session k (record r) goes away: end its chat and its request.
local function part(k, r, reason, text)
  if r.partner ~= '' then
    local p = rec(r.partner)
    if p and p.partner == k then
      redis.call('HSET', u(r.partner), 'partner', '')
      tell('X', r.partner, p, 'ENDED ' .. r.name .. ' ' .. reason .. ' ' .. text)
    end
  end
  for _, f in ipairs({'req_to', 'req_from'}) do
    local other = r[f]
    if other ~= '' then
      local o = rec(other)
      local back = (f == 'req_to') and 'req_from' or 'req_to'
      if o and o[back] == k then
        redis.call('HSET', u(other), back, '', 'req_id', '')
        tell('E', other, o, 'CANCELLED ' .. r.name)
      end
    end
  end
end
local function forget(k, r)
  redis.call('DEL', u(k))
  redis.call('HDEL', P .. 'online', k)
  redis.call('SREM', P .. 'nu:' .. r.node, k)
end
"""

#: KEYS: none. ARGV: key, name, node, v2. Returns {epoch, old node or '', old node alive 0/1, old epoch}.
CLAIM = PRELUDE + r"""
local k, name, node, v2 = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not alive(node) then return {0, '', 0, ''} end
local epoch = redis.call('INCR', P .. 'fence:' .. k)
local old = rec(k)
local old_node, old_alive, old_epoch = '', 0, ''
if old then
  part(k, old, 'dropped', old.name .. ' lost connection')
  forget(k, old)
  old_node, old_epoch = old.node, old.epoch
  if alive(old.node) then
    old_alive = 1
    pub(old.node, 'K ' .. k .. ' ' .. old.epoch .. '\n' .. node)
  end
end
redis.call('HSET', u(k), 'name', name, 'node', node, 'epoch', epoch, 'v2', v2,
           'partner', '', 'req_to', '', 'req_from', '', 'req_id', '')
redis.call('HSET', P .. 'online', k, node)
redis.call('SADD', P .. 'nu:' .. node, k)
return {epoch, old_node, old_alive, old_epoch}
"""

#: ARGV: key, epoch, reason, text (what a partner hears in ENDED). Returns 1 if it was current.
LEAVE = PRELUDE + r"""
local k, epoch = ARGV[1], ARGV[2]
local r = current(k, epoch)
if not r then return 0 end
part(k, r, ARGV[3], ARGV[4])
forget(k, r)
return 1
"""

#: ARGV: src key, src epoch, dst key. Returns {code, name, partner node, partner epoch}.
REQUEST = PRELUDE + r"""
local k, epoch, dk = ARGV[1], ARGV[2], ARGV[3]
local s = current(k, epoch)
if not s then return {'fenced', ''} end
if s.partner ~= '' then
  local p = rec(s.partner)
  return {'in-chat', p and p.name or s.partner}
end
local pending = s.req_to ~= '' and s.req_to or s.req_from
if pending ~= '' then
  local o = rec(pending)
  return {'pending', o and o.name or pending}
end
local d = rec(dk)
if not d or not alive(d.node) then return {'offline', ''} end
if d.partner ~= '' or d.req_to ~= '' or d.req_from ~= '' then return {'busy', d.name} end
local id = tostring(redis.call('INCR', P .. 'reqid'))
redis.call('HSET', u(k), 'req_to', dk, 'req_id', id)
redis.call('HSET', u(dk), 'req_from', k, 'req_id', id)
tell('E', dk, d, 'REQUEST ' .. s.name)
return {'ok', d.name, id}
"""

#: ARGV: key, epoch. The target answers yes. Returns {code, source name, source node, source epoch, source v2}.
ACCEPT = PRELUDE + r"""
local k, epoch = ARGV[1], ARGV[2]
local s = current(k, epoch)
if not s then return {'fenced'} end
local src = s.req_from ~= '' and rec(s.req_from) or nil
if not src or src.req_to ~= k then return {'no-request'} end
local sk = s.req_from
redis.call('HSET', u(k), 'req_from', '', 'req_id', '', 'partner', sk)
redis.call('HSET', u(sk), 'req_to', '', 'req_id', '', 'partner', k)
-- The source's node learns who its partner is from the header:
-- S <key> <epoch> <partner key> <partner node> <partner epoch> <partner v2>
pub(src.node, 'S ' .. sk .. ' ' .. src.epoch .. ' ' .. k .. ' ' .. s.node .. ' ' .. s.epoch .. ' ' .. s.v2 ..
    '\nSTARTED ' .. s.name)
pub(s.node, 'S ' .. k .. ' ' .. s.epoch .. ' ' .. sk .. ' ' .. src.node .. ' ' .. src.epoch .. ' ' .. src.v2 ..
    '\nSTARTED ' .. src.name)
return {'ok', src.name, src.node, src.epoch, src.v2, sk}
"""

#: ARGV: key, epoch. Returns {code, source name}.
DECLINE = PRELUDE + r"""
local k, epoch = ARGV[1], ARGV[2]
local s = current(k, epoch)
if not s then return {'fenced'} end
local src = s.req_from ~= '' and rec(s.req_from) or nil
if not src or src.req_to ~= k then return {'no-request'} end
redis.call('HSET', u(k), 'req_from', '', 'req_id', '')
redis.call('HSET', u(s.req_from), 'req_to', '', 'req_id', '')
tell('E', s.req_from, src, 'DECLINED ' .. s.name)
return {'ok', src.name}
"""

#: ARGV: key, epoch, text for the partner. Returns {code, other name}.
QUIT = PRELUDE + r"""
local k, epoch = ARGV[1], ARGV[2]
local s = current(k, epoch)
if not s then return {'fenced'} end
if s.partner ~= '' then
  local p = rec(s.partner)
  redis.call('HSET', u(k), 'partner', '')
  if p and p.partner == k then
    redis.call('HSET', u(s.partner), 'partner', '')
    tell('X', s.partner, p, 'ENDED ' .. s.name .. ' quit ' .. ARGV[3])
  end
  local name = p and p.name or s.partner
  tell('X', k, s, 'ENDED ' .. name .. ' quit you ended the chat')
  return {'ok', name}
end
if s.req_to ~= '' then
  local t = rec(s.req_to)
  redis.call('HSET', u(k), 'req_to', '', 'req_id', '')
  if t and t.req_from == k then
    redis.call('HSET', u(s.req_to), 'req_from', '', 'req_id', '')
    tell('E', s.req_to, t, 'CANCELLED ' .. s.name)
  end
  return {'ok', t and t.name or s.req_to}
end
return {'not-in-chat'}
"""

#: ARGV: src key, dst key, request id. An unanswered request runs out.
EXPIRE = PRELUDE + r"""
local k, dk, id = ARGV[1], ARGV[2], ARGV[3]
local s, d = rec(k), rec(dk)
if not s or s.req_to ~= dk or s.req_id ~= id then return 0 end
redis.call('HSET', u(k), 'req_to', '', 'req_id', '')
tell('E', k, s, 'EXPIRED ' .. (d and d.name or dk))
if d and d.req_from == k and d.req_id == id then
  redis.call('HSET', u(dk), 'req_from', '', 'req_id', '')
  tell('E', dk, d, 'EXPIRED ' .. s.name)
end
return 1
"""

#: ARGV: none. Returns a flat list name, busy(0/1), ... of sessions on live nodes.
WHO = PRELUDE + r"""
local all = redis.call('HGETALL', P .. 'online')
local live = {}
local out = {}
for i = 1, #all, 2 do
  local k, node = all[i], all[i + 1]
  if live[node] == nil then live[node] = alive(node) end
  if live[node] then
    local r = rec(k)
    if r then
      local busy = (r.partner ~= '' or r.req_to ~= '' or r.req_from ~= '') and 1 or 0
      table.insert(out, r.name)
      table.insert(out, busy)
    end
  end
end
return out
"""

#: ARGV: none. Ends the sessions of nodes whose lease ran out. Returns how many.
REAP = PRELUDE + r"""
local n = 0
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if not alive(node) then
    for _, k in ipairs(redis.call('SMEMBERS', P .. 'nu:' .. node)) do
      local r = rec(k)
      if r and r.node == node then
        part(k, r, 'dropped', r.name .. ' lost connection')
        forget(k, r)
        n = n + 1
      end
    end
    redis.call('DEL', P .. 'nu:' .. node)
    redis.call('SREM', P .. 'nodes', node)
  end
end
return n
"""

#: ARGV: src key, src epoch, destination node, message. Publishes the message
#: only while the sender's epoch is current (fencing). Returns 1 if sent.
RELAY = r"""
local P = 'selchat:'
if redis.call('HGET', P .. 'u:' .. ARGV[1], 'epoch') ~= ARGV[2] then return 0 end
redis.call('PUBLISH', P .. 'n:' .. ARGV[3], ARGV[4])
return 1
"""

#: ARGV: node id, lease ms, generation. Renews the lease; returns the
#: generation stored (set to ours if none was), so a node sees a Redis that
#: lost its data.
LEASE = r"""
local P = 'selchat:'
redis.call('SET', P .. 'node:' .. ARGV[1], '1', 'PX', ARGV[2])
redis.call('SADD', P .. 'nodes', ARGV[1])
local gen = redis.call('GET', P .. 'gen')
if not gen then
  redis.call('SET', P .. 'gen', ARGV[3])
  gen = ARGV[3]
end
return gen
"""

SCRIPTS = {
    "claim": CLAIM, "leave": LEAVE, "request": REQUEST, "accept": ACCEPT, "decline": DECLINE,
    "quit": QUIT, "expire": EXPIRE, "who": WHO, "reap": REAP, "relay": RELAY, "lease": LEASE,
}
