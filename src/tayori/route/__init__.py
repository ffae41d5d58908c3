"""Routing: which next hop a recipient goes to (match rules, DNS MX)."""
