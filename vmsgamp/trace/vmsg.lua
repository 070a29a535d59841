-- vmsg.lua: Wireshark/tshark dissector for virtio-msg captures written by vmsgamp.
--
--   wireshark -X lua_script:$(vmsgamp trace --dissector-path) capture.pcapng
--   tshark    -X lua_script:$(vmsgamp trace --dissector-path) -r capture.pcapng -2 -V
--
-- Captures are pcapng with link type LINKTYPE_USER0 (147), one interface per
-- bus; the interface description "virtio-msg g1" selects the 6-byte G1
-- header, anything else the 8-byte G2 header (with token).  Field names and
-- values follow `vmsgamp decode --json`: header fields vmsg.*, payload fields
-- vmsg.<message name in snake_case>.<field>; malformed messages carry
-- vmsg.error with decode's reason and an expert-info entry.  Requests and
-- responses are paired (vmsg.response_in, vmsg.request_in, vmsg.time); the
-- forward link needs two passes (tshark -2), as for DNS.
--
-- The decoding rules (sizes, minimums, error texts) mirror
-- vmsgamp/protocol/_codec.py and _messages.py; tests/test_dissector.py runs
-- tshark on every message type and holds the two to each other.

local vmsg = Proto("vmsg", "virtio-msg")

local SLOT_SIZE = 64          -- the largest msg_size accepted (one FIFO slot)
local TYPE_RESPONSE = 1
local TYPE_BUS = 2

-- ---- message table ----------------------------------------------------------
-- Payload items in wire order: {name, kind}; kinds: u16, u32, u64 (fields),
-- pad4 (a reserved word, not a field), and the tails:
--   features  u32 words, as many as the preceding num_blocks
--   data      length bytes (the preceding `length`); missing bytes: malformed
--   echo      SET_CONFIG response: the echo is optional (all or nothing)
--   bitmap    count / 8 bytes (the preceding `count`)
-- `g1` gives the 6-byte-header layout where it differs.
local U32 = "u32"
local MESSAGES = {
  -- transport requests / events (key: msg_id), responses (0x100 + msg_id);
  -- bus messages add 0x200.
  [0x002] = {name = "GET_DEVICE_INFO", items = {}},
  [0x102] = {name = "GET_DEVICE_INFO", items = {{"device_id", U32}, {"vendor_id", U32},
      {"num_feature_bits", U32}, {"config_size", U32}, {"max_virtqueues", U32},
      {"admin_vq_start", "u16"}, {"admin_vq_count", "u16"}}},
  [0x003] = {name = "GET_DEVICE_FEATURES", items = {{"block_index", U32}, {"num_blocks", U32}}},
  [0x103] = {name = "GET_DEVICE_FEATURES", items = {{"block_index", U32}, {"num_blocks", U32},
      {"features", "features"}}},
  [0x004] = {name = "SET_DRIVER_FEATURES", items = {{"block_index", U32}, {"num_blocks", U32},
      {"features", "features"}}},
  [0x104] = {name = "SET_DRIVER_FEATURES", items = {}},
  [0x005] = {name = "GET_CONFIG", items = {{"offset", U32}, {"length", U32}}},
  [0x105] = {name = "GET_CONFIG", items = {{"generation", U32}, {"offset", U32}, {"length", U32},
      {"data", "data"}}},
  [0x006] = {name = "SET_CONFIG", items = {{"generation", U32}, {"offset", U32}, {"length", U32},
      {"data", "data"}}},
  [0x106] = {name = "SET_CONFIG", items = {{"generation", U32}, {"offset", U32}, {"length", U32},
      {"data", "echo"}}},
  [0x007] = {name = "GET_DEVICE_STATUS", items = {}},
  [0x107] = {name = "GET_DEVICE_STATUS", items = {{"status", U32}}},
  [0x008] = {name = "SET_DEVICE_STATUS", items = {{"status", U32}}},
  [0x108] = {name = "SET_DEVICE_STATUS", items = {{"status", U32}}},
  [0x009] = {name = "GET_VQUEUE", items = {{"index", U32}}},
  [0x109] = {name = "GET_VQUEUE",
      items = {{"index", U32}, {"max_size", U32}, {"cur_size", U32}, {"reserved", "pad4"},
               {"desc_addr", "u64"}, {"driver_addr", "u64"}, {"device_addr", "u64"}},
      g1 = {{"index", U32}, {"max_size", U32}, {"cur_size", U32},
            {"desc_addr", "u64"}, {"driver_addr", "u64"}, {"device_addr", "u64"}}},
  [0x00A] = {name = "SET_VQUEUE",
      items = {{"index", U32}, {"reserved0", "pad4"}, {"size", U32}, {"reserved1", "pad4"},
               {"desc_addr", "u64"}, {"driver_addr", "u64"}, {"device_addr", "u64"}},
      g1 = {{"index", U32}, {"unused", "pad4"}, {"size", U32},
            {"desc_addr", "u64"}, {"driver_addr", "u64"}, {"device_addr", "u64"}}},
  [0x10A] = {name = "SET_VQUEUE", items = {}},
  [0x00B] = {name = "RESET_VQUEUE", items = {{"index", U32}}},
  [0x10B] = {name = "RESET_VQUEUE", items = {}},
  [0x00C] = {name = "GET_SHM", items = {{"index", U32}}},
  [0x10C] = {name = "GET_SHM", items = {{"index", U32}, {"length", U32}, {"address", U32}}},
  [0x040] = {name = "EVENT_CONFIG", items = {{"device_status", U32}, {"generation", U32},
      {"offset", U32}, {"length", U32}, {"data", "data"}}},
  [0x041] = {name = "EVENT_AVAIL", items = {{"vq_index", U32}, {"next_offset_wrap", U32}}},
  [0x042] = {name = "EVENT_USED", items = {{"vq_index", U32}}},
  [0x202] = {name = "GET_DEVICES", items = {{"offset", "u16"}, {"count", "u16"}}, count8 = true},
  [0x302] = {name = "GET_DEVICES", items = {{"offset", "u16"}, {"count", "u16"},
      {"next_offset", "u16"}, {"bitmap", "bitmap"}}},
  [0x203] = {name = "PING", items = {{"data", U32}}},
  [0x303] = {name = "PING", items = {{"data", U32}}},
  [0x240] = {name = "EVENT_DEVICE", items = {{"device_number", "u16"}, {"device_bus_state", "u16"}}},
}

local WIDTH = {u16 = 2, u32 = 4, u64 = 8, pad4 = 4}

local function is_hex_key(key)
  for _, suffix in ipairs({"addr", "address", "vendor_id", "features"}) do
    if key:sub(-#suffix) == suffix then return true end
  end
  return false
end

-- ---- fields -------------------------------------------------------------------
local hf = {
  type = ProtoField.uint8("vmsg.type", "Type", base.HEX),
  msg_id = ProtoField.uint8("vmsg.msg_id", "Message ID", base.HEX),
  dev_num = ProtoField.uint16("vmsg.dev_num", "Device number", base.DEC),
  token = ProtoField.uint16("vmsg.token", "Token", base.DEC),
  msg_size = ProtoField.uint16("vmsg.msg_size", "Message size", base.DEC),
  kind = ProtoField.string("vmsg.kind", "Kind"),
  response = ProtoField.bool("vmsg.response", "Response"),
  name = ProtoField.string("vmsg.name", "Name"),
  error = ProtoField.string("vmsg.error", "Malformed"),
  response_in = ProtoField.framenum("vmsg.response_in", "Response in", base.NONE, frametype.RESPONSE),
  request_in = ProtoField.framenum("vmsg.request_in", "Request in", base.NONE, frametype.REQUEST),
  time = ProtoField.relative_time("vmsg.time", "Response time"),
}
local payload_hf = {}   -- "vmsg.<name>.<field>" -> ProtoField

local function snake(name) return name:lower() end

for _, spec in pairs(MESSAGES) do
  for _, layout in ipairs({spec.items, spec.g1 or {}}) do
    for _, item in ipairs(layout) do
      local key, kind = item[1], item[2]
      local abbr = "vmsg." .. snake(spec.name) .. "." .. key
      if kind ~= "pad4" and payload_hf[abbr] == nil then
        local b = is_hex_key(key) and base.HEX or base.DEC
        local f
        if kind == "u16" then f = ProtoField.uint16(abbr, key, b)
        elseif kind == "u32" or kind == "features" then f = ProtoField.uint32(abbr, key, b)
        elseif kind == "u64" then f = ProtoField.uint64(abbr, key, b)
        else f = ProtoField.bytes(abbr, key) end
        payload_hf[abbr] = f
      end
    end
  end
end

local all_fields = {}
for _, f in pairs(hf) do table.insert(all_fields, f) end
for _, f in pairs(payload_hf) do table.insert(all_fields, f) end
vmsg.fields = all_fields

local ef_malformed = ProtoExpert.new("vmsg.malformed", "Malformed virtio-msg message",
                                     expert.group.MALFORMED, expert.severity.ERROR)
vmsg.experts = {ef_malformed}

vmsg.prefs.header = Pref.enum("Header", 0,
  "Header generation when the capture does not say (interface description)",
  {{1, "auto", 0}, {2, "g2", 2}, {3, "g1", 1}}, false)

local f_if_desc = Field.new("frame.interface_description")
local f_if_id = Field.new("frame.interface_id")
local f_time = Field.new("frame.time")

-- ---- request/response pairing -------------------------------------------------
-- The first time a frame is dissected with its frame fields available (a
-- pass without a protocol tree has none: the interface, hence the header
-- generation, is unknown there) every request is remembered under
-- (interface, kind, msg_id, dev_num, token); a response takes the newest
-- unanswered request with its key (bus responses with token 0, as QEMU
-- sends them, match by msg_id alone).  Links are kept per frame for later
-- passes.  Not pinfo.visited: tshark -2 without a filter does not dissect on
-- its first pass, so the first look at a frame may be a "visited" one.
local pending, links, done

function vmsg.init()
  pending = {}   -- key -> list of {frame, time}, newest last
  links = {}     -- frame -> {other = frame, time = NSTime (responses only)}
  done = {}      -- frames already paired
end

local function take(key, frame_no, ts)
  local list = pending[key]
  if not list or #list == 0 then return nil end
  local req = table.remove(list)
  links[req.frame] = {other = frame_no}
  links[frame_no] = {other = req.frame, time = ts - req.time}
  return req
end

local function pair(pinfo, ts, iface, is_bus, is_resp, msg_id, dev_num, token)
  if done[pinfo.number] then return end
  done[pinfo.number] = true
  local base_key = iface .. ":" .. (is_bus and "b" or "t") .. ":" .. msg_id
  local key = base_key .. ":" .. dev_num .. ":" .. (token or "-")
  if not is_resp then
    if msg_id >= 0x40 then return end     -- events are never answered
    for _, k in ipairs({key, base_key}) do
      pending[k] = pending[k] or {}
      table.insert(pending[k], {frame = pinfo.number, time = ts})
    end
    return
  end
  local req = take(key, pinfo.number, ts)
  if not req and is_bus and token == 0 then req = take(base_key, pinfo.number, ts) end
  if req then
    -- the request leaves the other index too
    for _, k in ipairs({key, base_key}) do
      local list = pending[k]
      if list then
        for i = #list, 1, -1 do
          if list[i].frame == req.frame then table.remove(list, i) end
        end
      end
    end
  end
end

-- ---- formatting (mirrors vmsgamp/trace/_format.py: summary) ----------------------
local function fmt_int(key, v)
  -- v: a Lua number (u16/u32) or a UInt64
  if type(v) == "userdata" then
    local hex = v:tohex():gsub("^0+", "")
    return "0x" .. (hex == "" and "0" or hex)
  end
  if is_hex_key(key) or v > 0xFFFF then return string.format("0x%x", v) end
  return string.format("%d", v)
end

local function fmt_bytes(ba)
  return ba:tohex():lower()
end

-- ---- the dissector ----------------------------------------------------------------
local function header_profile()
  local pref = vmsg.prefs.header
  if pref == 1 then return "g1" elseif pref == 2 then return "g2" end
  local desc = f_if_desc()
  if desc and tostring(desc.value):lower() == "virtio-msg g1" then return "g1" end
  return "g2"
end

local function malformed(tree, pinfo, text)
  tree:add(hf.error, text)
  tree:add_proto_expert_info(ef_malformed, text)
  pinfo.cols.info:set("malformed: " .. text)
end

-- The payload's items as {key, offset, length, kind[, count]}, checked
-- exactly as vmsgamp's codec checks them; nil and decode's error text when
-- the message is malformed.
local function parse_payload(spec, layout, buf)
  local values, order = {}, {}
  local pos = 0
  local fixed = 0
  for _, item in ipairs(layout) do
    local w = WIDTH[item[2]]
    if w then fixed = fixed + w end
  end
  local function tail_len() return buf:len() - fixed end
  for _, item in ipairs(layout) do
    local key, kind = item[1], item[2]
    if kind == "u16" then
      values[key] = buf(pos, 2):le_uint(); table.insert(order, {key, pos, 2, kind}); pos = pos + 2
    elseif kind == "u32" then
      values[key] = buf(pos, 4):le_uint(); table.insert(order, {key, pos, 4, kind}); pos = pos + 4
    elseif kind == "u64" then
      values[key] = buf(pos, 8):le_uint64(); table.insert(order, {key, pos, 8, kind}); pos = pos + 8
    elseif kind == "pad4" then
      pos = pos + 4
    elseif kind == "features" then
      local count = values.num_blocks
      if count * 4 > tail_len() then
        return nil, string.format("%s: num_blocks %d needs %d bytes, message has %d",
                                  spec.name, count, count * 4, tail_len())
      end
      table.insert(order, {key, pos, 4 * count, kind, count})
      pos = pos + 4 * count
    elseif kind == "data" then
      local length = values.length
      if length > tail_len() then
        return nil, string.format("%s: length %d but only %d data bytes in msg_size",
                                  spec.name, length, tail_len())
      end
      table.insert(order, {key, pos, length, kind})
      pos = pos + length
    elseif kind == "echo" then
      local length = values.length
      local n = (length > 0 and tail_len() >= length) and length or 0
      table.insert(order, {key, pos, n, kind})
      pos = pos + n
    elseif kind == "bitmap" then
      local count = values.count
      if count % 8 ~= 0 then
        return nil, string.format("GET_DEVICES response count %d is not a multiple of 8", count)
      end
      if count / 8 > tail_len() then
        return nil, string.format("GET_DEVICES bitmap: length %d but only %d data bytes in msg_size",
                                  count / 8, tail_len())
      end
      table.insert(order, {key, pos, count / 8, kind})
      pos = pos + count / 8
    end
  end
  if spec.count8 and values.count % 8 ~= 0 then
    return nil, string.format("GET_DEVICES count %d is not a multiple of 8", values.count)
  end
  return order
end

function vmsg.dissector(tvb, pinfo, tree)
  pinfo.cols.protocol:set("VMSG")
  -- EPB flags: outbound (p2p_dir 0, "sent") = driver -> device, inbound (1) = device -> driver.
  if pinfo.p2p_dir == 0 then
    pinfo.cols.src:set("driver"); pinfo.cols.dst:set("device")
  elseif pinfo.p2p_dir == 1 then
    pinfo.cols.src:set("device"); pinfo.cols.dst:set("driver")
  end
  local len = tvb:len()
  local profile = header_profile()
  local g1 = profile == "g1"
  local hdr = g1 and 6 or 8
  local root = tree:add(vmsg, tvb(), "virtio-msg (" .. profile .. ")")
  if len < hdr then
    malformed(root, pinfo, string.format("message too short: %d bytes, header is %d", len, hdr))
    return len
  end
  local mtype = tvb(0, 1):uint()
  local msg_id = tvb(1, 1):uint()
  local dev_num = tvb(2, 2):le_uint()
  local token, msg_size
  root:add(hf.type, tvb(0, 1))
  root:add(hf.msg_id, tvb(1, 1))
  root:add_le(hf.dev_num, tvb(2, 2))
  if g1 then
    msg_size = tvb(4, 2):le_uint()
    root:add_le(hf.msg_size, tvb(4, 2))
  else
    token = tvb(4, 2):le_uint()
    msg_size = tvb(6, 2):le_uint()
    root:add_le(hf.token, tvb(4, 2))
    root:add_le(hf.msg_size, tvb(6, 2))
  end
  if msg_size < hdr or msg_size > SLOT_SIZE then
    malformed(root, pinfo, string.format("msg_size %d outside [%d, %d]", msg_size, hdr, SLOT_SIZE))
    return len
  end
  if msg_size > len then
    malformed(root, pinfo, string.format("msg_size %d but only %d bytes received", msg_size, len))
    return len
  end
  local is_bus = bit.band(mtype, TYPE_BUS) ~= 0
  local is_resp = bit.band(mtype, TYPE_RESPONSE) ~= 0
  local kind = is_bus and "bus" or "transport"
  local spec = MESSAGES[(is_bus and 0x200 or 0) + (is_resp and 0x100 or 0) + msg_id]
  if spec == nil then
    local text
    if is_resp and msg_id >= 0x40 and msg_id < 0x80
        and MESSAGES[(is_bus and 0x200 or 0) + msg_id] ~= nil then
      text = string.format("%s event 0x%02x flagged as a response", kind, msg_id)
    else
      text = string.format("unknown %s %s msg_id 0x%02x", kind,
                           is_resp and "response" or "request/event", msg_id)
    end
    malformed(root, pinfo, text)
    return len
  end
  local layout = (g1 and spec.g1) or spec.items
  local minimum = hdr
  for _, item in ipairs(layout) do minimum = minimum + (WIDTH[item[2]] or 0) end
  if msg_size < minimum then
    malformed(root, pinfo, string.format("%s msg_size %d is below its minimum %d",
                                         spec.name, msg_size, minimum))
    return len
  end
  local payload = tvb(hdr, msg_size - hdr)
  local items, err = parse_payload(spec, layout, payload)
  if items == nil then
    malformed(root, pinfo, err)
    return len
  end

  root:add(hf.kind, kind)
  root:add(hf.response, is_resp)
  root:add(hf.name, spec.name)
  local what = is_resp and "response" or (msg_id >= 0x40 and "event" or "request")
  local info = {spec.name, what, "dev", tostring(dev_num)}
  if not g1 then
    table.insert(info, "tok"); table.insert(info, tostring(token))
  end
  local prefix = "vmsg." .. snake(spec.name) .. "."
  local ptree = root
  if #items > 0 then ptree = root:add(vmsg, payload, "Payload") end
  for _, it in ipairs(items) do
    local key, off, n, k = it[1], it[2], it[3], it[4]
    local f = payload_hf[prefix .. key]
    if k == "features" then
      local words = {}
      for i = 0, it[5] - 1 do
        ptree:add_le(f, payload(off + 4 * i, 4))
        table.insert(words, fmt_int(key, payload(off + 4 * i, 4):le_uint()))
      end
      table.insert(info, key .. "=[" .. table.concat(words, ",") .. "]")
    elseif k == "data" or k == "echo" or k == "bitmap" then
      if n > 0 then
        ptree:add(f, payload(off, n))
        table.insert(info, key .. "=" .. fmt_bytes(payload(off, n):bytes()))
      else
        ptree:add(f, payload(0, 0), "")    -- an empty byte string, still shown
        table.insert(info, key .. "=''")
      end
    else
      ptree:add_le(f, payload(off, n))
      local v = (k == "u64") and payload(off, n):le_uint64() or payload(off, n):le_uint()
      table.insert(info, key .. "=" .. fmt_int(key, v))
    end
  end
  if msg_size < len then
    root:add(tvb(msg_size, len - msg_size), string.format("Bytes beyond msg_size: %d", len - msg_size))
  end
  pinfo.cols.info:set(table.concat(info, " "))

  local ts = f_time()
  if ts then
    local iface = f_if_id()
    pair(pinfo, ts.value, iface and tostring(iface.value) or "0", is_bus, is_resp, msg_id, dev_num, token)
  end
  local link = links[pinfo.number]
  if link then
    if is_resp then
      root:add(hf.request_in, link.other):set_generated()
      if link.time then root:add(hf.time, link.time):set_generated() end
    else
      root:add(hf.response_in, link.other):set_generated()
    end
  end
  return len
end

DissectorTable.get("wtap_encap"):add(wtap_encaps.USER0, vmsg)
