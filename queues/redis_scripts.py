"""The Redis store's key layout and the Lua scripts that change it: every write of
:class:`~oodguard.queues.redis_streams.RedisQueue` is one of these scripts.

Keys (``P`` = ``key_prefix``, default ``oodguard:queue``; standalone Redis, not Redis Cluster):

=====================  ==================================================================================
``P:stream``           the stream: one entry per record, entry id ``<seq>-0``. Fields: ``id``, ``seq``,
                       ``time``, ``model``, ``version``, ``flagged``, ``req`` (its request key, absent for a
                       record without request id and metadata), ``scores`` / ``decision`` (JSON),
                       ``logits`` / ``features`` / ``input`` (packed as in the SQLite queue). An input whose
                       packed bytes exceed ``inline_max_bytes`` is stored in ``P:blob:<id>`` instead (field
                       ``input_ref`` = ``1``); the blob is deleted with the record. Entries written by an
                       older version carry ``request_id`` and ``metadata`` (JSON) inline instead of ``req``.
``P:req:<key>``        hash ``request_id``, ``metadata`` (JSON), ``refs``: one request's id and metadata, stored
                       once for all its records (key = the id of its first record); ``refs`` counts the
                       records that reference it, and the last one deleted (evicted, purged) deletes it
``P:rec``              hash: record id -> ``"<seq>:<flag 1|0>:<state>:<bytes>:<request key>"`` (the mutable
                       state; stream entries are never rewritten). Records of an older version have
                       ``"<seq>:<flag>:<state>"`` and count 0 bytes.
``P:z:<state>:<flag>`` sorted sets of record ids scored by ``seq``, one per state (pending / claimed / sent)
                       and flag (1 = flagged, 0 = sampled): oldest-first order for select / claim
``P:info``             hash: record id -> ``"<time>:<version>:<model>"`` (immutable, written with the entry,
                       deleted with the record): what the model / version / time filters of ``select`` and
                       ``summary`` read instead of the stream entries (which carry the arrays). Records stored
                       by an older version have none; their stream entry is read instead (and an older
                       version deleting a record leaves its entry here: harmless, reads start from ``P:rec``
                       or the sorted sets)
``P:seen``             set of every record id ever stored (dedup; never shrinks: its memory per id is in
                       docs/benchmarks.md, "redis_scripts: the dedup set")
``P:rid:<m>:<r>``      hash: item position -> ``"<record id>:<input digest>"`` of the records stored for model
                       ``<m>`` under request id ``<r>`` (the latest per item; the digest is BLAKE2b-128 of
                       the packed input, hex): what a retry of that request is matched against
                       (idempotency, below). Expires ``idempotency_window_s`` after the last put that stored
                       records for it; written only with the idempotency check on
``P:seq``              insertion counter
``P:bytes``            the bytes of the unharvested (pending + claimed) records: what ``max_bytes`` bounds
``P:counters``         hash: accepted, rejected, evicted
=====================  ==================================================================================

Bytes of a record (as in the SQLite queue): its packed arrays (blob included) + scores and decision JSON; the
first record that stores a request payload also carries the payload's bytes (request id + metadata JSON), so
a request counts once. The put script computes them from the fields, so a spooled record needs no extra item.

Atomicity: Redis runs each script atomically. :data:`PUT_LUA` checks ``P:seen``,
applies both bounds / the full policy, and adds the entry, its state, its id and its reference to the request
payload in one step, so "check id + add" cannot race and a record id lands (and references its request) at
most once; it also looks up and records ``P:rid:<m>:<r>`` in that step, so a retried request
(:mod:`oodguard.queues.base`: every record of it finds a record of the same item position and input digest
that still exists) stores nothing and returns the earlier ids, whichever gateway process wrote them; :data:`CLAIM_LUA`
pops the oldest pending ids and marks them claimed in one step, so two concurrent harvests never get the same
record; :data:`DELETE_LUA` removes records (any state) with their blob, info and request reference in one step.
``P:bytes`` and the ``refs`` of ``P:req:<key>`` change in the same scripts as the records they count.
"""

# Shared by the scripts below. P:rec values are '<seq>:<flag>:<state>:<bytes>:<request key>' (request key ''
# for a record without request); records stored by an older version have '<seq>:<flag>:<state>' and count 0 bytes.
RECORD_LUA = r"""
local function parse(v)
  local seq, f, state, tail = string.match(v, '^(%d+):(%d):(%a+)(.*)$')
  local nbytes, req = string.match(tail, '^:(%d+):(.*)$')
  return seq, f, state, tail, tonumber(nbytes or '0'), req or ''
end
-- drop one reference to a request payload; the last one deletes it
local function unref(P, req)
  if req ~= '' and redis.call('HINCRBY', P .. ':req:' .. req, 'refs', -1) <= 0 then
    redis.call('DEL', P .. ':req:' .. req)
  end
end
-- delete a record everywhere; returns its bytes
local function delete(P, id)
  local seq, f, state, _, nbytes, req = parse(redis.call('HGET', P .. ':rec', id))
  redis.call('ZREM', P .. ':z:' .. state .. ':' .. f, id)
  redis.call('HDEL', P .. ':rec', id)
  redis.call('HDEL', P .. ':info', id)
  redis.call('XDEL', P .. ':stream', seq .. '-0')
  redis.call('DEL', P .. ':blob:' .. id)
  unref(P, req)
  return nbytes
end
"""

# ARGV: max_size, max_bytes, policy, admit (1: ignore the bounds: replayed records), m, then per request payload:
#   key, request_id, metadata; then the idempotency window (ms), r, then per run (a request that may be a retry):
#   its first record (1-based), count, model, request_id, then per record: item ('' = none), input digest; then n,
#   then per record: id, flag, blob ('' = input inline), nfields, field, value, ... (field 'req' names the
#   record's request key)
# Returns per record 1 stored, 2 already stored (dedup), 0 refused (queue full) or, for a retried request, the id
# of the earlier record; then the ids it evicted.
PUT_LUA = RECORD_LUA + r"""
local P = KEYS[1]
local max_size, max_bytes, policy, admit = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
local rec, seen = P .. ':rec', P .. ':seen'
local payloads, i = {}, 6
for _ = 1, tonumber(ARGV[5]) do
  payloads[ARGV[i]] = {ARGV[i + 1], ARGV[i + 2]}
  i = i + 3
end
local window, nruns, runs = ARGV[i], tonumber(ARGV[i + 1]), {}
i = i + 2
for _ = 1, nruns do
  local run = {start = tonumber(ARGV[i]), key = P .. ':rid:' .. ARGV[i + 2] .. ':' .. ARGV[i + 3], items = {},
               digests = {}}
  run.stop = run.start + tonumber(ARGV[i + 1]) - 1
  i = i + 4
  for j = 1, run.stop - run.start + 1 do
    run.items[j], run.digests[j] = ARGV[i], ARGV[i + 1]
    i = i + 2
  end
  runs[run.start] = run
end
-- the ids of the records an earlier copy of the run stored (same item positions and inputs, still there), or nil
local function earlier(run)
  local ids = {}
  for j, item in ipairs(run.items) do
    local v = item ~= '' and redis.call('HGET', run.key, item)
    if not v then return nil end
    local id, digest = string.match(v, '^(.-):(.*)$')
    if digest ~= run.digests[j] or redis.call('HEXISTS', rec, id) == 0 then return nil end
    ids[j] = id
  end
  return ids
end
local n = tonumber(ARGV[i])
i = i + 1
-- what a record's bytes are: arrays, scores, decision (and the inline request of an older spool frame)
local counted = {input = true, logits = true, features = true, scores = true, decision = true,
                 request_id = true, metadata = true}
local first = tonumber(redis.call('GET', P .. ':seq') or '0') + 1
local cur = redis.call('ZCARD', P .. ':z:pending:1') + redis.call('ZCARD', P .. ':z:pending:0')
          + redis.call('ZCARD', P .. ':z:claimed:1') + redis.call('ZCARD', P .. ':z:claimed:0')
local used = tonumber(redis.call('GET', P .. ':bytes') or '0')
local start_used = used
local out, evicted, accepted, rejected = {}, {}, 0, 0
local run, repeated = nil, {}  -- the run record k belongs to; record index -> the id of its earlier copy
for k = 1, n do
  if runs[k] then
    run = runs[k]
    for j, id in ipairs(earlier(run) or {}) do repeated[run.start + j - 1] = id end
  elseif run and k > run.stop then
    run = nil
  end
  local id, flag, blob, nf = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local fields, req, nbytes, info = {}, '', #blob, {}
  for j = 1, nf, 2 do
    local name, value = ARGV[i + 3 + j], ARGV[i + 4 + j]
    fields[j], fields[j + 1] = name, value
    if name == 'req' then req = value elseif counted[name] then nbytes = nbytes + #value end
    if name == 'time' or name == 'version' or name == 'model' then info[name] = value end
  end
  i = i + 4 + nf
  if repeated[k] then
    out[k] = repeated[k]
  elseif redis.call('SISMEMBER', seen, id) == 1 then
    out[k] = 2
  else
    local rkey = P .. ':req:' .. req
    if req ~= '' and redis.call('EXISTS', rkey) == 0 then  -- the first record stored carries its request
      nbytes = nbytes + #payloads[req][1] + #payloads[req][2]
    end
    while policy == 'evict-oldest' and nbytes <= max_bytes and (cur >= max_size or used + nbytes > max_bytes) do
      -- the oldest pending record stored before this call (never one of this call's records)
      local victim, vseq = nil, nil
      for _, f in ipairs({'1', '0'}) do
        local r = redis.call('ZRANGEBYSCORE', P .. ':z:pending:' .. f, '-inf', '(' .. first, 'WITHSCORES', 'LIMIT', 0, 1)
        if r[1] and (vseq == nil or tonumber(r[2]) < vseq) then victim, vseq = r[1], tonumber(r[2]) end
      end
      if not victim then break end
      used = used - delete(P, victim)
      cur = cur - 1
      evicted[#evicted + 1] = victim
    end
    if (cur >= max_size or used + nbytes > max_bytes) and not admit then
      out[k] = 0
      rejected = rejected + 1
    else
      if req ~= '' then
        -- (re)stored if missing: a replayed chunk may just have evicted the last record of its request
        if redis.call('EXISTS', rkey) == 0 then
          redis.call('HSET', rkey, 'request_id', payloads[req][1], 'metadata', payloads[req][2])
        end
        redis.call('HINCRBY', rkey, 'refs', 1)
      end
      local seq = redis.call('INCR', P .. ':seq')
      if blob ~= '' then redis.call('SET', P .. ':blob:' .. id, blob) end
      redis.call('XADD', P .. ':stream', seq .. '-0', 'seq', tostring(seq), unpack(fields))
      redis.call('HSET', rec, id, string.format('%d:%s:pending:%d:%s', seq, flag, nbytes, req))
      redis.call('ZADD', P .. ':z:pending:' .. flag, seq, id)
      if info.model then
        redis.call('HSET', P .. ':info', id, (info.time or '0') .. ':' .. (info.version or '0') .. ':' .. info.model)
      end
      redis.call('SADD', seen, id)
      if run and run.items[k - run.start + 1] ~= '' then  -- what a later copy of its request finds
        redis.call('HSET', run.key, run.items[k - run.start + 1], id .. ':' .. run.digests[k - run.start + 1])
        redis.call('PEXPIRE', run.key, window)
      end
      cur = cur + 1
      used = used + nbytes
      accepted = accepted + 1
      out[k] = 1
    end
  end
end
if used ~= start_used then redis.call('INCRBY', P .. ':bytes', used - start_used) end
if accepted > 0 then redis.call('HINCRBY', P .. ':counters', 'accepted', accepted) end
if rejected > 0 then redis.call('HINCRBY', P .. ':counters', 'rejected', rejected) end
if #evicted > 0 then redis.call('HINCRBY', P .. ':counters', 'evicted', #evicted) end
for _, id in ipairs(evicted) do out[#out + 1] = id end
return out
"""

# ARGV: limit, which ('1', '0' or '*'). Returns id, seq, flag, id, seq, flag, ... of the claimed records.
CLAIM_LUA = RECORD_LUA + r"""
local P, limit, which = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local flags = {which}
if which == '*' then flags = {'1', '0'} end
local cands = {}
for _, f in ipairs(flags) do
  local r = redis.call('ZRANGE', P .. ':z:pending:' .. f, 0, limit - 1, 'WITHSCORES')
  for j = 1, #r, 2 do cands[#cands + 1] = {r[j], tonumber(r[j + 1]), f} end
end
table.sort(cands, function(a, b) return a[2] < b[2] end)
local out = {}
for j = 1, math.min(limit, #cands) do
  local id, seq, f = cands[j][1], cands[j][2], cands[j][3]
  local _, _, _, tail = parse(redis.call('HGET', P .. ':rec', id))
  redis.call('ZREM', P .. ':z:pending:' .. f, id)
  redis.call('ZADD', P .. ':z:claimed:' .. f, seq, id)
  redis.call('HSET', P .. ':rec', id, string.format('%d:%s:claimed', seq, f) .. tail)
  out[#out + 1] = id
  out[#out + 1] = string.format('%d', seq)
  out[#out + 1] = f
end
return out
"""

# ARGV: to_state, from_states (comma separated), ids... Returns the ids that moved.
MOVE_LUA = RECORD_LUA + r"""
local P, to, from = KEYS[1], ARGV[1], ',' .. ARGV[2] .. ','
local moved, freed = {}, 0
for j = 3, #ARGV do
  local id = ARGV[j]
  local v = redis.call('HGET', P .. ':rec', id)
  if v then
    local seq, f, state, tail, nbytes = parse(v)
    if string.find(from, ',' .. state .. ',', 1, true) then
      redis.call('ZREM', P .. ':z:' .. state .. ':' .. f, id)
      redis.call('ZADD', P .. ':z:' .. to .. ':' .. f, seq, id)
      redis.call('HSET', P .. ':rec', id, seq .. ':' .. f .. ':' .. to .. tail)
      -- sent records leave the unharvested set (pending <-> claimed keeps them counted)
      if to == 'sent' then freed = freed + nbytes end
      moved[#moved + 1] = id
    end
  end
end
if freed > 0 then redis.call('DECRBY', P .. ':bytes', freed) end
return moved
"""

# ARGV: record ids. Deletes them whatever their state; returns how many existed.
DELETE_LUA = RECORD_LUA + r"""
local P, n, freed = KEYS[1], 0, 0
for j = 1, #ARGV do
  local v = redis.call('HGET', P .. ':rec', ARGV[j])
  if v then
    local _, _, state = parse(v)
    local nbytes = delete(P, ARGV[j])
    if state ~= 'sent' then freed = freed + nbytes end  -- sent records no longer count in P:bytes
    n = n + 1
  end
end
if freed > 0 then redis.call('DECRBY', P .. ':bytes', freed) end
return n
"""

# ARGV: most records to delete in this call. Returns how many were deleted.
PURGE_LUA = RECORD_LUA + r"""
local P, limit = KEYS[1], tonumber(ARGV[1])
local n = 0
for _, f in ipairs({'1', '0'}) do
  for _, id in ipairs(redis.call('ZRANGE', P .. ':z:sent:' .. f, 0, limit - n - 1)) do
    delete(P, id)  -- sent records no longer count in P:bytes
    n = n + 1
  end
  if n >= limit then break end
end
return n
"""

__all__ = ["RECORD_LUA", "PUT_LUA", "CLAIM_LUA", "MOVE_LUA", "DELETE_LUA", "PURGE_LUA"]
