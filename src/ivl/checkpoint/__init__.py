"""Checkpoint layouts (official internvl_chat, transformers-native internvl), key maps and safetensors IO."""
