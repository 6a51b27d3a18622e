# budget-proxy on its embedded store. For several replicas, set REDIS_URL.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . \
    && python -c "from proxy.tokens import TokenCounter; assert not TokenCounter.load().approximate"
COPY config.yaml ./
COPY policies ./policies
ENV BUDGET_PROXY_HOST=0.0.0.0 BUDGET_PROXY_PORT=8787
EXPOSE 8787
USER nobody
CMD ["budget-proxy", "serve", "--config", "/app/config.yaml"]
