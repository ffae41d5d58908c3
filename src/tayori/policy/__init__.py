"""Policy: decisions per SMTP phase (today: relay control at RCPT, :mod:`.relay`)."""
