"""OpenAI-compatible HTTP server, policy layer and the inferctl command line."""
