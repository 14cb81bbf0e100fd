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
                   v2, partner, req_to, req_from, req_id; for version 2 also
                   since (the epoch it began with: a resume elsewhere keeps
                   the session under a new epoch), acc (the seq of its last
                   message that reached Redis), got (how many chat messages
                   were relayed to it), cpos and rpos (``got`` when its
                   chat started, when the request to it came), rt (its
                   resume token's hash), rq (how its last chat request, to
                   or from it, ended: see ``over``) and, while its node is
                   dead, until (end of its resume window, ms) with node ''.
``in:<key>``       version 2: the chat messages relayed to the session that
                   its client has not acknowledged, one entry per relayed
                   block: ``<pos> <n> <count> <sname> <snode> <sepoch> <sv2>
                   <seq>\n<payload>`` (pos: the position of its first message
                   among all relayed to the session).
``fa:<key>``       version 2: the fates of its messages, the last ``keep``.
``ended:<key>``    version 2: the ENDED lines no node could tell it (it was
                   detached, or its node had just died), each as ``<got>\n<line>``
                   (got: the chat messages relayed to it before), the last 16;
                   and the ENDED lines its client had not acknowledged when
                   its node shut down (DEPART).
``rt:<hash>``      a resume token's SHA-256 -> the account key.
``detached``       keys of version 2 sessions whose node died (resumable).
``online``         key -> node ('' while detached), for WHO.
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
  local h = redis.call('HMGET', u(k), 'name', 'node', 'epoch', 'v2', 'partner', 'req_to', 'req_from', 'req_id',
                       'since', 'acc', 'got', 'rt', 'until')
  if not h[1] then return nil end
  return {name=h[1], node=h[2], epoch=h[3], v2=h[4], partner=h[5] or '', req_to=h[6] or '',
          req_from=h[7] or '', req_id=h[8] or '', since=h[9] or h[3], acc=tonumber(h[10] or '0'),
          got=tonumber(h[11] or '0'), rt=h[12] or '', untl=tonumber(h[13] or '0')}
end
local function current(k, epoch)
  local r = rec(k)
  if r and r.epoch == epoch then return r end
  return nil
end
-- The session k (at epoch) and the source of the request it was sent: the
-- answer to it (ACCEPT, DECLINE) may go ahead; else an error code and nil.
local function request_for(k, epoch)
  local s = current(k, epoch)
  if not s then return 'fenced', nil end
  local src = s.req_from ~= '' and rec(s.req_from) or nil
  if not src or src.req_to ~= k then return 'no-request', nil end
  return s, src
end
local function alive(node) return node ~= '' and redis.call('EXISTS', P .. 'node:' .. node) == 1 end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- tell: an event line for a session ('E'), or one that also ends its chat ('X').
-- A version 2 session that no node heard it for (detached, or its node just
-- died) keeps an ENDED in its ended: list, at its position among the chat
-- messages relayed to it, for the node that resumes it; the rest of where it
-- stands is in its record (TAKE says it again).
local function tell(kind, k, r, line)
  if r.node ~= '' and redis.call('PUBLISH', P .. 'n:' .. r.node,
                                 kind .. ' ' .. k .. ' ' .. r.epoch .. '\n' .. line) > 0 then return end
  if kind == 'X' and r.v2 == '1' then
    redis.call('RPUSH', P .. 'ended:' .. k, r.got .. '\n' .. line)
    redis.call('LTRIM', P .. 'ended:' .. k, -16, -1)
  end
end
-- A chat request of session k's is over (line: DECLINED, EXPIRED or
-- CANCELLED <user>): told as tell does, and for version 2 also kept in its
-- record (rq: ``<got>\n<line>``, got as in ended:), so that a node resuming
-- the session after its node died can say it again (TAKE): the client may
-- not have read it. A new request of k's clears it (REQUEST).
local function over(k, r, line)
  tell('E', k, r, line)
  if r.v2 == '1' then redis.call('HSET', u(k), 'rq', r.got .. '\n' .. line) end
end
-- A fate of session k's messages (a DELIVERED or UNDELIVERED line), kept in
-- fa:k for a resume on another node, then told to its node. ``epoch`` may be
-- any of the session's (since..epoch): a resume elsewhere keeps the session.
-- ``acc``: the fate's last seq if the message never went through RELAY.
local function fate(k, epoch, line, acc, keep)
  local h = redis.call('HMGET', u(k), 'epoch', 'since', 'v2', 'acc', 'node')  -- only these: a hot path
  if not h[1] or tonumber(h[2] or h[1]) > tonumber(epoch) then return 0 end
  if h[3] == '1' then
    redis.call('RPUSH', P .. 'fa:' .. k, line)
    redis.call('LTRIM', P .. 'fa:' .. k, -keep, -1)
    if acc > tonumber(h[4] or '0') then redis.call('HSET', u(k), 'acc', acc) end
  end
  if h[5] ~= '' then pub(h[5], 'E ' .. k .. ' ' .. h[1] .. '\n' .. line) end
  return 1
end
-- The messages held for session k (its in: list) will never be delivered:
-- each sender hears so (a version 1 sender's node makes it a NACK for each).
local function bury(k, code, text)
  for _, e in ipairs(redis.call('LRANGE', P .. 'in:' .. k, 0, -1)) do
    local n, sname, sepoch, seq = e:match('^%d+ (%d+) %-?%d+ (%S+) %S+ (%S+) %d (%d+)\n')
    local first = tonumber(seq)
    fate(string.lower(sname), sepoch,
         'UNDELIVERED ' .. first .. ' ' .. (first + tonumber(n) - 1) .. ' ' .. code .. ' ' .. text, 0, 1000)
  end
end
-- The session k (record r) speaks version 1 and its node died. Its node
-- said DELIVERED for each message as it wrote it (a version 1 client
-- acknowledges nothing), so a version 2 partner's messages published to that
-- node and not written yet have no fate coming: the partner's node, which
-- knows which of them have none, reports them (L). Before part, which ends
-- the chat.
local function lost(k, r)
  if r.v2 == '1' or r.partner == '' then return end
  local p = rec(r.partner)
  if p and p.partner == k and p.v2 == '1' and p.node ~= '' then
    pub(p.node, 'L ' .. r.partner .. ' ' .. p.epoch .. ' ' .. k .. '\n')
  end
end
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
        over(other, o, 'CANCELLED ' .. r.name)
      end
    end
  end
  -- Quiet requests to k (from users k blocked): cancelled as requests to it are.
  local quiet = redis.call('HGETALL', P .. 'qf:' .. k)
  for i = 1, #quiet, 2 do
    local o = rec(quiet[i])
    if o and o.req_to == k and o.req_id == quiet[i + 1] then
      redis.call('HSET', u(quiet[i]), 'req_to', '', 'req_id', '')
      over(quiet[i], o, 'CANCELLED ' .. r.name)
    end
  end
  redis.call('DEL', P .. 'qf:' .. k)
end
local function forget(k, r)
  redis.call('DEL', u(k), P .. 'in:' .. k, P .. 'fa:' .. k, P .. 'ended:' .. k, P .. 'qf:' .. k)
  if r.rt ~= '' then redis.call('DEL', P .. 'rt:' .. r.rt) end
  redis.call('HDEL', P .. 'online', k)
  redis.call('SREM', P .. 'nu:' .. r.node, k)
  redis.call('SREM', P .. 'detached', k)
end
-- A version 2 session whose node died: kept for its resume window, its chat
-- up (the partner hears AWAY), its requests cancelled.
local function detach(k, r, window)
  redis.call('HSET', u(k), 'node', '', 'until', now_ms() + window)
  redis.call('HSET', P .. 'online', k, '')
  redis.call('SADD', P .. 'detached', k)
  local chat = r.partner
  r.partner = ''
  part(k, r, 'dropped', '')
  if chat ~= '' then
    local p = rec(chat)
    if p and p.partner == k then tell('E', chat, p, 'AWAY ' .. r.name) end  -- its node drops it for version 1
  end
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
  old_node, old_epoch = old.node, old.epoch
  local heard = 0
  if alive(old.node) then
    old_alive = 1
    -- It ends the session and says so, and reports what it held for it.
    heard = redis.call('PUBLISH', P .. 'n:' .. old.node, 'K ' .. k .. ' ' .. old.epoch .. '\n' .. node)
  end
  if heard == 0 then
    -- Its node is dead (its lease may still run, but nobody is listening:
    -- a node that lost its subscription fences itself), so that is for us.
    lost(k, old)
    bury(k, 'gone', old.name .. ' logged in again before receiving it')
  end
  part(k, old, 'dropped', old.name .. ' lost connection')
  forget(k, old)
end
redis.call('HSET', u(k), 'name', name, 'node', node, 'epoch', epoch, 'v2', v2,
           'partner', '', 'req_to', '', 'req_from', '', 'req_id', '',
           'since', epoch, 'acc', 0, 'got', 0, 'rt', '', 'until', 0)
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

#: ARGV: src key, src epoch, dst key, '1' if dst has blocked src. Returns
#: {code, name, request id}. A request to a user who blocked the source is
#: 'quiet': only the source's record has it (dst is not told, and its
#: req_from stays free), and the source's node declines it later (EXPIRE).
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
if d and d.node == '' then return {'away', d.name} end
if not d or not alive(d.node) then return {'offline', ''} end
if d.partner ~= '' or d.req_to ~= '' or d.req_from ~= '' then return {'busy', d.name} end
local id = tostring(redis.call('INCR', P .. 'reqid'))
redis.call('HDEL', u(k), 'rq')
if ARGV[4] == '1' then
  redis.call('HSET', u(k), 'req_to', dk, 'req_id', id)
  redis.call('HSET', P .. 'qf:' .. dk, k, id)  -- so that dk's going away cancels it, as it would a request
  return {'quiet', d.name, id}
end
redis.call('HSET', u(k), 'req_to', dk, 'req_id', id)
redis.call('HSET', u(dk), 'req_from', k, 'req_id', id, 'rpos', d.got)
redis.call('HDEL', u(dk), 'rq')
tell('E', dk, d, 'REQUEST ' .. s.name)
return {'ok', d.name, id}
"""

#: ARGV: key, epoch. The target answers yes. Returns {code, source name, source node, source epoch, source v2}.
ACCEPT = PRELUDE + r"""
local k = ARGV[1]
local s, src = request_for(k, ARGV[2])
if not src then return {s} end
local sk = s.req_from
redis.call('HSET', u(k), 'req_from', '', 'req_id', '', 'partner', sk, 'cpos', s.got)
redis.call('HSET', u(sk), 'req_to', '', 'req_id', '', 'partner', k, 'cpos', src.got)
-- The source's node learns who its partner is from the header:
-- S <key> <epoch> <partner key> <partner node> <partner epoch> <partner v2>
pub(src.node, 'S ' .. sk .. ' ' .. src.epoch .. ' ' .. k .. ' ' .. s.node .. ' ' .. s.epoch .. ' ' .. s.v2 ..
    '\nSTARTED ' .. s.name)
pub(s.node, 'S ' .. k .. ' ' .. s.epoch .. ' ' .. sk .. ' ' .. src.node .. ' ' .. src.epoch .. ' ' .. src.v2 ..
    '\nSTARTED ' .. src.name)
return {'ok', src.name, src.node, src.epoch, src.v2, sk}
"""

#: ARGV: key, epoch[, only this source's key]. Returns {code, source name}.
DECLINE = PRELUDE + r"""
local k = ARGV[1]
local s, src = request_for(k, ARGV[2])
if not src then return {s} end
if ARGV[3] and ARGV[3] ~= '' and s.req_from ~= ARGV[3] then return {'no-request'} end
redis.call('HSET', u(k), 'req_from', '', 'req_id', '')
redis.call('HSET', u(s.req_from), 'req_to', '', 'req_id', '')
over(s.req_from, src, 'DECLINED ' .. s.name)
return {'ok', src.name}
"""

#: ARGV: key, epoch, text for the partner[, only with this key]. Returns {code, other name}.
QUIT = PRELUDE + r"""
local k, epoch, only = ARGV[1], ARGV[2], ARGV[4]
local s = current(k, epoch)
if not s then return {'fenced'} end
if only and only ~= '' and s.partner ~= only and s.req_to ~= only then return {'not-in-chat'} end
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
    over(s.req_to, t, 'CANCELLED ' .. s.name)
  end
  return {'ok', t and t.name or s.req_to}
end
return {'not-in-chat'}
"""

#: ARGV: src key, dst key, request id, what the source hears (EXPIRED, or
#: DECLINED for a quiet request). An unanswered request runs out.
EXPIRE = PRELUDE + r"""
local k, dk, id = ARGV[1], ARGV[2], ARGV[3]
local s, d = rec(k), rec(dk)
if not s or s.req_to ~= dk or s.req_id ~= id then return 0 end
redis.call('HSET', u(k), 'req_to', '', 'req_id', '')
over(k, s, (ARGV[4] or 'EXPIRED') .. ' ' .. (d and d.name or dk))
if d and d.req_from == k and d.req_id == id then
  redis.call('HSET', u(dk), 'req_from', '', 'req_id', '')
  over(dk, d, 'EXPIRED ' .. s.name)
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
  if live[node] == nil then live[node] = (node == '') or alive(node) end
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

#: ARGV: resume window (ms). The sessions of nodes whose lease ran out end
#: (version 1) or are detached (version 2, with a resume token: a client may
#: resume them on another node); detached ones whose window is over end, and
#: the messages held for them are reported to their senders. Returns how many
#: sessions ended or were detached.
REAP = PRELUDE + r"""
local window = tonumber(ARGV[1])
local n = 0
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if not alive(node) then
    for _, k in ipairs(redis.call('SMEMBERS', P .. 'nu:' .. node)) do
      local r = rec(k)
      if r and r.node == node then
        if r.v2 == '1' and r.rt ~= '' and window > 0 then
          detach(k, r, window)
        else
          lost(k, r)
          bury(k, 'gone', r.name .. ' lost connection before receiving it')
          part(k, r, 'dropped', r.name .. ' lost connection')
          forget(k, r)
        end
        n = n + 1
      end
    end
    redis.call('DEL', P .. 'nu:' .. node)
    redis.call('SREM', P .. 'nodes', node)
  end
end
local now = now_ms()
for _, k in ipairs(redis.call('SMEMBERS', P .. 'detached')) do
  local r = rec(k)
  if not r or r.node ~= '' then
    redis.call('SREM', P .. 'detached', k)
  elseif now > r.untl then
    bury(k, 'away', r.name .. ' lost connection and did not come back')
    part(k, r, 'dropped', r.name .. ' lost connection')
    forget(k, r)
    n = n + 1
  end
end
return n
"""

#: ARGV: node, resume window (ms), then (key, epoch, events) for each
#: version 2 session the node lets go of as it shuts down (the cluster goes
#: on): each is detached now, as if its node had died, so that its client
#: resumes it on another node with its chat, and no node waits for this one.
#: ``events``: the ENDED lines its client had not acknowledged (``<got>
#: <line>`` lines, as a node hands over after M), kept in its ended: list
#: for TAKE. Returns how many were detached.
DEPART = PRELUDE + r"""
local node, window, n = ARGV[1], tonumber(ARGV[2]), 0
for i = 3, #ARGV, 3 do
  local k = ARGV[i]
  local r = current(k, ARGV[i + 1])
  if r and r.node == node and r.rt ~= '' then
    for got, line in string.gmatch(ARGV[i + 2], '(%d+) ([^\n]*)\n') do
      redis.call('RPUSH', P .. 'ended:' .. k, got .. '\n' .. line)
    end
    redis.call('SREM', P .. 'nu:' .. node, k)
    detach(k, r, window)
    n = n + 1
  end
end
return n
"""

#: ARGV: src key, src epoch, dst key, count, first seq, sender name, sender
#: node, sender v2, bound, payload. Chat messages for the sender's partner,
#: only while the sender's epoch is current (fencing): their seqs reach the
#: sender's record (acc), a version 2 receiver keeps them in its in: list
#: until its client acknowledges them, and its node (if it has one) gets
#: ``D <dst> <depoch> <sname> <snode> <sepoch> <sv2> <seq> <count> <pos>``.
#: Returns 1 (sent), 2 (sent, and the receiver's list is at its bound: wait),
#: 3 (the receiver is not the sender's partner any more), 0 (fenced).
RELAY = PRELUDE + r"""
local k, epoch, dk, count, seq = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
-- Only the fields needed (the hot path: one call per relayed block).
local s = redis.call('HMGET', u(k), 'epoch', 'acc')
if s[1] ~= epoch then return 0 end
local n = count > 0 and count or 1
if seq + n - 1 > tonumber(s[2] or '0') then redis.call('HSET', u(k), 'acc', seq + n - 1) end
local d = redis.call('HMGET', u(dk), 'partner', 'v2', 'node', 'epoch')
if d[1] ~= k then return 3 end
local pos, full = 0, false
local head = ARGV[6] .. ' ' .. ARGV[7] .. ' ' .. epoch .. ' ' .. ARGV[8] .. ' ' .. seq
if d[2] == '1' then
  pos = redis.call('HINCRBY', u(dk), 'got', n) - n + 1
  full = redis.call('RPUSH', P .. 'in:' .. dk, pos .. ' ' .. n .. ' ' .. count .. ' ' .. head .. '\n' .. ARGV[10])
         >= tonumber(ARGV[9])
end
if d[3] ~= '' then
  pub(d[3], 'D ' .. dk .. ' ' .. d[4] .. ' ' .. head .. ' ' .. count .. ' ' .. pos .. '\n' .. ARGV[10])
end
if full then return 2 end
return 1
"""

#: ARGV: key, epoch (any of the session's), fate line, acc (0, or its last
#: seq for a message that never went through RELAY), fates kept.
FATE = PRELUDE + r"""
return fate(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
"""

#: ARGV: key, epoch, position, fates kept, then (sender key, sender epoch,
#: DELIVERED line) for each receipt. A client's ACK: it has every chat
#: message up to that position (0: no change), so they leave its in: list,
#: and their senders get their receipts (as FATE), in one call.
ACKED = PRELUDE + r"""
local k, pos, keep = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local since = pos > 0 and redis.call('HGET', u(k), 'since')
if since and tonumber(since) <= tonumber(ARGV[2]) then
  local key = P .. 'in:' .. k
  while true do
    local e = redis.call('LINDEX', key, 0)
    if not e then break end
    local first, n = e:match('^(%d+) (%d+) ')
    if tonumber(first) + tonumber(n) - 1 > pos then break end
    redis.call('LPOP', key)
  end
end
for i = 5, #ARGV, 3 do fate(ARGV[i], ARGV[i + 1], ARGV[i + 2], 0, keep) end
return 1
"""

#: ARGV: key, epoch, token hash. A version 2 session's resume token, so that
#: any node can find the session by it.
TOKEN = PRELUDE + r"""
local k, epoch, hash = ARGV[1], ARGV[2], ARGV[3]
if not current(k, epoch) then return 0 end
redis.call('SET', P .. 'rt:' .. hash, k)
redis.call('HSET', u(k), 'rt', hash)
return 1
"""

#: ARGV: token hash, node, the client's last event id. A RESUME on ``node``
#: of the session with that token: the node becomes its holder under a new
#: epoch (the old holder, if alive, is told ``M``: let go of it without ending
#: it, and hand over the events after that id). Returns {'unknown'},
#: {'here', key}, or {'ok', key, name, epoch, old node, old alive, old epoch}.
RECLAIM = PRELUDE + r"""
local hash, node, last_id = ARGV[1], ARGV[2], ARGV[3]
if not alive(node) then return {'down'} end
local k = redis.call('GET', P .. 'rt:' .. hash)
if not k then return {'unknown'} end
local r = rec(k)
if not r or r.rt ~= hash then return {'unknown'} end
if r.node == node then return {'here', k} end
local epoch = redis.call('INCR', P .. 'fence:' .. k)
local old_alive = 0
if r.node ~= '' then  -- not detached: the partner has not heard AWAY yet (BACK follows, from TAKE)
  local p = r.partner ~= '' and rec(r.partner) or nil
  if p and p.partner == k then tell('E', r.partner, p, 'AWAY ' .. r.name) end
  redis.call('SREM', P .. 'nu:' .. r.node, k)
  if alive(r.node) then
    old_alive = 1
    pub(r.node, 'M ' .. k .. ' ' .. r.epoch .. '\n' .. node .. ' ' .. last_id)
  end
end
redis.call('SREM', P .. 'detached', k)
redis.call('HSET', u(k), 'node', node, 'epoch', epoch, 'until', 0)
redis.call('HSET', P .. 'online', k, node)
redis.call('SADD', P .. 'nu:' .. node, k)
return {'ok', k, r.name, epoch, r.node, old_alive, r.epoch}
"""

#: ARGV: key, epoch. After RECLAIM (and the old holder's R): what the new
#: holder needs, {acc, partner key, name, node, epoch, v2, {fates}, {held
#: messages}, {ENDED lines not told}, the name of a user whose request waits
#: for its answer or '', the chat's and the request's positions among the
#: messages relayed to the session (cpos, rpos: how many came before), the
#: end of its last request (rq, or '')}; the
#: partner's node hears where the session is now (P), and the partner
#: ``BACK`` (its node drops it for a version 1 client). A partner node '' is
#: away.
TAKE = PRELUDE + r"""
local k, epoch = ARGV[1], ARGV[2]
local r = current(k, epoch)
if not r then return {'fenced'} end
local pk, p = r.partner, nil
if pk ~= '' then p = rec(pk) end
if p and p.partner ~= k then p, pk = nil, '' end
if p and p.node ~= '' then
  pub(p.node, 'P ' .. pk .. ' ' .. p.epoch .. ' ' .. k .. ' ' .. r.node .. ' ' .. r.epoch .. ' ' .. r.v2 .. '\n' ..
      'BACK ' .. r.name)
end
local fates = redis.call('LRANGE', P .. 'fa:' .. k, 0, -1)
local held = redis.call('LRANGE', P .. 'in:' .. k, 0, -1)
local ended = redis.call('LRANGE', P .. 'ended:' .. k, 0, -1)
redis.call('DEL', P .. 'ended:' .. k)
local asker = ''
if r.req_from ~= '' then
  local src = rec(r.req_from)
  if src and src.req_to == k then asker = src.name end
end
local at = redis.call('HMGET', u(k), 'cpos', 'rpos', 'rq')
local cpos, rpos, rq = tonumber(at[1] or '0'), tonumber(at[2] or '0'), at[3] or ''
if p then
  return {'ok', r.acc, pk, p.name, p.node, p.epoch, p.v2, fates, held, ended, asker, cpos, rpos, rq}
end
return {'ok', r.acc, '', '', '', '', '', fates, held, ended, asker, cpos, rpos, rq}
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
    "fate": FATE, "acked": ACKED, "token": TOKEN, "reclaim": RECLAIM, "take": TAKE, "depart": DEPART,
}
