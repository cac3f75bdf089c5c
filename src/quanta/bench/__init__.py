"""Load generation against any OpenAI-compatible server (quanta, vLLM, ...)."""
