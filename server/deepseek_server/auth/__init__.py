"""API-key auth per docs/auth-contract.md: EdDSA JWTs verified against JWKS loaded from a directory or ConfigMap."""
