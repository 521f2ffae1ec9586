"""deepseek-operator: serves DeepSeek models on Kubernetes and issues their API keys."""

__version__ = "0.2.0"
