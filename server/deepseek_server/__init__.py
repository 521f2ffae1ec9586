"""OpenAI-compatible model server for DeepSeek-family models: batching, API keys, rate limits, audit, metrics."""

__version__ = "0.2.0"
