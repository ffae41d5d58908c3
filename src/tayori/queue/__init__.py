"""The queue: the durable spool (:mod:`.spool`); the queue manager comes with delivery."""
