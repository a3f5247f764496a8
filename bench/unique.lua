-- wrk script: every request is a new conversion (unique click and transaction ids).
local counter = 0
local thread_id = 0
setup = function(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
init = function(args)
  n = 0
end
request = function()
  n = n + 1
  local id = tid .. "-" .. n
  return wrk.format("GET", "/postback?clickid=c" .. id .. "&tid=t" .. id .. "&payout=1.5&status=approved&offer_id=1")
end
