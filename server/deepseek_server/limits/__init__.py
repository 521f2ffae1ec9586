"""Per-key rate limits: requests/s with burst (GCRA), tokens per minute, parallel requests."""
