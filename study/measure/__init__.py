"""Measurements of a model (the base, or the base with an adapter). Each stage returns metric rows."""
