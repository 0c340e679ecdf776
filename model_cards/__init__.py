"""Jinja templates of the model and dataset cards (installed as the package `hf_influence.model_cards`)."""
