-- wrk script for bench/proxy_bench.py: POST one chat completion, print a machine-readable summary.
--
--   BENCH_BODY=... BENCH_BEARER=... wrk -t1 -c32 -d10s -s bench/wrk_post.lua http://127.0.0.1:8787/v1/chat/completions
--
-- Without BENCH_BODY it sends the benchmark's standard non-streaming request. The `done` hook
-- prints one line starting with "BENCH_JSON " holding exact percentiles in microseconds (wrk's
-- own --latency table rounds them) and every error counter (status = responses >= 400).

local body = os.getenv("BENCH_BODY")
if body == nil or body == "" then
  body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}'
end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_BEARER") or "bench")

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.3f,"stdev":%.3f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
