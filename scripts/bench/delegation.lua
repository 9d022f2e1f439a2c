-- wrk script: a sub-agent exchanges a delegation grant (GRANT) with its own JWT-SVID (ACTOR)
-- as actor_token (SPEC §4.4).
local grant = os.getenv("GRANT")
local actor = os.getenv("ACTOR")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.body = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
  .. "&subject_token=" .. grant
  .. "&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token"
  .. "&actor_token=" .. actor
  .. "&actor_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt"
  .. "&scope=repo%3Aread&audience=https%3A%2F%2Fapi.example.org"

done = function(summary, latency, requests)
  io.write(string.format("wrk_requests=%d\n", summary.requests))
  io.write(string.format("wrk_errors=%d\n", summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  io.write(string.format("p50_ms=%.3f\n", latency:percentile(50) / 1000))
  io.write(string.format("p99_ms=%.3f\n", latency:percentile(99) / 1000))
  io.write(string.format("rps=%.0f\n", summary.requests / (summary.duration / 1e6)))
end
