"""Replay of logged traffic: log readers and the counterfactual replay."""
