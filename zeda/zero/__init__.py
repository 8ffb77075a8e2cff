"""Zero-output experts: injection, zero-aware routing, teacher mode and experts backends."""
