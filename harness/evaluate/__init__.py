"""Evaluation of many agents in one Ray Data job: its config, one predictor per backend, and the driver."""
