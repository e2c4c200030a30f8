"""Training recipes (the article's pipeline); filled by the training issue."""
