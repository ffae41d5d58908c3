"""Fakes shipped for tests: a DNS stub, a scriptable SMTP peer."""
