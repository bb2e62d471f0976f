"""A run's files: its directory and lock (``directory``), checkpoints (``checkpoint``), the exported student
(``export``), the log, metrics and W&B (``logger``) and what the run says of itself (``description``)."""
