"""Delivery: hand queued messages to their next hop (remote SMTP, LMTP) and report back."""
