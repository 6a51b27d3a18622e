# budget-proxy on its embedded store. For several replicas, set REDIS_URL.
# The shipped config has no `keys`: give the image a config with keys (mount it over
# /app/config.yaml), or, to serve anyone, -e BUDGET_PROXY_ALLOW_OPEN_AUTH=true; otherwise it
# refuses to start, since it listens on 0.0.0.0.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# One tokenizer cache, filled and checked here at build time; every start only reads it
# (as `nobody`) instead of extracting the encodings into a new temporary directory.
ENV TIKTOKEN_CACHE_DIR=/opt/budget-proxy/tiktoken
RUN pip install --no-cache-dir . \
    && python -c "from proxy.tokens import TokenCounter; assert not TokenCounter.load().approximate" \
    && chmod -R a+rX /opt/budget-proxy
COPY config.yaml ./
COPY policies ./policies
ENV BUDGET_PROXY_HOST=0.0.0.0 BUDGET_PROXY_PORT=8787
EXPOSE 8787
USER nobody
# No curl in python-slim: the standard library asks /healthz (a non-2xx or no answer fails).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BUDGET_PROXY_PORT', '8787'), timeout=4)"]
# On SIGTERM open requests get BUDGET_PROXY_SHUTDOWN_GRACE_SECONDS (30 s), then settle; Docker
# kills after 10 s unless told otherwise: `docker run --stop-timeout 45 …` (or a lower grace).
CMD ["budget-proxy", "serve", "--config", "/app/config.yaml"]
