"""The `harness` command line, its console and logs, the demo pipeline, and the Ray job entry points."""
