"""Model components: InternViT, patch stem, connector, decoder (with optional visual experts), full models."""
