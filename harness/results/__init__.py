"""Results: predictions (their schema and files), metrics, leaderboards, charts, the report, tracking and run
records."""
