"""OpenAI-compatible HTTP server: AsyncEngine (engine thread), API routes, Prometheus metrics."""
