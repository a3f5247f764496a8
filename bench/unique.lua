-- wrk script: every request is a new conversion, with random click and transaction ids as
-- trackers make them (ids in arrival order would spare the store's indexes the random
-- inserts that real traffic costs). The thread's number ends each id, so two threads never
-- send the same one; a wrk run given a salt (`wrk … -- b`) ends its ids with it too, so two
-- wrk processes at once never send the same ids either.
local counter = 0
setup = function(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
local hex = "0123456789abcdef"
local function rid(n)
  local t = {}
  for i = 1, n do
    local k = math.random(1, 16)
    t[i] = hex:sub(k, k)
  end
  return table.concat(t) .. "x" .. tid .. salt
end
salt = ""
init = function(args)
  salt = args[1] or ""
  math.randomseed(os.time() * 1000 + tid + 7919 * #salt)
end
request = function()
  return wrk.format("GET", "/postback?clickid=" .. rid(24) .. "&tid=" .. rid(16) .. "&payout=1.5&status=approved&offer_id=1")
end
