"""`kubectl deepseek`, the kubectl plugin of deepseek-operator (installed as the `kubectl-deepseek` executable)."""
