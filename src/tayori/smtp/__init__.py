"""The SMTP protocol, sans-IO: commands, content framing, the server engine; shared with
the client side when delivery is built."""
