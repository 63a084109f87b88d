-- Argo CD health of an llmops.dev resource (FineTune, BatchInference, LLMService), read from the status the
-- operator writes: kstatus conditions Ready / Reconciling / Stalled, phase and observedGeneration.
--   Progressing  no status yet, or the operator has not seen the latest spec (observedGeneration < generation),
--                or Reconciling (a job is running, a service is starting or upgrading, waiting on a FineTune or
--                for a node that fits)
--   Suspended    phase Suspended (spec.suspend is true; condition Suspended=True instead of Ready)
--   Degraded     Stalled=True (failed, invalid spec, image pull errors, waits past their grace period ...)
--   Healthy      Ready=True (a job Succeeded, a service is serving)
-- Argo CD runs this with obj bound to the live object and reads the returned table. It opens only Lua's base,
-- package and table libraries and part of os for it: no string.* functions here.
local hs = {}
local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the llmops operator to report status"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the llmops operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type ~= nil then
      conditions[condition.type] = condition
    end
  end
end

local function describe(condition)
  local phase = status.phase or "Unknown"
  local message = status.message or ""
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    message = condition.message
  end
  if condition ~= nil and condition.reason ~= nil and condition.reason ~= "" then
    phase = phase .. " (" .. condition.reason .. ")"
  end
  if message == "" then
    return phase
  end
  return phase .. ": " .. message
end

local function is_true(name)
  local condition = conditions[name]
  if condition == nil or condition.status ~= "True" then
    return nil
  end
  -- A condition written for an older spec says nothing about the current one.
  if generation ~= nil and condition.observedGeneration ~= nil and condition.observedGeneration < generation then
    return nil
  end
  return condition
end

if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(conditions["Suspended"] or conditions["Ready"])
  return hs
end

local stalled = is_true("Stalled")
if stalled ~= nil then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

local ready = is_true("Ready")
if ready ~= nil then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
hs.message = describe(is_true("Reconciling") or conditions["Ready"])
return hs
