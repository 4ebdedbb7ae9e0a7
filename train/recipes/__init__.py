"""End-to-end recipes built on the train stages."""
