"""Routing between served models: policies for the virtual model `auto`."""
