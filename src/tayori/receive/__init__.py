"""Receiving mail: listeners, sessions, TLS, PROXY protocol, trace headers."""
