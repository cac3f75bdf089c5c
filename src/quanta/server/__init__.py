"""OpenAI-compatible HTTP server: AsyncEngine (engine thread), API routes, Prometheus metrics.

The server's default limits live here, importable without the web stack (the CLI shows them in --help).
"""

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
DEFAULT_PRIORITY_RANGE = (-1000, 1000)
DEFAULT_MAX_TENANT_LABELS = 100  # tenants with their own metric series; the rest share one label
