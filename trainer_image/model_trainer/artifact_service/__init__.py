"""The artifact service: a read-only HTTP view of the artifacts volume, and its CLI client.

Both are standard library only (plus structlog for the server's log), so the operator image,
which has no torch, transformers or tokenizers, runs the server."""
