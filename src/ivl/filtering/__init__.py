"""Training-data quality filters: repetition, heuristics, LLM scoring, and the streaming pipeline."""
