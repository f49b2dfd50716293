"""Turning images, video and chat messages into model inputs, and model output back into boxes."""
