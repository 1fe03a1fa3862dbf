"""The server: an OpenAI-compatible HTTP service over the kernel; keys, limits, metrics, audit."""
