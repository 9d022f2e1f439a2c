-- wrk script: POST an introspection of TOKEN with BEARER as the caller's credential.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BEARER")
wrk.body = "token=" .. os.getenv("TOKEN")

local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) inactive = 0 end
response = function(status, headers, body)
  if status ~= 200 or not string.find(body, '"active":true', 1, true) then inactive = inactive + 1 end
end

done = function(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("inactive") end
  io.write(string.format("wrk_not_active=%d\n", n))
  io.write(string.format("wrk_requests=%d\n", summary.requests))
  io.write(string.format("wrk_errors=%d\n", summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  io.write(string.format("p50_ms=%.3f\n", latency:percentile(50) / 1000))
  io.write(string.format("p99_ms=%.3f\n", latency:percentile(99) / 1000))
  io.write(string.format("rps=%.0f\n", summary.requests / (summary.duration / 1e6)))
end
