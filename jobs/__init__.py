"""Cluster job entry points (``main(argv=None)``), launchable with ``ray job submit -- python jobs/<x>.py``."""
