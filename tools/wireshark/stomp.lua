-- STOMP 1.0 - 1.2 dissector for Wireshark, written for the karaoke service.
--
-- Wireshark ships no STOMP dissector; with this one a capture of port 61613 reads as
-- the conversation between server, broker and workers. Every frame is decoded into its
-- command, headers and body length; frames spanning TCP segments are reassembled, and
-- several frames in one segment are each shown. Heart-beats (a lone EOL) are marked.
--
-- Filter fields:
--   stomp.command, stomp.destination, stomp.message_id, stomp.body_length,
--   stomp.heartbeat, stomp.header (every "name:value"), stomp.header.<name> for the
--   headers STOMP and this service use, and stomp.job_id: the job a frame is about,
--   including ACK and NACK frames, which carry only the `ack` id of the MESSAGE they
--   settle (the dissector remembers which job each `ack` id delivered).
--
-- Install: copy into your personal Lua plugins folder (Help > About Wireshark > Folders),
-- or run `wireshark -X lua_script:tools/wireshark/stomp.lua capture.pcapng`.
-- Registered on TCP port 61613 (Preferences > Protocols > STOMP to change it) and
-- available in "Decode As" for any other port.

local stomp = Proto("stomp", "STOMP (Simple Text Oriented Messaging Protocol)")

local COMMANDS = {
  CONNECT = true, STOMP = true, CONNECTED = true, SEND = true, SUBSCRIBE = true, UNSUBSCRIBE = true,
  BEGIN = true, COMMIT = true, ABORT = true, ACK = true, NACK = true, DISCONNECT = true,
  MESSAGE = true, RECEIPT = true, ERROR = true,
}

local HEADER_NAMES = {
  -- STOMP 1.2
  "accept-version", "ack", "content-length", "content-type", "destination", "heart-beat", "host", "id",
  "login", "message", "message-id", "passcode", "receipt", "receipt-id", "server", "session",
  "subscription", "transaction", "version",
  -- RabbitMQ
  "persistent", "prefetch-count", "durable", "auto-delete", "redelivered", "requeue", "x-delivery-count",
  "x-queue-type", "x-dead-letter-exchange", "x-dead-letter-routing-key", "x-first-death-reason",
  "x-first-death-queue",
  -- this service (src/messaging/schema.py)
  "type", "kind", "task-id", "job-id", "chunk", "task-token", "attempt-token", "params",
  "input", "input-size", "input-sha256", "result", "result-size", "result-sha256",
  "worker", "attempt", "compute-ms", "error", "final", "action", "task-ids",
}

local f_command = ProtoField.string("stomp.command", "Command")
local f_destination = ProtoField.string("stomp.destination", "Destination")
local f_message_id = ProtoField.string("stomp.message_id", "Message ID")
local f_job_id = ProtoField.uint32("stomp.job_id", "Job ID")
local f_header = ProtoField.string("stomp.header", "Header")
local f_body_length = ProtoField.uint32("stomp.body_length", "Body length")
local f_body = ProtoField.bytes("stomp.body", "Body")
local f_heartbeat = ProtoField.none("stomp.heartbeat", "Heart-beat")

local header_fields = {}
local all_fields = { f_command, f_destination, f_message_id, f_job_id, f_header, f_body_length, f_body, f_heartbeat }
for _, name in ipairs(HEADER_NAMES) do
  header_fields[name] = ProtoField.string("stomp.header." .. name, name)
  all_fields[#all_fields + 1] = header_fields[name]
end
stomp.fields = all_fields

stomp.prefs.port = Pref.uint("TCP port", 61613, "TCP port STOMP is decoded on")

-- ack id -> job id, filled from MESSAGE frames, read for ACK/NACK frames (first pass is in order)
local job_of_ack = {}
function stomp.init()
  job_of_ack = {}
end

-- STOMP 1.2 header escapes: \\ \n \r \c
local function unescape(value)
  return (value:gsub("\\(.)", { ["\\"] = "\\", n = "\n", r = "\r", c = ":" }))
end

local MAX_HEADER_BYTES = 65536
local SCAN_CHUNK = 65536

-- Where the frame starting at `offset` ends. Returns (end_offset) for a whole frame,
-- (nil, bytes_needed) when more data is needed, or (false) when this is not STOMP.
local function frame_end(tvb, offset)
  local available = tvb:len() - offset
  local head = tvb:raw(offset, math.min(available, MAX_HEADER_BYTES))
  if head:sub(1, 1) == "\n" then return offset + 1 end
  if head:sub(1, 2) == "\r\n" then return offset + 2 end
  if head == "\r" then return nil, 1 end
  local command = head:match("^([A-Z]+)\r?\n")
  if command == nil then
    if #head < 16 and head:match("^[A-Z]*$") then return nil, DESEGMENT_ONE_MORE_SEGMENT end
    return false
  end
  if not COMMANDS[command] then return false end
  local _, blank_end = head:find("\r?\n\r?\n")
  if blank_end == nil then
    if available >= MAX_HEADER_BYTES then return false end
    return nil, DESEGMENT_ONE_MORE_SEGMENT
  end
  local length = head:sub(1, blank_end):match("\ncontent%-length:(%d+)")
  if length then
    local total = blank_end + tonumber(length) + 1  -- headers, body, NUL
    if available < total then return nil, total - available end
    return offset + total
  end
  -- no content-length: the body ends at the first NUL
  local position = offset + blank_end
  while position < tvb:len() do
    local chunk = tvb:raw(position, math.min(SCAN_CHUNK, tvb:len() - position))
    local nul = chunk:find("\0", 1, true)
    if nul then return position + nul end
    position = position + #chunk
  end
  return nil, DESEGMENT_ONE_MORE_SEGMENT
end

local function summary(command, headers)
  local parts = { command }
  if headers["destination"] then parts[#parts + 1] = headers["destination"] end
  local job = headers["job-id"]
  if job then parts[#parts + 1] = "job=" .. job end
  if headers["chunk"] then parts[#parts + 1] = "chunk=" .. headers["chunk"] end
  if headers["type"] and headers["type"] ~= "job" then parts[#parts + 1] = headers["type"] end
  if headers["redelivered"] == "true" then parts[#parts + 1] = "redelivered" end
  if headers["x-delivery-count"] then parts[#parts + 1] = "delivery=" .. headers["x-delivery-count"] end
  if headers["receipt"] and command ~= "MESSAGE" then  -- a MESSAGE repeats its publisher's receipt header
    parts[#parts + 1] = "receipt=" .. headers["receipt"]:sub(1, 8)
  end
  if headers["receipt-id"] then parts[#parts + 1] = "receipt-id=" .. headers["receipt-id"]:sub(1, 8) end
  if headers["login"] then parts[#parts + 1] = "login=" .. headers["login"] end
  if headers["message"] then parts[#parts + 1] = headers["message"] end
  return table.concat(parts, " ")
end

local tcp_len = Field.new("tcp.len")

local function dissect_frame(tvb, pinfo, tree, offset, finish)
  local range = tvb(offset, finish - offset)
  local text = range:raw()
  if text == "\n" or text == "\r\n" then
    -- An EOL that begins the rest of a segment whose first part ended a reassembled frame is
    -- that frame's optional trailing EOL; an EOL on its own is a heart-beat.
    local segment = tcp_len()
    if offset == 0 and segment and segment.value > tvb:len() then
      tree:add(stomp, range, "STOMP end of frame (EOL)")
      return "trailer"
    end
    local item = tree:add(stomp, range, "STOMP heart-beat")
    item:add(f_heartbeat, range)
    return "heart-beat"
  end
  local _, blank_end = text:find("\r?\n\r?\n")
  local head = text:sub(1, blank_end)
  local command = head:match("^([A-Z]+)")
  local subtree = tree:add(stomp, range)
  subtree:add(f_command, tvb(offset, #command), command)

  local headers = {}
  local line_start = head:find("\n", 1, true) + 1  -- the line after the command
  while true do
    local newline = head:find("\n", line_start, true)
    if newline == nil then break end
    local line = head:sub(line_start, newline - 1):gsub("\r$", "")
    if line == "" then break end
    local name, value = line:match("^([^:]*):(.*)$")
    if name then
      local line_range = tvb(offset + line_start - 1, #line)
      name, value = unescape(name), unescape(value)
      if headers[name] == nil then headers[name] = value end  -- STOMP: a repeated header's first value wins
      subtree:add(f_header, line_range, name .. ": " .. value)
      if header_fields[name] then subtree:add(header_fields[name], line_range, value) end
    end
    line_start = newline + 1
  end

  if headers["destination"] then subtree:add(f_destination, tvb(offset, blank_end), headers["destination"]) end
  if headers["message-id"] then subtree:add(f_message_id, tvb(offset, blank_end), headers["message-id"]) end
  local job = tonumber(headers["job-id"] or "")
  if command == "MESSAGE" and job and headers["ack"] then job_of_ack[headers["ack"]] = job end
  if (command == "ACK" or command == "NACK") and headers["id"] then job = job or job_of_ack[headers["id"]] end
  if job then
    local item = subtree:add(f_job_id, tvb(offset, blank_end), job)
    if not headers["job-id"] then item:set_generated() end
  end

  local body_length = finish - offset - blank_end - 1
  subtree:add(f_body_length, tvb(offset + blank_end, 0), body_length)
  if body_length > 0 then subtree:add(f_body, tvb(offset + blank_end, body_length)) end
  local info = summary(command, headers)
  if (command == "ACK" or command == "NACK") and job then info = info .. " job=" .. job end
  subtree:append_text(": " .. info)
  return info
end

function stomp.dissector(tvb, pinfo, tree)
  local offset, infos = 0, {}
  while offset < tvb:len() do
    local finish, needed = frame_end(tvb, offset)
    if finish == false then
      if offset == 0 then return 0 end
      break
    end
    if finish == nil then
      -- ask TCP for more; claiming the whole buffer (not `offset`) tells it the bytes are ours
      pinfo.desegment_offset = offset
      pinfo.desegment_len = needed
      offset = tvb:len()
      break
    end
    local info = dissect_frame(tvb, pinfo, tree, offset, finish)
    if info ~= "trailer" and (info ~= "heart-beat" or #infos == 0) then infos[#infos + 1] = info end
    offset = finish
    if info ~= "heart-beat" and info ~= "trailer" then  -- EOLs right after a frame's NUL belong to it
      while offset < tvb:len() and tvb(offset, 1):uint() == 0x0a do offset = offset + 1 end
    end
  end
  if #infos > 0 then
    pinfo.cols.protocol = "STOMP"
    pinfo.cols.info = table.concat(infos, "; ")
  end
  -- a packet whose only STOMP bytes end another packet's frame keeps that frame's Info
  return offset
end

local tcp_port = DissectorTable.get("tcp.port")
local registered_port = stomp.prefs.port
tcp_port:add(registered_port, stomp)
tcp_port:add_for_decode_as(stomp)

function stomp.prefs_changed()
  if stomp.prefs.port ~= registered_port then
    tcp_port:remove(registered_port, stomp)
    registered_port = stomp.prefs.port
    tcp_port:add(registered_port, stomp)
  end
end
