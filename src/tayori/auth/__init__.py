"""Sender authentication: SPF, DKIM (verify and sign), DMARC, ARC, Authentication-Results.

Each module is sans-policy: it evaluates and reports results as typed values; the
receive stage decides what to do with them (config ``[auth]``).
"""
