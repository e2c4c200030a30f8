"""The llama-hybrid command line, conversion and the embedded default model."""
