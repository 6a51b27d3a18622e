"""budget-proxy: an OpenAI-compatible reverse proxy that keeps LLM spending inside budgets."""

__version__ = "0.1.0"
