"""Ray glue: Ray Data stages and the Ray Train trainer builder. Imports ray; keep it out of the core."""
