"""The identification service: galleries, Identify and retrospective jobs."""
