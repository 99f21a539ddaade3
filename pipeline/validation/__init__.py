"""Data validation's parts: the rules (`rules`), the Great Expectations adapter (`expectations`) and what a
reviewer reads (`summary`); the stage that builds the tables and runs them is `pipeline.validate`."""
