-- wrk script: repeats a held `deploy:prod` request with one of the approval ids of the file in
-- APPROVAL_IDS, round robin (the polls of many clients waiting for their approvals).
local svid = os.getenv("SVID")
local ids = {}
for line in io.lines(os.getenv("APPROVAL_IDS")) do ids[#ids + 1] = line end
local n = 0
local prefix = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
  .. "&subject_token=" .. svid
  .. "&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt"
  .. "&scope=deploy%3Aprod&audience=https%3A%2F%2Fapi.example.org&task_purpose=bench&approval_id="

request = function()
  n = n + 1
  local id = ids[(n % #ids) + 1]
  return wrk.format("POST", nil, {["Content-Type"] = "application/x-www-form-urlencoded"}, prefix .. id)
end

done = function(summary, latency, requests)
  io.write(string.format("wrk_requests=%d\n", summary.requests))
  io.write(string.format("wrk_errors=%d\n", summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  io.write(string.format("p50_ms=%.3f\n", latency:percentile(50) / 1000))
  io.write(string.format("p99_ms=%.3f\n", latency:percentile(99) / 1000))
  io.write(string.format("rps=%.0f\n", summary.requests / (summary.duration / 1e6)))
end
