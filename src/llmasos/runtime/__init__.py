"""The engines a model runs on, and the one switch that picks among them (`open_model`)."""
